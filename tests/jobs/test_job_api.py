"""The jobs API: staff with `jobs.view_job` see every job of the table by state, with its
attempts; with `jobs.change_job` they cancel, run now, retry and pause queues, each audited."""

from __future__ import annotations

from datetime import timedelta

import pytest
from django.contrib.auth import get_user_model
from django.utils import timezone

from jobs.models import DeadLetter, JobAction, JobAttempt, OutboxMessage, PausedQueue
from jobs.runtime import store
from tests.conftest import grant
from tests.jobs.factories import DeadLetterFactory
from tests.jobs.test_dead_letter_api import basic, post

pytestmark = pytest.mark.django_db

BASE = "/api/jobs/jobs/"
State = OutboxMessage.State


@pytest.fixture
def ops():
    user = get_user_model().objects.create_user("ops", password="pw", is_staff=True)
    grant(user, "jobs.view_job", "jobs.change_job")
    return basic("ops")


@pytest.fixture
def viewer():
    user = get_user_model().objects.create_user("viewer", password="pw", is_staff=True)
    grant(user, "jobs.view_job")
    return basic("viewer")


def add(task_id: str, state: str = State.AVAILABLE, **fields) -> OutboxMessage:
    options = fields.pop("options", {"queue": "normal", "headers": {"request_id": "req-1"}})
    row = store.job_add(
        task_name=fields.pop("task_name", "mailer.send_email"),
        task_id=task_id,
        args=fields.pop("args", [1]),
        kwargs=fields.pop("kwargs", {}),
        options=options,
        state=state,
        not_before=fields.pop("not_before", None),
        retries=fields.pop("retries", 0),
    )
    if fields:
        OutboxMessage.objects.filter(pk=row.pk).update(**fields)
    return row


def test_jobs_by_state_newest_first_with_filters_and_keyset_pages(client, ops):
    due = timezone.now() + timedelta(hours=1)
    add("s-1", State.SCHEDULED, not_before=due)
    add("q-1")
    add("q-2", options={"queue": "low", "headers": {"request_id": "req-2"}})
    add("r-1", State.EXECUTING, lease_owner="w1@host:41:abc", lease_until=timezone.now(), started_at=timezone.now())
    add("t-1", State.RETRYABLE, not_before=due, retries=2)
    JobAttempt.objects.create(task_id="t-1", task_name="mailer.send_email", attempt=1, outcome="retried", error="E: x")

    everything = client.get(BASE, **ops).json()
    assert [job["id"] for job in everything["results"]] == ["t-1", "r-1", "q-2", "q-1", "s-1"]
    by_id = {job["id"]: job for job in everything["results"]}
    assert by_id["s-1"]["state"] == "scheduled"
    assert by_id["s-1"]["due_at"] == due.isoformat()
    assert by_id["r-1"]["state"] == "running"
    assert by_id["r-1"]["worker"] == "w1@host:41"
    assert (by_id["t-1"]["state"], by_id["t-1"]["attempt"], by_id["t-1"]["last_error"]) == ("retrying", 3, "E: x")
    assert by_id["t-1"]["max_attempts"] == 6  # the email task's 5 retries and the first
    assert by_id["q-2"]["queue"] == "low"
    assert by_id["q-1"]["request_id"] == "req-1"

    queued = client.get(BASE, {"state": "queued", "limit": 1}, **ops).json()
    assert [job["id"] for job in queued["results"]] == ["q-2"]
    assert [job["id"] for job in client.get(queued["next"], **ops).json()["results"]] == ["q-1"]
    assert [j["id"] for j in client.get(BASE, {"queue": "low"}, **ops).json()["results"]] == ["q-2"]
    assert [j["id"] for j in client.get(BASE, {"request_id": "req-2"}, **ops).json()["results"]] == ["q-2"]


def test_counts_are_exact_when_small_and_estimated_when_large(client, ops, monkeypatch):
    from jobs import selectors

    add("c-1")
    add("c-2", State.SCHEDULED, not_before=timezone.now() + timedelta(hours=1))
    body = client.get(BASE + "counts/", **ops).json()
    assert body == {
        "counts": {"scheduled": 1, "queued": 1, "throttled": 0, "running": 0, "retrying": 0, "dead": 0},
        "estimated": [],
    }
    monkeypatch.setattr(selectors, "EXACT_UP_TO", 0)
    monkeypatch.setattr(selectors, "COUNT_CAP", 0)
    estimated = client.get(BASE + "counts/", **ops).json()
    assert estimated["estimated"] == ["queued", "scheduled"]
    assert estimated["counts"]["queued"] >= 1


def test_search_finds_a_job_by_its_arguments(client, ops):
    add("a-1", args=["invoice-4242"])
    add("a-2", kwargs={"order": "invoice-77"})
    add("a-3")
    assert [j["id"] for j in client.get(BASE, {"q": "invoice"}, **ops).json()["results"]] == ["a-2", "a-1"]


def test_dead_jobs_are_their_pending_dead_letters(client, ops):
    letter = DeadLetterFactory(task_id="d-1", request_id="req-9")
    DeadLetterFactory(task_id="d-2", status=DeadLetter.Status.DISCARDED)
    results = client.get(BASE, {"state": "dead"}, **ops).json()["results"]
    assert [(j["id"], j["state"], j["dead_letter_id"]) for j in results] == [("d-1", "dead", letter.pk)]
    assert client.get(BASE + "d-1/", **ops).json()["state"] == "dead"


def test_a_job_shows_its_arguments_redacted_and_its_attempts(client, ops):
    add("j-1", State.RETRYABLE, kwargs={"password": "hunter2", "to": "a@example.com"}, retries=1)
    JobAttempt.objects.create(task_id="j-1", task_name="mailer.send_email", attempt=0, outcome="retried", error="E1")
    body = client.get(BASE + "j-1/", **ops).json()
    assert body["kwargs"]["password"] != "hunter2"
    assert body["kwargs"]["to"] == "a@example.com"
    assert [(a["attempt"], a["outcome"], a["error"]) for a in body["attempts"]] == [(1, "retried", "E1")]
    assert client.get(BASE + "nope/", **ops).status_code == 404


@pytest.mark.parametrize(
    ("query", "field"), [({"state": "lost"}, "state"), ({"limit": "0"}, "limit"), ({"queue": "a\x00"}, "queue")]
)
def test_bad_queries_are_400_json(client, ops, query, field):
    response = client.get(BASE, query, **ops)
    assert response.status_code == 400
    assert response.json()["field"] == field


def test_cancel_a_queued_job_it_never_runs_and_the_audit_says_who(client, ops):
    add("c-1", args=["x"])
    response = post(client, BASE + "c-1/cancel/", **ops)
    assert response.status_code == 200, response.content
    assert response.json() == {"id": "c-1", "state": "cancelled"}
    assert not OutboxMessage.objects.filter(task_id="c-1").exists()
    # a copy of its message that reaches a worker now finds nothing to start
    assert store.job_start("c-1", retries=0, hostname="w") is store.Skip.FINISHED
    kept = DeadLetter.objects.get(task_id="c-1")
    assert (kept.reason, kept.status, kept.discarded_by, kept.args) == ("cancelled", "discarded", "api:ops", ["x"])
    audit = JobAction.objects.get()
    assert (audit.action, audit.actor, audit.count, audit.task_ids) == ("cancel", "api:ops", 1, ["c-1"])

    again = post(client, BASE + "c-1/cancel/", **ops)
    assert again.status_code == 404


def test_actions_a_state_does_not_allow_are_409_naming_it(client, ops, django_user_model):
    grant(django_user_model.objects.get(username="ops"), "jobs.change_deadletter")
    add("q-1")
    run_now = post(client, BASE + "q-1/run-now/", **ops)
    assert run_now.status_code == 409
    assert run_now.json()["error"] == "job q-1: the job is queued, not scheduled or retrying"
    retry = post(client, BASE + "q-1/retry/", **ops)
    assert retry.status_code == 409
    assert "not dead" in retry.json()["error"]
    assert OutboxMessage.objects.get(task_id="q-1").state == State.AVAILABLE


def test_run_now_publishes_a_scheduled_job_at_once(client, ops, redis_client):
    add("n-1", State.SCHEDULED, not_before=timezone.now() + timedelta(days=1), task_name="jobs.health_check")
    response = post(client, BASE + "n-1/run-now/", **ops)
    assert response.json() == {"id": "n-1", "state": "queued"}
    row = OutboxMessage.objects.get(task_id="n-1")
    assert (row.state, row.not_before) == (State.AVAILABLE, None)
    assert row.published_at is not None  # the broker took it now, not at tomorrow's relay
    assert JobAction.objects.get().action == "run_now"


def test_retry_takes_the_permission_to_change_jobs(client, viewer):
    DeadLetterFactory(task_id="d-1", task_name="jobs.health_check", args=[], kwargs={})
    response = post(client, BASE + "d-1/retry/", **viewer)
    assert response.status_code == 403
    assert response.json()["permission"] == "jobs.change_job"
    assert DeadLetter.objects.get(task_id="d-1").status == DeadLetter.Status.PENDING


def test_a_search_never_finds_a_job_by_its_secrets(client, ops):
    add("s-1", kwargs={"password": "hunter2xyz", "to": "someone"})
    add("s-2", args=[{"nested": {"api_key": "k3y-abc"}}, "visible"])
    assert client.get(BASE, {"q": "hunter"}, **ops).json()["results"] == []
    assert client.get(BASE, {"q": "k3y"}, **ops).json()["results"] == []
    assert client.get(BASE, {"q": "someone"}, **ops).json()["results"] == []  # such a job: by its id only
    assert [j["id"] for j in client.get(BASE, {"q": "s-1"}, **ops).json()["results"]] == ["s-1"]


def test_retry_requeues_a_dead_job(client, ops, redis_client, django_user_model):
    grant(django_user_model.objects.get(username="ops"), "jobs.change_deadletter")
    DeadLetterFactory(task_id="d-1", task_name="jobs.health_check", args=[], kwargs={})
    response = post(client, BASE + "d-1/retry/", **ops)
    assert response.status_code == 200, response.content
    body = response.json()
    assert body["state"] == "queued"
    assert body["new_id"]
    assert DeadLetter.objects.get(task_id="d-1").status == DeadLetter.Status.REQUEUED
    assert JobAction.objects.get().task_ids == ["d-1"]


def test_a_view_only_user_changes_nothing(client, viewer):
    add("v-1")
    assert client.get(BASE, **viewer).status_code == 200
    for action in ("cancel", "run-now", "retry"):
        response = post(client, f"{BASE}v-1/{action}/", **viewer)
        assert response.status_code == 403
        assert response.json()["permission"] == "jobs.change_job"
    assert post(client, "/api/jobs/queues/normal/pause/", **viewer).status_code == 403
    assert OutboxMessage.objects.filter(task_id="v-1").exists()
    assert not PausedQueue.objects.exists()
    assert not JobAction.objects.exists()


def test_staff_without_view_job_sees_nothing(client):
    get_user_model().objects.create_user("plain", password="pw", is_staff=True)
    response = client.get(BASE, **basic("plain"))
    assert response.status_code == 403
    assert response.json()["permission"] == "jobs.view_job"


def test_pause_and_resume_a_queue_audited(client, ops):
    paused = post(client, "/api/jobs/queues/low/pause/", **ops)
    assert paused.json() == {"queue": "low", "paused": True}
    assert PausedQueue.objects.get().paused_by == "api:ops"
    listed = {q["queue"]: q for q in client.get("/api/jobs/queues/", **ops).json()["queues"]}
    assert listed["low"]["paused"]
    assert not listed["high"]["paused"]
    assert post(client, "/api/jobs/queues/low/resume/", **ops).json() == {"queue": "low", "paused": False}
    assert not PausedQueue.objects.exists()
    assert list(JobAction.objects.order_by("pk").values_list("action", "target")) == [
        ("pause_queue", "low"),
        ("resume_queue", "low"),
    ]
    unknown = post(client, "/api/jobs/queues/nope/pause/", **ops)
    assert unknown.status_code == 404
    assert "unknown queue" in unknown.json()["error"]


def test_a_cross_site_cancel_is_refused_and_nothing_done(client, ops):
    add("x-1")
    response = client.post(BASE + "x-1/cancel/", data="", content_type="text/plain", **ops)
    assert response.status_code == 415
    assert OutboxMessage.objects.filter(task_id="x-1").exists()
