"""Sending a stored email through a real local SMTP server: hand-off recorded once, errors
sorted, connection reused."""

from __future__ import annotations

import logging
import smtplib
import socket
import ssl
from datetime import timedelta

import pytest
import requests
from anymail.exceptions import (
    AnymailAPIError,
    AnymailInvalidAddress,
    AnymailRecipientsRefused,
    AnymailRequestsAPIError,
)
from django.core import mail
from django.db import OperationalError, connection
from django.utils import timezone

from jobs.exceptions import InvalidTaskArguments, PermanentError, TransientError
from mailer import backend
from mailer.models import Email
from mailer.services import Attachment, HandOffInProgress, email_queue, email_send
from mailer.tasks import EmailTask, classify_send_error, send_email
from tests.mailer.test_queue import PDF, PNG

pytestmark = pytest.mark.django_db


def _bad_header_error() -> ValueError:
    """What building a message with a newline in a header raises: BadHeaderError up to Django 5.2,
    the email package's ValueError from 6.0 on (where BadHeaderError is deprecated)."""
    try:
        mail.EmailMessage(subject="two\nlines", to=["a@b.c"]).message().as_bytes()
    except ValueError as exc:
        return exc
    raise AssertionError("a newline in a header was accepted")


@pytest.fixture
def queued(django_capture_on_commit_callbacks):
    def make(**overrides) -> Email:
        arguments = {"template": "welcome", "to": ["ada@example.com"], "context": {"name": "Ada"}}
        with django_capture_on_commit_callbacks():
            return email_queue(**{**arguments, **overrides})

    return make


def test_send_hands_off_once_and_records_it(smtp_settings, queued):
    email = queued(
        attachments=[
            Attachment(filename="invoice.pdf", content=PDF, content_type="application/pdf"),
            Attachment(filename="logo.png", content=PNG, content_type="image/png", content_id="logo"),
        ]
    )
    sent = email_send(email=email)
    assert sent.status == Email.Status.SENT
    assert sent.attempts == 1
    assert sent.sent_at is not None
    assert sent.handed_off_at is not None
    assert sent.last_error == ""

    [message] = smtp_settings.messages
    assert message.get_content_type() == "multipart/related"  # an inline image
    assert message["Message-ID"] == email.message_id
    assert message["Subject"] == "Welcome to jobsite, Ada!"
    assert message["To"] == "ada@example.com"
    assert message["From"] == "noreply@localhost"
    text = message.get_body(preferencelist=("plain",))
    html = message.get_body(preferencelist=("html",))
    assert "Hello Ada," in text.get_content()
    assert "<h1" in html.get_content()
    attachments = {part.get_filename(): part for part in message.iter_attachments()}
    assert attachments["invoice.pdf"].get_content() == PDF
    assert attachments["invoice.pdf"].get_content_type() == "application/pdf"
    inline = [part for part in message.walk() if part["Content-ID"] == "<logo>"]
    assert len(inline) == 1
    assert inline[0].get_payload(decode=True) == PNG

    # Run again (a redelivered task): nothing more is sent.
    again = email_send(email=Email.objects.get(pk=email.pk))
    assert again.status == Email.Status.SENT
    assert again.attempts == 1
    assert len(smtp_settings.messages) == 1


def test_a_hand_off_in_progress_is_not_repeated(smtp_settings, queued):
    email = queued()
    Email.objects.filter(pk=email.pk).update(status=Email.Status.SENDING, handed_off_at=timezone.now(), attempts=1)
    with pytest.raises(HandOffInProgress):
        email_send(email=email)
    assert smtp_settings.messages == []
    assert isinstance(HandOffInProgress("x", retry_after=1), TransientError)


def test_an_attempt_that_loses_the_database_after_its_claim_gives_the_claim_back(smtp_settings, queued):
    """A database cut right after the claim left the email `sending` for the whole lease (10
    minutes), every retry refused as "in progress" (found by the fault suite). The claim returns
    the row, so the first read after it is the attachments'."""
    email = queued(attachments=[Attachment(filename="invoice.pdf", content=PDF, content_type="application/pdf")])
    seen, cut = [], []

    def cut_after_the_claim(execute, sql, params, many, context):
        statement = sql.lstrip().upper()
        if statement.startswith("UPDATE") and "RETURNING" in statement:
            seen.append(sql)
        elif statement.startswith("SELECT") and seen and not cut:  # the first read after the claim
            cut.append(sql)
            raise OperationalError("server closed the connection unexpectedly")
        return execute(sql, params, many, context)

    with connection.execute_wrapper(cut_after_the_claim), pytest.raises(OperationalError):
        email_send(email=email, attempt="task-1")
    assert cut
    email.refresh_from_db()
    assert (email.status, email.claimed_by) == (Email.Status.QUEUED, "")
    assert smtp_settings.messages == []

    assert email_send(email=email, attempt="task-1").status == Email.Status.SENT
    assert len(smtp_settings.messages) == 1


def test_a_second_delivery_of_the_same_job_never_sends_beside_the_first(smtp_settings, queued):
    """Redis hands a message out again after its visibility timeout, and the ledger republishes a
    job it judged lost: two attempts with one task id can run at once. The second must wait."""
    email = queued()
    Email.objects.filter(pk=email.pk).update(
        status=Email.Status.SENDING, handed_off_at=timezone.now(), attempts=1, claimed_by="task-1"
    )
    with pytest.raises(HandOffInProgress):
        email_send(email=email, attempt="task-1")
    assert smtp_settings.messages == []


def test_a_hand_off_abandoned_past_the_lease_is_sent_again_with_the_same_message_id(settings, smtp_settings, queued):
    settings.MAILER_SENDING_LEASE_SECONDS = 60
    email = queued()
    long_ago = timezone.now() - timedelta(seconds=61)
    Email.objects.filter(pk=email.pk).update(status=Email.Status.SENDING, handed_off_at=long_ago, attempts=1)
    sent = email_send(email=email)
    assert sent.status == Email.Status.SENT
    assert sent.attempts == 2
    assert [m["Message-ID"] for m in smtp_settings.messages] == [email.message_id]


def test_default_lease_outlasts_the_task_time_limit(settings, smtp_settings, queued):
    settings.MAILER_SENDING_LEASE_SECONDS = 0
    settings.CELERY_TASK_TIME_LIMIT = 600
    email = queued()
    nearly = timezone.now() - timedelta(seconds=600)
    Email.objects.filter(pk=email.pk).update(status=Email.Status.SENDING, handed_off_at=nearly)
    with pytest.raises(HandOffInProgress):
        email_send(email=email)


def test_a_failed_send_goes_back_to_queued_with_the_error(smtp_settings, queued):
    smtp_settings.handler.data_reply = "451 4.3.0 Try again later"
    email = queued()
    with pytest.raises(smtplib.SMTPDataError) as info:
        email_send(email=email)
    assert classify_send_error(info.value) == "transient"
    email.refresh_from_db()
    assert email.status == Email.Status.QUEUED
    assert email.attempts == 1
    assert "451" in email.last_error

    smtp_settings.handler.data_reply = None
    assert email_send(email=email).status == Email.Status.SENT
    email.refresh_from_db()
    assert email.attempts == 2
    assert email.last_error == ""
    assert len(smtp_settings.messages) == 1


def test_a_refused_recipient_is_the_users_and_its_address_is_not_logged(smtp_settings, queued, caplog):
    from config.logging import JsonFormatter
    from jobs.logging import ContextFilter

    smtp_settings.handler.rcpt_reply = "550 5.1.1 No such user"
    email = queued()
    with caplog.at_level(logging.INFO), pytest.raises(smtplib.SMTPRecipientsRefused) as info:
        email_send(email=email)
    assert classify_send_error(info.value) == "user"  # the user's address: no dead letter
    address = email.to[0]
    assert address in str(info.value)  # the refusal names the recipient...
    lines = []
    for record in caplog.records:
        if record.name != "mail.log":  # aiosmtpd's own lines: the server stands in for the world outside
            ContextFilter().filter(record)
            lines.append(JsonFormatter().format(record))
    assert any('"email.send_failed"' in line for line in lines)
    assert not [line for line in lines if address in line]  # ...the log lines do not


def test_a_greylisted_recipient_is_transient(smtp_settings, queued):
    smtp_settings.handler.rcpt_reply = "450 4.2.0 Greylisted, come back later"
    with pytest.raises(smtplib.SMTPRecipientsRefused) as info:
        email_send(email=queued())
    assert classify_send_error(info.value) == "transient"


def test_a_server_that_is_down_is_transient(settings, queued):

    settings.EMAIL_BACKEND = "django.core.mail.backends.smtp.EmailBackend"
    settings.EMAIL_HOST, settings.EMAIL_PORT, settings.EMAIL_TIMEOUT = "127.0.0.1", 1, 2
    email = queued()
    with pytest.raises(ConnectionRefusedError) as info:
        email_send(email=email)
    assert EmailTask().classify(info.value) == "transient"
    email.refresh_from_db()
    assert email.status == Email.Status.QUEUED
    assert "ConnectionRefusedError" in email.last_error


def test_one_connection_serves_many_emails(smtp_settings, queued):
    for _ in range(3):
        email_send(email=queued())
    assert len(smtp_settings.messages) == 3
    assert smtp_settings.handler.connections == 1


def test_connection_is_opened_again_after_an_error(smtp_settings, queued):
    email_send(email=queued())
    smtp_settings.handler.data_reply = "451 4.3.0 Try again later"
    with pytest.raises(smtplib.SMTPDataError):
        email_send(email=queued())
    smtp_settings.handler.data_reply = None
    email_send(email=queued())
    assert smtp_settings.handler.connections == 2


def test_connection_is_renewed_when_idle_or_used_up(settings, smtp_settings, queued):
    settings.MAILER_CONNECTION_MAX_MESSAGES = 2
    for _ in range(3):
        email_send(email=queued())
    assert smtp_settings.handler.connections == 2
    settings.MAILER_CONNECTION_MAX_IDLE = 0
    email_send(email=queued())
    assert smtp_settings.handler.connections == 3


def test_connection_follows_changed_settings(settings, smtp_settings, queued):
    email_send(email=queued())
    settings.EMAIL_BACKEND = "django.core.mail.backends.locmem.EmailBackend"
    email_send(email=queued())
    assert len(mail.outbox) == 1
    assert len(smtp_settings.messages) == 1


def test_without_reuse_each_email_opens_a_connection(settings, smtp_settings, queued):
    settings.MAILER_REUSE_CONNECTION = False
    for _ in range(3):
        email_send(email=queued())
    assert smtp_settings.handler.connections == 3


def test_a_connection_closed_by_the_server_is_a_transient_error_then_reopened(smtp_settings, queued):
    email_send(email=queued())
    backend._local.held.connection.connection.sock.shutdown(socket.SHUT_RDWR)  # as if the server hung up
    with pytest.raises(smtplib.SMTPServerDisconnected) as info:
        email_send(email=queued())
    assert classify_send_error(info.value) == "transient"
    email_send(email=queued())
    assert len(smtp_settings.messages) == 2


# --- the task ---------------------------------------------------------------------------------


def test_task_sends_by_id(queued):
    email = queued()
    assert send_email(email.pk) == "sent"
    assert len(mail.outbox) == 1
    assert mail.outbox[0].extra_headers["Message-ID"] == email.message_id
    assert send_email(email.pk) == "sent"
    assert len(mail.outbox) == 1


def test_task_fails_for_good_when_the_email_is_gone(queued):
    email = queued()
    email_id = email.pk
    email.delete()
    with pytest.raises(InvalidTaskArguments, match=f"email {email_id} does not exist") as info:
        send_email(email_id)
    assert EmailTask().classify(info.value) == "permanent"
    assert mail.outbox == []


@pytest.mark.parametrize("value", ["1", 0, -3, None, True, 1.5, [1]])
def test_task_refuses_bad_arguments(value):
    with pytest.raises(InvalidTaskArguments):
        send_email(value)


def test_task_failure_marks_the_email_failed(queued):
    from jobs.models import DeadLetter

    email = queued()
    send_email.on_failure(PermanentError("nope"), "task-1", (email.pk,), {}, None)
    email.refresh_from_db()
    assert email.status == Email.Status.FAILED
    assert email.last_error == "PermanentError: nope"
    assert DeadLetter.objects.get(task_id="task-1").task_name == "mailer.send_email"
    # A bad id leaves emails alone (only the dead letter is written).
    send_email.on_failure(InvalidTaskArguments("bad"), "task-2", ("x",), {}, None)
    assert DeadLetter.objects.filter(task_id="task-2").exists()


def test_a_sent_email_is_never_marked_failed(queued):
    email = queued()
    send_email(email.pk)
    send_email.on_failure(PermanentError("late"), "task-3", (), {"email_id": email.pk}, None)
    email.refresh_from_db()
    assert email.status == Email.Status.SENT


def _api_error(status: int) -> AnymailAPIError:
    response = requests.Response()
    response.status_code = status
    response._content = b"{}"
    return AnymailRequestsAPIError("esp said no", response=response)


@pytest.mark.parametrize(
    ("exc", "kind"),
    [
        (smtplib.SMTPDataError(451, b"later"), "transient"),
        (smtplib.SMTPDataError(554, b"rejected"), "permanent"),
        (smtplib.SMTPSenderRefused(421, b"busy", "a@b.c"), "transient"),
        (smtplib.SMTPSenderRefused(553, b"not yours", "a@b.c"), "permanent"),
        (smtplib.SMTPAuthenticationError(535, b"bad credentials"), "permanent"),
        (smtplib.SMTPConnectError(554, b"go away"), "transient"),
        (smtplib.SMTPServerDisconnected("gone"), "transient"),
        (smtplib.SMTPRecipientsRefused({"a@b.c": (550, b"no"), "d@e.f": (451, b"later")}), "permanent"),
        (smtplib.SMTPRecipientsRefused({"a@b.c": (550, b"5.1.1 no such user")}), "user"),
        (smtplib.SMTPRecipientsRefused({"a@b.c": (550, b"5.7.1 client host blocked")}), "permanent"),
        (smtplib.SMTPRecipientsRefused({"a@b.c": (554, b"5.7.1 relay denied")}), "permanent"),
        (smtplib.SMTPRecipientsRefused({"a@b.c": (450, b"grey"), "d@e.f": (451, b"later")}), "transient"),
        (smtplib.SMTPResponseException(250, b"odd"), "unexpected"),
        (smtplib.SMTPNotSupportedError("no STARTTLS"), "permanent"),
        (ssl.SSLCertVerificationError("bad cert"), "permanent"),
        (_bad_header_error(), "permanent"),
        (FileNotFoundError("attachment gone"), "permanent"),
        (TimeoutError("slow"), "transient"),
        (ConnectionResetError("reset"), "transient"),
        (OSError(101, "Network is unreachable"), "transient"),
        (_api_error(500), "transient"),
        (_api_error(503), "transient"),
        (_api_error(429), "transient"),
        (_api_error(422), "permanent"),
        (_api_error(401), "permanent"),
        (_api_error(302), "unexpected"),
        (AnymailAPIError("no response at all"), "unexpected"),
        (AnymailRecipientsRefused("all refused"), "user"),
        (AnymailInvalidAddress("bad"), "permanent"),
        (requests.Timeout("slow"), "transient"),
        (requests.ConnectionError("refused"), "transient"),
        (type("Wrapped", (AnymailRequestsAPIError, requests.ConnectTimeout), {})("wrapped"), "transient"),
        (KeyError("a bug"), "unexpected"),
    ],
)
def test_errors_are_sorted(exc, kind):
    assert EmailTask().classify(exc) == kind


def test_a_duplicate_that_gives_up_waiting_leaves_the_email_to_its_owner(queued):
    email = queued()
    Email.objects.filter(pk=email.pk).update(status=Email.Status.SENDING, handed_off_at=timezone.now())
    send_email.on_failure(HandOffInProgress("busy", retry_after=5), "task-4", (email.pk,), {}, None)
    email.refresh_from_db()
    assert email.status == Email.Status.SENDING


def test_a_hand_off_the_cache_remembers_is_never_repeated_even_if_the_database_lost_the_claim(smtp_settings, queued):
    """Sent, the record refused, the fact kept in the cache; then a failover to a replica that
    lagged behind lost the claim too: the email is `queued` at its first attempt again. It is
    recorded as sent, not sent a second time."""
    from django.core.cache import cache

    from mailer.services import HANDED_OFF_KEY

    email = queued()
    cache.set(HANDED_OFF_KEY.format(email.pk), "provider-1")
    sent = email_send(email=email.pk, attempt="task-2")
    assert (sent.status, sent.provider_message_id) == (Email.Status.SENT, "provider-1")
    assert Email.objects.get(pk=email.pk).status == Email.Status.SENT
    assert smtp_settings.messages == []


@pytest.mark.parametrize("returning", [True, False], ids=["update-returning", "claim-then-read"])
def test_both_ways_of_claiming_send_once_with_the_attachments(smtp_settings, queued, monkeypatch, returning):
    """PostgreSQL and SQLite claim and read in one UPDATE ... RETURNING; MySQL and MariaDB claim,
    then read. Either way the claimed row carries what the message is built from."""
    from mailer import services

    if not returning:
        monkeypatch.setattr(services, "RETURNING_VENDORS", set())
    plain = queued()
    attached = queued(attachments=[Attachment(filename="invoice.pdf", content=PDF, content_type="application/pdf")])
    for email in (plain, attached):
        sent = email_send(email=email.pk, attempt="task-1")
        assert (sent.status, sent.attempts, sent.claimed_by) == (Email.Status.SENT, 1, "task-1")
        assert email_send(email=email.pk, attempt="task-1").status == Email.Status.SENT  # not sent again
    first, second = smtp_settings.messages
    assert (first["Message-ID"], second["Message-ID"]) == (plain.message_id, attached.message_id)
    assert [part.get_filename() for part in second.iter_attachments()] == ["invoice.pdf"]
    assert list(first.iter_attachments()) == []


def test_a_claim_ages_on_the_databases_clock_not_the_workers(settings, smtp_settings, queued, monkeypatch):
    """A worker host whose clock runs 30 s ahead judged another host's claim of 15 s ago lapsed
    (a lease of 20 s) and sent the email beside the hand-off still in progress."""
    from django.db import connection

    if connection.vendor != "postgresql":
        pytest.skip("the suite runs on SQLite here: one host, one clock")
    from mailer import services

    settings.MAILER_SENDING_LEASE_SECONDS = 20
    email = queued()
    with connection.cursor() as cursor:  # claimed by another host 15 s ago, by the database's clock
        cursor.execute(
            "UPDATE mailer_email SET status = %s, attempts = 1, claimed_by = %s, "
            "handed_off_at = STATEMENT_TIMESTAMP() - INTERVAL '15 seconds' WHERE id = %s",
            [Email.Status.SENDING, "task-other", email.pk],
        )
    ahead = timezone.now() + timedelta(seconds=30)
    monkeypatch.setattr(services.timezone, "now", lambda: ahead)
    with pytest.raises(HandOffInProgress):
        email_send(email=email, attempt="task-mine")
    assert smtp_settings.messages == []


def test_a_lost_run_releases_its_own_claim_and_never_another_runs_of_the_same_job(queued):
    """Two runs of one job can both be alive (a run reclaimed from a host cut off, not dead): the
    worker that lost its process releases what that process's run claimed, not the live one's
    (the claim used to be the task id, which both runs share)."""
    from jobs.outcomes import Job, run_token

    email = queued()
    live = run_token("task-1", "celery@host-b", 200)
    Email.objects.filter(pk=email.pk).update(
        status=Email.Status.SENDING, handed_off_at=timezone.now(), attempts=1, claimed_by=live
    )
    task = send_email
    lost = Job(task_name=task.name, task_id="task-1", args=(email.pk,), run=run_token("task-1", "celery@host-a", 100))
    task.on_lost(lost)
    email.refresh_from_db()
    assert (email.status, email.claimed_by) == (Email.Status.SENDING, live)  # the live run keeps it
    task.on_lost(Job(task_name=task.name, task_id="task-1", args=(email.pk,)))  # no run known: nothing
    assert Email.objects.get(pk=email.pk).status == Email.Status.SENDING

    task.on_lost(Job(task_name=task.name, task_id="task-1", args=(email.pk,), run=live))
    email.refresh_from_db()
    assert (email.status, email.claimed_by) == (Email.Status.QUEUED, "")


def test_the_body_claims_under_the_token_the_worker_computes_for_its_process(smtp_settings, queued, monkeypatch):
    import os

    from jobs.outcomes import run_token

    email = queued()
    seen = []
    real = email_send

    def spy(*, email, attempt):
        seen.append(attempt)
        return real(email=email, attempt=attempt)

    monkeypatch.setattr("mailer.tasks.email_send", spy)
    send_email.apply(args=[email.pk], task_id="task-9")
    # Celery's request.hostname: the worker's name in a worker (JobRequest.hostname in its main
    # process), this host's name for apply().
    assert seen == [run_token("task-9", socket.gethostname(), os.getpid())]
    assert len(run_token("t" * 64, "h" * 200, 4194304)) <= 64
    # Replicas of one deployment: names that differ only at their end, Celery as PID 1 in each.
    replica = "high@worker-high-7c9d8f6b5d-"
    assert run_token("t" * 36, replica + "abcde", 8) != run_token("t" * 36, replica + "fghij", 8)
