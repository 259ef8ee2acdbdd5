"""The retry policy and dead letters with a real worker and a real Redis."""

from __future__ import annotations

import itertools
import json
import re
import subprocess
import sys
import time
import uuid

import pytest

from config.env import BASE_DIR
from jobs.models import DeadLetter
from jobs.services import dead_letters_requeue
from tests.integration import tasks
from tests.integration.conftest import process_env, wait_for

pytestmark = [pytest.mark.django_db(transaction=True), pytest.mark.integration]

FAST_RETRIES = {"TASK_RETRY_BACKOFF_BASE": "0.2", "TASK_RETRY_BACKOFF_MAX": "10", "TASK_MAX_RETRIES": "3"}


def key() -> str:
    return f"t-{uuid.uuid4().hex}"


def test_transient_error_succeeds_on_retry_with_exact_delays(start_worker, redis_client):
    start_worker(extra_env=FAST_RETRIES)
    k = key()
    result = tasks.flaky.delay(k, 3)
    assert result.get(timeout=30) == 4
    times = [float(t) for t in redis_client.lrange(f"{k}:times", 0, -1)]
    gaps = [b - a for a, b in itertools.pairwise(times)]
    # 0.2, 0.4, 0.8 s plus at most 10 % jitter (and the worker's own scheduling latency).
    for gap, expected in zip(gaps, [0.2, 0.4, 0.8], strict=True):
        assert expected <= gap < expected * 1.1 + 0.5, gaps
    assert not DeadLetter.objects.exists()


def test_exhausted_retries_make_one_dead_letter(start_worker, redis_client):
    start_worker(extra_env=FAST_RETRIES)
    k = key()
    tasks.flaky.apply_async((k, 100), headers={"request_id": "rid-exhaust"})
    row = wait_for(lambda: DeadLetter.objects.filter(task_name="tests.flaky").first())
    assert int(redis_client.get(k)) == 4  # the first run and three retries
    assert row.reason == DeadLetter.Reason.RETRIES_EXHAUSTED
    assert row.retries == 3
    assert row.exception_type == "TransientError"
    assert row.args == [k, 100]
    assert row.queue == "normal"
    assert row.request_id == "rid-exhaust"
    assert "attempt 4 failed" in row.traceback
    assert DeadLetter.objects.count() == 1


def test_permanent_error_goes_straight_to_a_dead_letter(start_worker, redis_client):
    start_worker(extra_env=FAST_RETRIES)
    k = key()
    tasks.permanent.delay(k, password="hunter2", options={"api_key": "abc", "size": 3})
    row = wait_for(lambda: DeadLetter.objects.filter(task_name="tests.permanent").first())
    assert int(redis_client.get(k)) == 1
    assert row.reason == DeadLetter.Reason.PERMANENT_ERROR
    assert row.retries == 0
    assert row.kwargs == {"password": "***", "options": {"api_key": "***", "size": 3}}
    assert row.redacted is True


def test_unexpected_error_is_not_retried(start_worker, redis_client):
    start_worker(extra_env=FAST_RETRIES)
    k = key()
    tasks.unexpected.delay(k)
    row = wait_for(lambda: DeadLetter.objects.filter(task_name="tests.unexpected").first())
    assert row.reason == DeadLetter.Reason.UNEXPECTED_ERROR
    assert row.exception_type == "KeyError"
    assert int(redis_client.get(k)) == 1


def test_requeued_job_that_dies_again_reuses_its_row_and_recovers(start_worker, redis_client):
    start_worker(extra_env=FAST_RETRIES)
    k = key()
    tasks.permanent.delay(k)
    row = wait_for(lambda: DeadLetter.objects.filter(task_name="tests.permanent").first())

    result = dead_letters_requeue(dead_letters=DeadLetter.objects.filter(pk=row.pk), actor="ops")
    assert result.count == 1
    wait_for(lambda: DeadLetter.objects.get(pk=row.pk).failure_count == 2)
    row.refresh_from_db()
    assert row.status == DeadLetter.Status.PENDING
    assert row.requeue_count == 1
    assert row.task_id == result.requeued[0][1]
    assert DeadLetter.objects.count() == 1

    redis_client.set(f"{k}:healed", 1)
    dead_letters_requeue(dead_letters=DeadLetter.objects.filter(pk=row.pk), actor="ops")
    wait_for(lambda: int(redis_client.get(k)) == 3)
    time.sleep(0.5)
    row.refresh_from_db()
    assert row.status == DeadLetter.Status.REQUEUED
    assert row.failure_count == 2
    assert list(row.events.values_list("action", flat=True).order_by("id")) == [
        "failed",
        "requeued",
        "failed",
        "requeued",
    ]


def test_task_that_kills_its_worker_ends_in_quarantine(start_worker, redis_client):
    start_worker(extra_env={"JOBS_WORKER_LOST_LIMIT": "3"}, concurrency=1)
    k = key()
    tasks.crash.delay(k)
    row = wait_for(lambda: DeadLetter.objects.filter(task_name="tests.crash").first(), timeout=60)
    assert int(redis_client.get(k)) == 3  # three attempts died; the fourth delivery was stopped
    assert row.reason == DeadLetter.Reason.WORKER_LOST
    assert row.exception_type == "Quarantined"


def test_pickled_message_is_refused_and_dead_lettered(start_worker, redis_client):
    worker = start_worker()
    publish_raw(
        b"\x80\x04\x95 not really a pickle",
        "application/x-python-serialize",
        "binary",
        task_id="bad-1",
        task="tests.permanent",
    )
    row = wait_for(lambda: DeadLetter.objects.filter(reason=DeadLetter.Reason.UNDECODABLE).first())
    assert row.task_id == "bad-1"
    assert "x-python-serialize" in row.raw_message
    # The worker keeps consuming after it.
    assert tasks.flaky.delay(key(), 0).get(timeout=30) == 1
    assert worker.process.poll() is None
    assert logged_dead_letter(worker, "bad-1")["reason"] == "undecodable"


def publish_raw(body: bytes, content_type: str, encoding: str, *, task_id: str, task: str) -> None:
    """A message straight to the `normal` queue, as a foreign or broken producer would send it."""
    from config.celery import app

    with app.producer_or_acquire() as producer:
        producer.publish(
            body,
            routing_key="normal",
            exchange="normal",
            serializer=None,
            content_type=content_type,
            content_encoding=encoding,
            headers={"id": task_id, "task": task},
        )


def logged_dead_letter(worker, task_id: str) -> dict:
    lines = [json.loads(line) for line in worker.log().splitlines() if line.strip()]
    return next(
        line for line in lines if line["event"] == "dead_letter.created" and line.get("dead_letter_task_id") == task_id
    )


def test_malformed_json_message_is_refused_logged_and_dead_lettered(start_worker, redis_client):
    worker = start_worker()
    publish_raw(b'{"args": [1], "kwargs": {', "application/json", "utf-8", task_id="bad-json-1", task="tests.flaky")
    row = wait_for(lambda: DeadLetter.objects.filter(task_id="bad-json-1").first())
    assert row.reason == DeadLetter.Reason.UNDECODABLE
    assert row.status == DeadLetter.Status.PENDING
    assert logged_dead_letter(worker, "bad-json-1")["level"] == "ERROR"
    assert tasks.flaky.delay(key(), 0).get(timeout=30) == 1
    assert worker.process.poll() is None


def manage(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "manage.py", *args],
        cwd=BASE_DIR,
        env=process_env(),
        capture_output=True,
        text=True,
        timeout=60,
    )


def test_requeue_dead_command_as_a_process(start_worker, redis_client):
    start_worker(extra_env=FAST_RETRIES)
    k = key()
    tasks.permanent.delay(k)
    row = wait_for(lambda: DeadLetter.objects.filter(task_name="tests.permanent").first())

    refused = manage("requeue_dead", str(row.pk), "999999")
    assert refused.returncode == 1
    assert refused.stderr.strip().splitlines()[-1] == (
        "CommandError: Unknown dead letter id(s): 999999. Nothing was requeued."
    )  # one readable line (after the system checks' warnings), no traceback
    assert "Traceback" not in refused.stderr
    dry = manage("requeue_dead", "--task", "tests.permanent", "--dry-run")
    assert dry.returncode == 0
    assert "Would requeue 1 dead letter(s)" in dry.stdout
    assert DeadLetter.objects.get(pk=row.pk).status == DeadLetter.Status.PENDING

    redis_client.set(f"{k}:healed", 1)
    done = manage("requeue_dead", str(row.pk))
    assert done.returncode == 0, done.stderr
    wait_for(lambda: int(redis_client.get(k)) == 2)  # the worker ran the requeued task, healed
    row.refresh_from_db()
    assert row.status == DeadLetter.Status.REQUEUED
    assert row.requeued_by.startswith("cli:")


def test_soft_time_limit_is_dead_lettered(start_worker, redis_client):
    start_worker()
    k = key()
    tasks.slow.apply_async((k, 30), soft_time_limit=0.5, time_limit=20)
    row = wait_for(lambda: DeadLetter.objects.filter(task_name="tests.slow").first())
    assert row.reason == DeadLetter.Reason.TIME_LIMIT
    assert row.exception_type == "SoftTimeLimitExceeded"
    assert int(redis_client.get(k)) == 1


def test_hard_time_limit_is_dead_lettered_with_its_queue(start_worker, redis_client):
    start_worker()
    k = key()
    # The prefork pool always arms the soft limit first (a hard limit below it would only
    # fire together with it), so the task swallows the soft one and the pool must kill it.
    tasks.stubborn.apply_async((k, 30), soft_time_limit=0.5, time_limit=1.5, headers={"request_id": "rid-hard"})
    row = wait_for(lambda: DeadLetter.objects.filter(task_name="tests.stubborn").first())
    assert redis_client.get(f"{k}:soft") == b"1"
    assert row.reason == DeadLetter.Reason.TIME_LIMIT
    assert row.exception_type == "TimeLimitExceeded"
    assert row.queue == "normal"
    assert row.request_id == "rid-hard"
    # The pool child and the worker's main process both report it: still one row.
    assert DeadLetter.objects.count() == 1
    assert row.failure_count == 1


def test_unknown_task_is_dead_lettered(start_worker):
    from config.celery import app

    start_worker()
    app.send_task("no.such.task", args=[1], queue="normal", task_id="unknown-1")
    row = wait_for(lambda: DeadLetter.objects.filter(task_name="no.such.task").first())
    assert row.reason == DeadLetter.Reason.UNDECODABLE
    assert row.task_id == "unknown-1"
    assert "unknown task" in row.exception_message


def _digests_received(worker) -> set[str]:
    """Ids of the alert digests the worker received (a retry keeps its id; a new digest has one)."""
    return set(re.findall(r"Task jobs\.dead_letter_digest\[([0-9a-f-]+)\] received", worker.log()))


def test_a_digest_that_fails_for_good_is_dead_lettered_without_alerting_again(start_worker, redis_client):
    """The alert digest itself failing for good on a real worker (its mail server is down) ends in
    a dead letter, through the same failure path as any task, and schedules no digest: no alert
    loop. Another task's dead letter on the same worker does schedule one."""
    from jobs import alerts
    from jobs.tasks import dead_letter_digest
    from tests.jobs.factories import DeadLetterFactory

    mail_down = {"DEAD_LETTER_ALERT_EMAILS": "ops@example.com", "EMAIL_URL": "smtp://127.0.0.1:1"}
    worker = start_worker(extra_env={**FAST_RETRIES, **mail_down})
    DeadLetterFactory()  # something for the digest to report (written here: no alert from this process)
    digest = dead_letter_digest.apply_async(queue="high")
    row = wait_for(lambda: DeadLetter.objects.filter(task_name="jobs.dead_letter_digest").first(), timeout=60)
    assert row.task_id == digest.id
    assert row.retries == 2  # its own retry limit, spent on the refused connection
    time.sleep(2)  # a digest scheduled by that dead letter would be received (and held) by now
    assert _digests_received(worker) == {digest.id}
    assert alerts.cache.get(alerts.LOCK_KEY) is None  # and no alert window was opened

    tasks.permanent.delay(key())  # another task's dead letter alerts
    wait_for(lambda: len(_digests_received(worker)) == 2, timeout=30)
    assert alerts.cache.get(alerts.LOCK_KEY) is not None
