"""Beat sends every due entry of a tick at once, recorded with its messages in one transaction
(jobs/beat.py): fast with thousands of schedules, never a tick twice, never one lost."""

from __future__ import annotations

import json
from datetime import timedelta

import pytest
from celery import current_app
from django.db import OperationalError, connection
from django.test.utils import CaptureQueriesContext
from django.utils import timezone
from django_celery_beat.models import IntervalSchedule, PeriodicTask

from jobs import beat, outbox
from jobs.models import OutboxMessage

pytestmark = pytest.mark.django_db(transaction=True)  # django-celery-beat commits and closes connections


def schedules(count: int, *, due: bool, prefix: str = "s") -> list[PeriodicTask]:
    every_minute, _ = IntervalSchedule.objects.get_or_create(every=60, period=IntervalSchedule.SECONDS)
    last = timezone.now() - timedelta(seconds=61 if due else 1)
    return PeriodicTask.objects.bulk_create(
        PeriodicTask(name=f"{prefix}-{n}", task="jobs.ping", interval=every_minute, last_run_at=last, expire_seconds=50)
        for n in range(count)
    )


def queued(redis_client) -> list[dict]:
    """The messages waiting in the `low` queue (where `jobs.ping` is routed)."""
    return [json.loads(raw)["headers"] for raw in redis_client.lrange("low", 0, -1)]


@pytest.fixture
def scheduler(redis_client):
    return beat.LockedDatabaseScheduler(app=current_app, lazy=True)


def test_a_tick_sends_every_due_entry_with_a_few_statements(scheduler, redis_client):
    schedules(60, due=True)
    schedules(5, due=False, prefix="later")
    before = timezone.now()

    with CaptureQueriesContext(connection) as queries:
        scheduler.tick()

    sent = queued(redis_client)
    assert sorted(h["periodic_task_name"] for h in sent) == sorted(f"s-{n}" for n in range(60))
    assert all(h["jobs_ledger"] == 1 and h["expires"] for h in sent)
    # 60 sends cost a fixed handful of statements, not two or three per entry as before.
    assert len(queries) < 20, [q["sql"][:80] for q in queries]
    ran = PeriodicTask.objects.filter(name__startswith="s-")
    assert ran.filter(last_run_at__gte=before, total_run_count=1).count() == 60
    assert PeriodicTask.objects.filter(name__startswith="later-", total_run_count=0).count() == 5
    # Each message is in the ledger, published, until a worker finishes it.
    assert OutboxMessage.objects.filter(task_name="jobs.ping", published_at__isnull=False).count() == 60

    scheduler.tick()  # nothing more is due
    assert len(queued(redis_client)) == 60


def test_a_tick_the_database_refuses_sends_nothing_and_the_next_sends_all(scheduler, redis_client, caplog):
    schedules(10, due=True)

    def refuse(execute, sql, params, many, context):
        if sql.lstrip().upper().startswith("UPDATE"):
            raise OperationalError("the database system is shutting down")
        return execute(sql, params, many, context)

    with connection.execute_wrapper(refuse):
        assert scheduler.tick() == beat.RETRY_AFTER_ERROR
    assert "beat.tick_failed" in caplog.text
    assert queued(redis_client) == []
    assert not OutboxMessage.objects.exists()

    scheduler.tick()  # the schedule is read again: every entry is still due, and sent once
    assert len(queued(redis_client)) == 10
    assert PeriodicTask.objects.filter(total_run_count=1).count() == 10


def test_a_tick_the_broker_refuses_is_recorded_and_left_to_the_ledger(scheduler, redis_client, monkeypatch):
    schedules(3, due=True)
    real_publish = outbox.publish

    def broker_down(message, *, producer=None):
        raise ConnectionError("Error 111 connecting to the broker")

    monkeypatch.setattr(outbox, "publish", broker_down)
    scheduler.tick()
    assert queued(redis_client) == []
    # The runs are recorded (a standby would not send them again) and the messages wait.
    assert PeriodicTask.objects.filter(total_run_count=1).count() == 3
    waiting = OutboxMessage.objects.filter(published_at__isnull=True)
    assert waiting.count() == 3
    assert not waiting.exclude(claim="").exists()  # released for the relay

    monkeypatch.setattr(outbox, "publish", real_publish)
    published, error = outbox.ledger_publish_now(list(waiting.values_list("task_id", flat=True)))
    assert (published, error) == (3, "")
    assert len(queued(redis_client)) == 3


def test_an_expired_tick_in_the_ledger_is_forgotten_not_republished(redis_client):
    """Skipped by the worker (too late), it must not stay in the ledger: the sweeper would take
    it for lost and publish it again, to expire again."""
    from jobs.worker import JobRequest

    message = OutboxMessage.objects.create(task_name="jobs.ping", task_id="tick-1", published_at=timezone.now())
    request = JobRequest.__new__(JobRequest)
    request._request_dict = {"id": message.task_id, "periodic_task_name": "jobs: ping", "jobs_ledger": 1}
    request.id = message.task_id
    request._ledger_forget()
    assert not OutboxMessage.objects.filter(task_id="tick-1").exists()
