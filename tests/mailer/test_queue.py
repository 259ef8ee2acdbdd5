"""Queueing an email: what is stored and queued, and every refusal (with nothing queued)."""

from __future__ import annotations

import base64
import io
import json

import pytest
from django.core.files import File
from django.core.files.uploadedfile import SimpleUploadedFile

from mailer.exceptions import EmailRefused
from mailer.models import Email, EmailAttachment
from mailer.services import Attachment, email_queue

pytestmark = pytest.mark.django_db

PDF = b"%PDF-1.4\n1 0 obj <<>> endobj\ntrailer <<>>\n%%EOF\n"
PNG = b"\x89PNG\r\n\x1a\n" + b"\x00" * 32


def queue(**overrides):
    arguments = {"template": "welcome", "to": ["ada@example.com"], "context": {"name": "Ada"}}
    return email_queue(**{**arguments, **overrides})


def test_queue_stores_the_rendered_email_and_queues_its_id_only(django_capture_on_commit_callbacks, redis_client):
    redis_client.delete("high")
    with django_capture_on_commit_callbacks(execute=True) as callbacks:
        email = queue(request_id="rid-queue-1")
    assert len(callbacks) == 1
    email.refresh_from_db()
    assert email.status == Email.Status.QUEUED
    assert email.attempts == 0
    assert email.to == ["ada@example.com"]
    assert email.subject == "Welcome to jobsite, Ada!"
    assert "Hello Ada," in email.body_text
    assert "<h1" in email.body_html
    assert email.request_id == "rid-queue-1"
    assert email.message_id.startswith("<")
    assert email.message_id.endswith("@localhost>")

    # The message on the `high` queue: the task name and the id, nothing of the email itself.
    raw = redis_client.lrange("high", 0, -1)
    assert len(raw) == 1
    message = json.loads(raw[0])
    assert message["headers"]["task"] == "mailer.send_email"
    assert message["headers"]["request_id"] == "rid-queue-1"
    body = base64.b64decode(message["body"])
    assert json.loads(body)[0] == [email.pk]
    assert b"ada@example.com" not in raw[0]
    assert b"Ada" not in body


def test_message_ids_are_unique_and_use_the_sender_domain(settings, django_capture_on_commit_callbacks):
    settings.DEFAULT_FROM_EMAIL = "Jobsite <hello@jobs.example.org>"
    with django_capture_on_commit_callbacks():
        first, second = queue(), queue()
    assert first.message_id != second.message_id
    assert first.message_id.endswith("@jobs.example.org>")
    assert first.from_email == "Jobsite <hello@jobs.example.org>"


def test_display_names_are_accepted(django_capture_on_commit_callbacks):
    with django_capture_on_commit_callbacks():
        email = queue(to=["Ada Lovelace <ada@example.com>", "bob@example.org"])
    assert email.to == ["Ada Lovelace <ada@example.com>", "bob@example.org"]


def test_attachments_are_kept_in_storage(settings, django_capture_on_commit_callbacks):
    upload = SimpleUploadedFile("notes.txt", b"plain notes\n", content_type="text/plain")
    with django_capture_on_commit_callbacks() as callbacks:
        email = queue(
            attachments=[
                Attachment(filename="invoice.pdf", content=PDF, content_type="application/pdf"),
                Attachment(filename="logo.png", content=PNG, content_type="image/png", content_id="logo"),
                upload,
            ]
        )
    assert len(callbacks) == 1
    rows = list(email.attachments.all())
    assert [(a.filename, a.content_type, a.size, a.content_id) for a in rows] == [
        ("invoice.pdf", "application/pdf", len(PDF), ""),
        ("logo.png", "image/png", len(PNG), "logo"),
        ("notes.txt", "text/plain", 12, ""),
    ]
    assert rows[0].file.name.startswith("mailer/attachments/")
    assert (settings.MEDIA_ROOT / rows[0].file.name).read_bytes() == PDF


def test_content_type_is_guessed_from_the_name_when_not_given(django_capture_on_commit_callbacks):
    with django_capture_on_commit_callbacks():
        email = queue(attachments=[Attachment(filename="report.pdf", content=PDF)])
    assert email.attachments.get().content_type == "application/pdf"


def refused(django_capture_on_commit_callbacks, code: str, **overrides) -> EmailRefused:
    with django_capture_on_commit_callbacks() as callbacks, pytest.raises(EmailRefused) as info:
        queue(**overrides)
    assert info.value.code == code, str(info.value)
    assert callbacks == []
    assert not Email.objects.exists()
    assert not EmailAttachment.objects.exists()
    return info.value


@pytest.mark.parametrize("template", ["nope", "../admin/base", "welcome/../welcome", "", "Welcome", "a" * 101])
def test_unknown_template_is_refused(django_capture_on_commit_callbacks, template):
    error = refused(django_capture_on_commit_callbacks, "unknown_template", template=template)
    assert error.field == "template"
    assert "unknown email template" in str(error)


def test_template_name_must_be_a_string(django_capture_on_commit_callbacks):
    refused(django_capture_on_commit_callbacks, "unknown_template", template=None)


@pytest.mark.parametrize(
    "address",
    [
        "not-an-address",
        "a@",
        "@example.com",
        "a b@example.com",
        "a@example..com",
        "",
        "x <y>",
        "Ada <ada@ex ample.com>",
    ],
)
def test_bad_address_is_refused(django_capture_on_commit_callbacks, address):
    error = refused(django_capture_on_commit_callbacks, "invalid_address", to=["ok@example.com", address])
    assert error.field == "to"
    assert "invalid email address" in str(error)


@pytest.mark.parametrize("to", [[], "ada@example.com", None, [42]])
def test_recipients_must_be_a_list_of_strings(django_capture_on_commit_callbacks, to):
    refused(django_capture_on_commit_callbacks, "invalid_address", to=to)


@pytest.mark.parametrize(
    "address",
    ["ada@example.com\nBcc: all@example.com", "ada@example.com\r\nBcc: x@example.com", "Ada\r <ada@example.com>"],
)
def test_newline_in_an_address_is_a_header_injection(django_capture_on_commit_callbacks, address):
    error = refused(django_capture_on_commit_callbacks, "header_injection", to=[address])
    assert "line break" in str(error)


@pytest.mark.parametrize("name", ["Ada\nBcc: all@example.com", "Ada\r\nX-Evil: 1", "Ada\r"])
def test_newline_in_the_subject_is_a_header_injection(django_capture_on_commit_callbacks, name):
    error = refused(django_capture_on_commit_callbacks, "header_injection", context={"name": name})
    assert str(error) == "the subject must be one line"


def test_too_many_recipients_are_refused(settings, django_capture_on_commit_callbacks):
    settings.MAILER_MAX_RECIPIENTS = 2
    refused(django_capture_on_commit_callbacks, "too_many_recipients", to=[f"u{i}@example.com" for i in range(3)])


@pytest.mark.parametrize("context", [["name"], {1: "x"}, {"when": object()}])
def test_context_must_be_a_json_object(django_capture_on_commit_callbacks, context):
    refused(django_capture_on_commit_callbacks, "invalid_context", context=context)


def test_too_many_attachments_are_refused(settings, django_capture_on_commit_callbacks):
    settings.MAILER_MAX_ATTACHMENTS = 2
    files = [Attachment(filename=f"{i}.txt", content=b"x", content_type="text/plain") for i in range(3)]
    error = refused(django_capture_on_commit_callbacks, "too_many_attachments", attachments=files)
    assert "at most 2 attachments" in str(error)


def test_oversized_attachment_is_refused(settings, django_capture_on_commit_callbacks):
    settings.MAILER_MAX_ATTACHMENT_BYTES = 100
    big = Attachment(filename="big.txt", content=b"x" * 101, content_type="text/plain")
    error = refused(django_capture_on_commit_callbacks, "attachment_too_large", attachments=[big])
    assert "101 bytes" in str(error)


class CountingFile(io.BytesIO):
    """A stream that counts the bytes read from it."""

    read_bytes = 0

    def read(self, size: int | None = -1) -> bytes:
        data = super().read(size)
        self.read_bytes += len(data)
        return data


def test_oversized_upload_is_refused_without_reading_it_all(settings, django_capture_on_commit_callbacks):
    settings.MAILER_MAX_ATTACHMENT_BYTES = 100
    stream = CountingFile(b"x" * 100_000)
    upload = File(stream, name="big.txt")  # its size is known: refused before any byte is read
    refused(django_capture_on_commit_callbacks, "attachment_too_large", attachments=[upload])
    assert stream.read_bytes == 0

    stream = CountingFile(b"x" * 100_000)
    unsized = File(stream, name="big.txt")
    unsized.size = None  # a stream of unknown length: read up to one byte past the limit, no more
    refused(django_capture_on_commit_callbacks, "attachment_too_large", attachments=[unsized])
    assert stream.read_bytes == 101


def test_attachments_over_the_total_are_refused(settings, django_capture_on_commit_callbacks):
    settings.MAILER_MAX_TOTAL_ATTACHMENT_BYTES = 150
    files = [Attachment(filename=f"{i}.txt", content=b"x" * 80, content_type="text/plain") for i in range(2)]
    error = refused(django_capture_on_commit_callbacks, "attachment_too_large", attachments=files)
    assert "total 160 bytes" in str(error)


@pytest.mark.parametrize(
    ("filename", "content_type"),
    [("run.exe", "application/x-msdownload"), ("page.html", "text/html"), ("blob", None), ("x.zip", "application/zip")],
)
def test_disallowed_content_type_is_refused(django_capture_on_commit_callbacks, filename, content_type):
    item = Attachment(filename=filename, content=b"MZ\x90\x00", content_type=content_type)
    error = refused(django_capture_on_commit_callbacks, "attachment_type_not_allowed", attachments=[item])
    assert "not allowed" in str(error)


@pytest.mark.parametrize(
    ("content_type", "content"),
    [
        ("application/pdf", b"MZ\x90\x00 an executable"),
        ("image/png", b"GIF89a..."),
        ("image/jpeg", b"not a jpeg"),
        ("image/webp", b"RIFF\x00\x00\x00\x00WAVE"),
        ("text/plain", b"\xff\xfe\x00binary"),
    ],
)
def test_content_that_is_not_what_it_claims_is_refused(django_capture_on_commit_callbacks, content_type, content):
    item = Attachment(filename="file", content=content, content_type=content_type)
    error = refused(django_capture_on_commit_callbacks, "attachment_type_not_allowed", attachments=[item])
    assert f"is not a {content_type} file" in str(error)


@pytest.mark.parametrize("filename", ["", "../etc/passwd", "a\\b.txt", "a\r\nX-Evil: 1.txt", ".."])
def test_bad_attachment_name_is_refused(django_capture_on_commit_callbacks, filename):
    item = Attachment(filename=filename, content=b"x", content_type="text/plain")
    refused(django_capture_on_commit_callbacks, "invalid_attachment", attachments=[item])


def test_inline_attachment_must_be_an_image_with_a_sane_content_id(django_capture_on_commit_callbacks):
    pdf = Attachment(filename="a.pdf", content=PDF, content_type="application/pdf", content_id="doc")
    refused(django_capture_on_commit_callbacks, "invalid_attachment", attachments=[pdf])
    png = Attachment(filename="a.png", content=PNG, content_type="image/png", content_id="bad id>")
    refused(django_capture_on_commit_callbacks, "invalid_attachment", attachments=[png])


@pytest.mark.parametrize("item", [b"raw bytes", "a string", Attachment(filename="s.txt", content="str")])
def test_attachment_of_unknown_kind_is_refused(django_capture_on_commit_callbacks, item):
    refused(django_capture_on_commit_callbacks, "invalid_attachment", attachments=[item])


def test_overlong_subject_is_refused(django_capture_on_commit_callbacks):
    refused(django_capture_on_commit_callbacks, "invalid_context", context={"name": "x" * 1000})
