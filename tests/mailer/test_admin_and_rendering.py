"""The email admin through the Django test client, and template rendering."""

from __future__ import annotations

import pytest
from django.contrib.admin.helpers import ACTION_CHECKBOX_NAME
from django.contrib.auth import get_user_model
from django.contrib.auth.models import Permission
from django.template import TemplateSyntaxError

from mailer import rendering
from mailer.models import Email
from mailer.services import Attachment, email_queue
from tests.conftest import results_table
from tests.mailer.test_queue import PDF

pytestmark = pytest.mark.django_db

CHANGELIST = "/admin/mailer/email/"


@pytest.fixture
def make_email(django_capture_on_commit_callbacks):
    def make(to=("ada@example.com",), name="Ada", status=Email.Status.QUEUED, **kwargs) -> Email:
        with django_capture_on_commit_callbacks():
            email = email_queue(template="welcome", to=list(to), context={"name": name}, **kwargs)
        Email.objects.filter(pk=email.pk).update(status=status)
        email.refresh_from_db()
        return email

    return make


# --- rendering ----------------------------------------------------------------------------------


def test_welcome_renders_text_and_html_with_the_right_escaping():
    rendered = rendering.render("welcome", {"name": "O'Brien <script>"})
    assert rendered.subject == "Welcome to jobsite, O'Brien <script>!"
    assert rendered.text.startswith("Hello O'Brien <script>,\n")
    assert "The jobsite team" in rendered.text  # from the shared base layout
    assert "O&#x27;Brien &lt;script&gt;" in rendered.html
    assert "<script>" not in rendered.html
    assert rendered.html.startswith("<!DOCTYPE html>")


def test_a_template_without_html_has_an_empty_html_part(settings, tmp_path):
    folder = tmp_path / "templates" / "mailer" / "plain"
    folder.mkdir(parents=True)
    (folder / "subject.txt").write_text("Plain {{ what }}\n")
    (folder / "body.txt").write_text('{% extends "mailer/base.txt" %}{% block content %}Just {{ what }}{% endblock %}')
    settings.TEMPLATES = [{**settings.TEMPLATES[0], "DIRS": [tmp_path / "templates", *settings.TEMPLATES[0]["DIRS"]]}]
    assert rendering.template_exists("plain")
    rendered = rendering.render("plain", {"what": "text"})
    assert (rendered.subject, rendered.html) == ("Plain text", "")
    assert rendered.text.startswith("Just text")


def test_a_broken_template_fails_loudly(settings, tmp_path):
    folder = tmp_path / "templates" / "mailer" / "broken"
    folder.mkdir(parents=True)
    (folder / "subject.txt").write_text("Hi")
    (folder / "body.txt").write_text("{% if %}")
    settings.TEMPLATES = [{**settings.TEMPLATES[0], "DIRS": [tmp_path / "templates", *settings.TEMPLATES[0]["DIRS"]]}]
    with pytest.raises(TemplateSyntaxError):
        rendering.render("broken", {})


# --- admin --------------------------------------------------------------------------------------


def test_changelist_filters_by_status_and_template_and_searches_recipients(admin_client, make_email):
    make_email(to=["ada@example.com"], status=Email.Status.SENT)
    make_email(to=["bob@example.org"], name="Bob", status=Email.Status.FAILED)
    response = admin_client.get(CHANGELIST, {"status__exact": "sent"})
    assert response.status_code == 200
    assert "ada@example.com" in results_table(response)
    assert "bob@example.org" not in results_table(response)
    assert "bob@example.org" in results_table(admin_client.get(CHANGELIST, {"template": "welcome"}))
    results = results_table(admin_client.get(CHANGELIST, {"q": "bob@example"}))
    assert "bob@example.org" in results
    assert "ada@example.com" not in results


def test_detail_shows_the_rendered_message_read_only(admin_client, make_email):
    email = make_email(
        name="Ada", attachments=[Attachment(filename="invoice.pdf", content=PDF, content_type="application/pdf")]
    )
    response = admin_client.get(f"{CHANGELIST}{email.pk}/change/")
    assert response.status_code == 200
    content = response.content.decode()
    assert "Hello Ada," in content  # the text part
    assert 'sandbox=""' in content  # the HTML part, in a frame that cannot run scripts
    assert "srcdoc=" in content
    assert "invoice.pdf" in content
    assert email.message_id.replace("<", "&lt;").replace(">", "&gt;") in content
    assert 'name="_save"' not in content  # nothing to edit


def test_no_add_and_no_edit(admin_client, make_email):
    email = make_email()
    assert admin_client.get(f"{CHANGELIST}add/").status_code == 403
    response = admin_client.post(f"{CHANGELIST}{email.pk}/change/", {"subject": "changed"})
    assert response.status_code == 403
    email.refresh_from_db()
    assert email.subject == "Welcome to jobsite, Ada!"


def test_resend_action(admin_client, make_email, django_capture_on_commit_callbacks):
    failed = make_email(status=Email.Status.FAILED)
    sent = make_email(to=["bob@example.org"], name="Bob", status=Email.Status.SENT)
    queued = make_email(to=["cy@example.org"], name="Cy")
    with django_capture_on_commit_callbacks() as callbacks:
        response = admin_client.post(
            CHANGELIST,
            {"action": "resend_selected", ACTION_CHECKBOX_NAME: [failed.pk, sent.pk, queued.pk]},
            follow=True,
        )
    assert response.status_code == 200
    messages = [str(m) for m in response.context["messages"]]
    copy = Email.objects.get(resent_from=sent)
    assert messages == [
        "Queued 1 failed email again.",
        f"Sent 1 email again as new emails: #{copy.pk}.",
        "Skipped 1 email still queued or being sent.",
    ]
    assert len(callbacks) == 2
    failed.refresh_from_db()
    assert failed.status == Email.Status.QUEUED
    assert copy.status == Email.Status.QUEUED
    assert copy.message_id != sent.message_id
    assert (copy.to, copy.subject, copy.body_html) == (sent.to, sent.subject, sent.body_html)


def test_resend_copies_attachments_without_copying_files(make_email, django_capture_on_commit_callbacks):
    from mailer.services import emails_resend

    sent = make_email(
        status=Email.Status.SENT,
        attachments=[Attachment(filename="invoice.pdf", content=PDF, content_type="application/pdf")],
    )
    with django_capture_on_commit_callbacks():
        result = emails_resend(emails=Email.objects.filter(pk=sent.pk), actor="test")
    copy = Email.objects.get(pk=result.copied[0])
    assert result.count == 1
    assert [a.file.name for a in copy.attachments.all()] == [a.file.name for a in sent.attachments.all()]


def test_view_only_staff_can_read_but_not_resend(client, make_email):
    user = get_user_model().objects.create_user("viewer", password="pw-viewer-1", is_staff=True)
    user.user_permissions.add(Permission.objects.get(codename="view_email"))
    client.force_login(user)
    email = make_email(status=Email.Status.FAILED)
    response = client.get(CHANGELIST)
    assert response.status_code == 200
    assert "resend_selected" not in response.content.decode()
    assert client.get(f"{CHANGELIST}{email.pk}/change/").status_code == 200


def test_the_context_a_template_needs_is_what_it_prints_unconditionally():
    from django.template import Engine

    from mailer.rendering import _printed, required_context

    source = (
        "{{ a }} {{ b|default:'x' }} {% if c %}{{ c }}{% endif %} "
        "{% for i in items %}{{ i }}{{ forloop.counter }}{% empty %}{{ none_left }}{% endfor %} "
        "{% with d=1 %}{{ d }}{% endwith %} {{ 'literal' }} {% if x and y %}{{ y.z }}{% else %}{{ w }}{% endif %}"
    )
    # What an {% if %} prints (either branch) is conditional; {{ block.super }} is the layout's.
    assert sorted(set(_printed(Engine().from_string(source).nodelist, frozenset()))) == ["a", "none_left"]
    assert required_context("welcome") == {"name"}
