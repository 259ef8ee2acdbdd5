"""The dead-letter API: staff with the model's permissions list, show, requeue and discard."""

from __future__ import annotations

import base64
import json
from datetime import timedelta

import pytest
from django.contrib.auth import get_user_model
from django.contrib.auth.models import Permission
from django.utils import timezone

from jobs.models import DeadLetter
from tests.jobs.factories import DeadLetterFactory

pytestmark = pytest.mark.django_db

BASE = "/api/jobs/dead-letters/"


def basic(username: str) -> dict[str, str]:
    """HTTP basic auth of a test user (every one has the password "pw")."""
    return {"HTTP_AUTHORIZATION": "Basic " + base64.b64encode(f"{username}:pw".encode()).decode()}


@pytest.fixture
def ops():
    """Staff allowed to view and change dead letters, nothing else."""
    user = get_user_model().objects.create_user("ops", password="pw", is_staff=True)
    user.user_permissions.set(
        Permission.objects.filter(content_type__app_label="jobs", codename__in=["view_deadletter", "change_deadletter"])
    )
    return basic("ops")


@pytest.fixture
def viewer():
    user = get_user_model().objects.create_user("viewer", password="pw", is_staff=True)
    user.user_permissions.set(Permission.objects.filter(content_type__app_label="jobs", codename="view_deadletter"))
    return basic("viewer")


def post(client, url: str, body=None, **auth):
    """A JSON POST; CONTENT_TYPE keeps the header on an empty body (the test client drops it), as
    every write must say `application/json` (jobs.auth)."""
    data = json.dumps(body) if body is not None else ""
    return client.post(url, data=data, content_type="application/json", CONTENT_TYPE="application/json", **auth)


def test_list_newest_first_with_filters_and_keyset_pages(client, ops):
    old = DeadLetterFactory(task_name="a.task", failed_at=timezone.now() - timedelta(days=2))
    rows = DeadLetterFactory.create_batch(3, task_name="b.task")
    DeadLetterFactory(task_name="b.task", status=DeadLetter.Status.DISCARDED)

    first = client.get(BASE, {"task": "b.task", "status": "pending", "limit": 2}, **ops).json()
    assert [r["id"] for r in first["results"]] == [rows[2].pk, rows[1].pk]
    assert first["results"][0]["exception_type"] == "PermanentError"
    second = client.get(first["next"], **ops).json()
    assert [r["id"] for r in second["results"]] == [rows[0].pk]
    assert second["next"] is None

    since = (timezone.now() - timedelta(days=1)).isoformat()
    recent = client.get(BASE, {"since": since}, **ops).json()["results"]
    assert old.pk not in {r["id"] for r in recent}
    assert len(recent) == 4


@pytest.mark.parametrize(
    ("query", "field"),
    [
        ({"status": "lost"}, "status"),
        ({"limit": "0"}, "limit"),
        ({"limit": "x"}, "limit"),
        ({"since": "soon"}, "since"),
        ({"task": "e\x00x"}, "task"),  # PostgreSQL refused the NUL with a 500 (found by the fuzz test)
    ],
)
def test_list_refuses_bad_queries_with_400_json(client, ops, query, field):
    response = client.get(BASE, query, **ops)
    assert response.status_code == 400
    assert response.json()["field"] == field


def test_detail_has_arguments_traceback_and_trail(client, ops):
    row = DeadLetterFactory(kwargs={"token": "***", "n": 1}, redacted=True)
    body = client.get(f"{BASE}{row.pk}/", **ops).json()
    assert body["kwargs"] == {"token": "***", "n": 1}
    assert body["redacted"] is True
    assert body["traceback"].startswith("Traceback")
    assert body["events"] == []
    assert client.get(f"{BASE}999999/", **ops).status_code == 404


def test_groups(client, ops):
    DeadLetterFactory.create_batch(2, task_name="mailer.send_email", exception_type="SMTPDataError")
    DeadLetterFactory(task_name="thumbnails.generate", exception_type="CorruptImage")
    groups = client.get(f"{BASE}groups/", **ops).json()["groups"]
    assert [(g["task_name"], g["exception_type"], g["count"]) for g in groups] == [
        ("mailer.send_email", "SMTPDataError", 2),
        ("thumbnails.generate", "CorruptImage", 1),
    ]


def test_requeue_one_publishes_it_and_records_the_actor(client, ops, redis_client):
    row = DeadLetterFactory()
    response = post(client, f"{BASE}{row.pk}/requeue/", **ops)
    assert response.status_code == 202
    task_id = response.json()["requeued"][0]["task_id"]
    assert redis_client.llen("normal") == 1
    row.refresh_from_db()
    assert (row.status, row.requeued_by, row.requeued_task_id) == ("requeued", "api:ops", task_id)
    again = post(client, f"{BASE}{row.pk}/requeue/", **ops)
    assert again.status_code == 409
    assert again.json()["current_status"] == "requeued"
    assert redis_client.llen("normal") == 1


def test_requeue_while_the_broker_is_down_is_503_and_the_job_waits_in_the_outbox(client, ops, dead_broker):
    from jobs.models import OutboxMessage

    row = DeadLetterFactory()
    response = post(client, f"{BASE}{row.pk}/requeue/", **ops)
    assert response.status_code == 503
    body = response.json()
    assert "publishing failed" in body["error"]
    assert [item["id"] for item in body["waiting"]] == [row.pk]
    assert OutboxMessage.objects.get(task_id=body["waiting"][0]["task_id"]).published_at is None


def test_discard_one(client, ops):
    row = DeadLetterFactory()
    assert post(client, f"{BASE}{row.pk}/discard/", **ops).json() == {"id": row.pk, "status": "discarded"}
    row.refresh_from_db()
    assert row.discarded_by == "api:ops"
    assert post(client, f"{BASE}{row.pk}/discard/", **ops).status_code == 409
    assert post(client, f"{BASE}999999/discard/", **ops).status_code == 404


def test_requeue_many_by_selector_with_a_limit_oldest_first(client, ops, redis_client):
    rows = [DeadLetterFactory(task_name="b.task", failed_at=timezone.now() - timedelta(minutes=m)) for m in (1, 3, 2)]
    DeadLetterFactory(task_name="other.task")
    response = post(client, f"{BASE}requeue/", {"task": "b.task", "limit": 2}, **ops)
    assert response.status_code == 202
    assert sorted(r["id"] for r in response.json()["requeued"]) == sorted([rows[1].pk, rows[2].pk])
    assert redis_client.llen("normal") == 2


def test_requeue_many_by_ids(client, ops, redis_client):
    rows = DeadLetterFactory.create_batch(2)
    response = post(client, f"{BASE}requeue/", {"ids": [r.pk for r in rows]}, **ops)
    assert response.status_code == 202
    assert DeadLetter.objects.filter(status="requeued").count() == 2
    unknown = post(client, f"{BASE}requeue/", {"ids": [rows[0].pk, 999999]}, **ops)
    assert unknown.status_code == 404
    assert unknown.json()["ids"] == [999999]


@pytest.mark.parametrize(
    ("body", "status", "field"),
    [
        ({}, 400, "ids"),
        ({"ids": [1], "task": "x"}, 400, "ids"),
        ({"ids": []}, 400, "ids"),
        ({"ids": ["1"]}, 400, "ids"),
        ({"all": True, "limit": 5000}, 400, "limit"),
        ({"task": 3}, 400, "task"),
        ({"since": "yesterday"}, 400, "since"),
        ({"exception": "Value\x00Error"}, 400, "exception"),
        ({"task": "no.such.task"}, 404, None),
    ],
)
def test_requeue_many_refuses_and_requeues_nothing(client, ops, redis_client, body, status, field):
    DeadLetterFactory()
    response = post(client, f"{BASE}requeue/", body, **ops)
    assert response.status_code == status
    assert response.json().get("field") == field
    assert DeadLetter.objects.filter(status="pending").count() == 1
    assert redis_client.llen("normal") == 0


def test_requeue_many_needs_a_json_object(client, ops):
    assert post(client, f"{BASE}requeue/", [1, 2], **ops).status_code == 400
    response = client.post(f"{BASE}requeue/", data="{not json", content_type="application/json", **ops)
    assert response.status_code == 400


def test_permissions_and_authentication(client, viewer, redis_client):
    row = DeadLetterFactory()
    get_user_model().objects.create_user("staff", password="pw", is_staff=True)
    get_user_model().objects.create_user("plain", password="pw")
    assert client.get(BASE).status_code == 401
    assert client.get(BASE, **basic("plain")).status_code == 403
    assert client.get(BASE, **basic("staff")).status_code == 403  # staff, but no permission on dead letters
    assert client.get(BASE, **viewer).status_code == 200
    refused = post(client, f"{BASE}{row.pk}/requeue/", **viewer)
    assert refused.status_code == 403
    assert refused.json()["error"] == "permission jobs.change_deadletter required"
    assert client.get(f"{BASE}{row.pk}/requeue/", **viewer).status_code == 405
    assert redis_client.llen("normal") == 0


def test_session_writes_need_the_csrf_token(viewer):
    from django.test import Client

    get_user_model().objects.create_superuser("root", password="pw")
    row = DeadLetterFactory()
    browser = Client(enforce_csrf_checks=True)
    browser.login(username="root", password="pw")
    assert browser.get(f"{BASE}{row.pk}/").status_code == 200
    response = post(browser, f"{BASE}{row.pk}/discard/")
    assert response.status_code == 403
    assert response.json()["error"] == "CSRF verification failed"


@pytest.mark.parametrize("bad", [0, -1, 2**63, 2**64 + 1])
def test_requeue_many_refuses_numbers_that_are_no_id(client, ops, bad):
    """A number past a bigint made SQLite raise OverflowError: a 500 (found by the fuzz test)."""
    response = post(client, f"{BASE}requeue/", {"ids": [bad]}, **ops)
    assert response.status_code == 400
    assert response.json()["field"] == "ids"
