"""Provider status webhooks (Postmark's format, through anymail's views) update the email."""

from __future__ import annotations

import base64
import json

import pytest

from mailer.models import Email

pytestmark = pytest.mark.django_db

URL = "/anymail/postmark/tracking/"
SECRET = "hook-user:hook-pass"


def auth(secret: str = SECRET) -> dict[str, str]:
    return {"HTTP_AUTHORIZATION": "Basic " + base64.b64encode(secret.encode()).decode()}


@pytest.fixture
def webhook_secret(settings):
    settings.ANYMAIL = {**settings.ANYMAIL, "WEBHOOK_SECRET": SECRET}


@pytest.fixture
def email():
    return Email.objects.create(
        to=["ada@example.com"],
        from_email="noreply@localhost",
        template="welcome",
        subject="Hi",
        body_text="Hi",
        status=Email.Status.SENT,
        provider_message_id="pm-0001",
    )


def post(client, event: dict, **extra):
    return client.post(URL, data=json.dumps(event), content_type="application/json", **extra)


def delivered(message_id: str = "pm-0001") -> dict:
    return {
        "RecordType": "Delivery",
        "MessageID": message_id,
        "Recipient": "ada@example.com",
        "DeliveredAt": "2026-11-24T10:00:00Z",
        "Details": "smtp;250 2.0.0 OK",
        "Metadata": {},
    }


def bounced(message_id: str = "pm-0001") -> dict:
    return {
        "RecordType": "Bounce",
        "Type": "HardBounce",
        "TypeCode": 1,
        "ID": 42,
        "MessageID": message_id,
        "Email": "ada@example.com",
        "BouncedAt": "2026-11-24T10:05:00Z",
        "Description": "The server was unable to deliver your message",
        "Details": "smtp;550 5.1.1 user unknown",
        "Metadata": {},
    }


def complained(message_id: str = "pm-0001") -> dict:
    return {
        "RecordType": "SpamComplaint",
        "Type": "SpamComplaint",
        "TypeCode": 512,
        "ID": 43,
        "MessageID": message_id,
        "Email": "ada@example.com",
        "BouncedAt": "2026-11-24T11:00:00Z",
        "Metadata": {},
    }


def test_delivered_then_complained(client, webhook_secret, email):
    assert post(client, delivered(), **auth()).status_code == 200
    email.refresh_from_db()
    assert email.delivery_status == Email.DeliveryStatus.DELIVERED
    assert email.status == Email.Status.SENT  # the contract's status is left as it is
    assert email.delivery_updated_at.isoformat() == "2026-11-24T10:00:00+00:00"
    assert "250 2.0.0 OK" in email.delivery_detail

    assert post(client, complained(), **auth()).status_code == 200
    email.refresh_from_db()
    assert email.delivery_status == Email.DeliveryStatus.COMPLAINED


def test_bounce_is_not_overwritten_by_a_late_delivery(client, webhook_secret, email):
    assert post(client, bounced(), **auth()).status_code == 200
    email.refresh_from_db()
    assert email.delivery_status == Email.DeliveryStatus.BOUNCED
    assert "user unknown" in email.delivery_detail
    assert post(client, delivered(), **auth()).status_code == 200
    email.refresh_from_db()
    assert email.delivery_status == Email.DeliveryStatus.BOUNCED


def test_other_events_and_unknown_messages_change_nothing(client, webhook_secret, email):
    opened = {"RecordType": "Open", "MessageID": "pm-0001", "Recipient": "ada@example.com", "Metadata": {}}
    assert post(client, opened, **auth()).status_code == 200
    assert post(client, delivered("pm-unknown"), **auth()).status_code == 200
    email.refresh_from_db()
    assert email.delivery_status == ""


def test_wrong_or_missing_credentials_are_refused(client, webhook_secret, email):
    assert post(client, bounced(), **auth("hook-user:wrong")).status_code == 400
    assert post(client, bounced()).status_code == 400
    email.refresh_from_db()
    assert email.delivery_status == ""


def test_webhooks_are_off_without_a_secret(client, settings, email):
    settings.ANYMAIL = {}
    response = post(client, bounced(), **auth())
    assert response.status_code == 403
    assert "ANYMAIL_WEBHOOK_SECRET" in response.json()["error"]
    email.refresh_from_db()
    assert email.delivery_status == ""
