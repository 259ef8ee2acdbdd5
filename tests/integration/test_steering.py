"""Steering jobs on real workers, on Redis and RabbitMQ: a paused queue keeps its jobs in the
broker (also one a worker had already taken, also from a worker started later) and, resumed, each
runs once; a running job cancelled is stopped and kept as a dead letter; run now starts a job
waiting for its time."""

from __future__ import annotations

import time
import uuid

import pytest

from jobs.models import OutboxMessage
from jobs.runtime.outbox import enqueue
from jobs.services import queue_pause, queue_resume
from tests.integration import tasks
from tests.integration.conftest import wait_for

pytestmark = [pytest.mark.django_db(transaction=True), pytest.mark.integration]


def ran(redis_client, key: str) -> list[str]:
    return [item.decode() for item in redis_client.lrange(key, 0, -1)]


def test_a_paused_queue_keeps_its_jobs_until_resumed(start_worker, redis_client):
    key = f"pause-{uuid.uuid4().hex}"
    first = start_worker(concurrency=1)
    # Taken by the worker before the pause: it waits in the worker for its countdown.
    held = enqueue(tasks.record_order, args=[key, "held"], queue="low", countdown=4)
    wait_for(lambda: redis_client.llen("low") == 0 and OutboxMessage.objects.get(task_id=held).published_at)
    queue_pause(queue="low", actor="test")
    waiting = enqueue(tasks.record_order, args=[key, "waiting"], queue="low")
    enqueue(tasks.record_order, args=[key, "high"], queue="high")
    wait_for(lambda: "high" in ran(redis_client, key), timeout=15)
    # The held one is given back when it would start; both wait in the broker, neither ran.
    wait_for(lambda: redis_client.llen("low") == 2, timeout=20)
    start_worker(concurrency=1)  # a worker started later does not take them either
    time.sleep(2 * 2.0)  # two of the workers' reads of the paused queues
    assert ran(redis_client, key) == ["high"]
    assert redis_client.llen("low") == 2
    assert set(OutboxMessage.objects.values_list("task_id", flat=True)) == {held, waiting}
    assert first.process.poll() is None

    queue_resume(queue="low", actor="test")
    wait_for(lambda: len(ran(redis_client, key)) == 3, timeout=20)
    time.sleep(1.0)
    assert sorted(ran(redis_client, key)) == ["held", "high", "waiting"]
    wait_for(lambda: not OutboxMessage.objects.exists(), timeout=10)
    assert "pause.queue_paused" in first.log()
    assert "pause.queue_resumed" in first.log()


def test_cancelling_a_running_job_stops_it_and_keeps_it_as_a_dead_letter(start_worker, redis_client):
    from jobs.models import DeadLetter
    from jobs.services import jobs_cancel

    key = f"cancel-{uuid.uuid4().hex}"
    worker = start_worker(concurrency=1)
    task_id = enqueue(tasks.slow, args=[key, 60], queue="normal")
    wait_for(lambda: OutboxMessage.objects.filter(task_id=task_id, state="executing").exists(), timeout=15)
    result = jobs_cancel(task_ids=[task_id], actor="test")
    assert (result.done, result.stopping, result.error) == ([], [task_id], "")

    letter = wait_for(lambda: DeadLetter.objects.filter(task_id=task_id).first(), timeout=15)
    assert (letter.reason, letter.status) == (DeadLetter.Reason.REVOKED, DeadLetter.Status.PENDING)
    wait_for(lambda: not OutboxMessage.objects.filter(task_id=task_id).exists(), timeout=10)
    # The worker goes on with other work; the stopped job does not start again.
    enqueue(tasks.record_order, args=[key + ":next", "next"], queue="normal")
    wait_for(lambda: redis_client.llen(key + ":next") == 1, timeout=15)
    assert int(redis_client.get(key)) == 1
    assert worker.process.poll() is None


def test_on_rabbitmq_a_paused_queue_keeps_its_jobs_until_resumed(
    start_worker, redis_client, rabbitmq_vhost, monkeypatch
):
    import os

    from tests.conftest import reset_broker_pools

    monkeypatch.setenv("CELERY_BROKER_URL", rabbitmq_vhost)
    reset_broker_pools()
    try:
        key = f"pause-{uuid.uuid4().hex}"
        env = {"CELERY_BROKER_URL": rabbitmq_vhost, "JOBS_REDIS_URL": os.environ["REDIS_URL"]}
        start_worker(concurrency=1, extra_env=env)
        held = enqueue(tasks.record_order, args=[key, "held"], queue="low", countdown=4)
        wait_for(lambda: OutboxMessage.objects.get(task_id=held).published_at)
        time.sleep(1.0)  # the worker takes it and holds it for its countdown
        queue_pause(queue="low", actor="test")
        enqueue(tasks.record_order, args=[key, "waiting"], queue="low")
        enqueue(tasks.record_order, args=[key, "high"], queue="high")
        wait_for(lambda: "high" in ran(redis_client, key), timeout=15)
        time.sleep(6.0)  # past the held one's countdown, and two reads of the paused queues
        assert ran(redis_client, key) == ["high"]

        queue_resume(queue="low", actor="test")
        wait_for(lambda: len(ran(redis_client, key)) == 3, timeout=20)
        time.sleep(1.0)
        assert sorted(ran(redis_client, key)) == ["held", "high", "waiting"]
    finally:
        monkeypatch.undo()
        reset_broker_pools()


def test_on_rabbitmq_cancel_stops_a_running_job_run_now_starts_a_scheduled_one_and_retry_a_dead_one(
    start_worker, redis_client, rabbitmq_vhost, monkeypatch
):
    import os
    from datetime import timedelta

    from django.utils import timezone

    from jobs.models import DeadLetter
    from jobs.services import jobs_cancel, jobs_retry, jobs_run_now
    from tests.conftest import reset_broker_pools

    monkeypatch.setenv("CELERY_BROKER_URL", rabbitmq_vhost)
    reset_broker_pools()
    try:
        key = f"steer-{uuid.uuid4().hex}"
        env = {"CELERY_BROKER_URL": rabbitmq_vhost, "JOBS_REDIS_URL": os.environ["REDIS_URL"]}
        start_worker(concurrency=1, extra_env=env)
        running = enqueue(tasks.slow, args=[key, 60], queue="normal")
        wait_for(lambda: OutboxMessage.objects.filter(task_id=running, state="executing").exists(), timeout=20)
        assert jobs_cancel(task_ids=[running], actor="test").stopping == [running]
        letter = wait_for(lambda: DeadLetter.objects.filter(task_id=running).first(), timeout=20)
        assert letter.reason == DeadLetter.Reason.REVOKED

        later = enqueue(tasks.record_order, args=[key + ":later", "later"], queue="normal", countdown=3600)
        assert OutboxMessage.objects.get(task_id=later).not_before > timezone.now() + timedelta(minutes=50)
        assert jobs_run_now(task_ids=[later], actor="test").done == [later]
        wait_for(lambda: redis_client.lrange(key + ":later", 0, -1) == [b"later"], timeout=20)
        assert int(redis_client.get(key)) == 1  # the cancelled job never started again

        # Retry: the dead job (its dead letter) runs again, through RabbitMQ.
        result, requeue = jobs_retry(task_ids=[running], actor="test")
        assert (result.done, requeue.error) == ([running], "")
        wait_for(lambda: int(redis_client.get(key)) == 2, timeout=20)
    finally:
        monkeypatch.undo()
        reset_broker_pools()
