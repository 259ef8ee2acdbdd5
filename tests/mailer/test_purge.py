"""Purging old sent emails: the service, and the `@task` (Django's Tasks API) a staff member
enqueues with `POST /api/emails/purge/` and reads with `GET /api/emails/purge/<id>/`. A real
worker runs it in tests/integration/test_mailer.py."""

from __future__ import annotations

import json
from datetime import timedelta

import pytest
from django.core.files.base import ContentFile
from django.core.files.storage import default_storage
from django.utils import timezone

from jobs.models import OutboxMessage
from mailer.models import Email, EmailAttachment
from mailer.services import emails_purge
from mailer.tasks import purge_sent_emails
from tests.conftest import grant
from tests.mailer.test_api import basic

pytestmark = pytest.mark.django_db(transaction=True)

URL = "/api/emails/purge/"


def email(status: str, sent_days_ago: float | None) -> Email:
    sent_at = timezone.now() - timedelta(days=sent_days_ago) if sent_days_ago is not None else None
    fields = {"from_email": "site@example.com", "template": "welcome", "subject": "Hi", "to": ["a@example.com"]}
    return Email.objects.create(**fields, status=status, sent_at=sent_at)


@pytest.fixture
def staff_user(django_user_model):
    return grant(django_user_model.objects.create_user("staff", "staff@example.com", "s3cret-pass", is_staff=True))


def test_only_sent_emails_older_than_the_cutoff_go_with_their_files():
    old = email(Email.Status.SENT, 40)
    attachment = EmailAttachment.objects.create(
        email=old, file=ContentFile(b"%PDF-1.4", name="a.pdf"), filename="a.pdf", content_type="application/pdf", size=8
    )
    name = attachment.file.name
    assert default_storage.exists(name)
    recent = email(Email.Status.SENT, 5)
    failed = email(Email.Status.FAILED, None)
    queued = email(Email.Status.QUEUED, None)

    assert emails_purge(older_than_days=30) == 1
    assert set(Email.objects.values_list("pk", flat=True)) == {recent.pk, failed.pk, queued.pk}
    assert not default_storage.exists(name)
    assert emails_purge(older_than_days=30) == 0  # nothing left to purge: a rerun is harmless
    with pytest.raises(ValueError, match="at least 1"):
        emails_purge(older_than_days=0)


def test_the_task_runs_the_purge_when_called_directly():
    email(Email.Status.SENT, 100)
    assert purge_sent_emails.call(90) == 1


def test_staff_enqueue_a_purge_and_read_it_back_by_id(client, staff_user, redis_client):
    response = client.post(
        URL, data=json.dumps({"older_than_days": 30}), content_type="application/json", **basic("staff", "s3cret-pass")
    )
    assert response.status_code == 202, response.content
    body = response.json()
    assert body["status"] == "READY"
    assert body["url"] == f"{URL}{body['id']}/"
    job = OutboxMessage.objects.get(task_id=body["id"])
    assert (job.task_name, job.args, job.options["queue"]) == ("mailer.tasks.purge_sent_emails", [30], "low")

    detail = client.get(body["url"], **basic("staff", "s3cret-pass"))
    assert detail.status_code == 200
    assert detail.json() == {**{k: v for k, v in body.items() if k != "url"}}


@pytest.mark.parametrize("days", [0, -1, 1.5, "30", True, 40000])
def test_a_bad_number_of_days_is_a_400_naming_the_field(client, staff_user, days):
    response = client.post(
        URL,
        data=json.dumps({"older_than_days": days}),
        content_type="application/json",
        **basic("staff", "s3cret-pass"),
    )
    assert response.status_code == 400
    assert response.json()["field"] == "older_than_days"
    assert not OutboxMessage.objects.exists()


def test_an_unknown_purge_id_is_a_404_and_strangers_get_401(client, staff_user):
    other = client.get(f"{URL}no-such-id/", **basic("staff", "s3cret-pass"))
    assert other.status_code == 404
    assert other.json() == {"error": "no purge with this id"}
    assert client.get(f"{URL}no-such-id/").status_code == 401
    refused = client.post(URL, data="{}", content_type="application/json")
    assert refused.status_code == 401
    assert not OutboxMessage.objects.exists()
