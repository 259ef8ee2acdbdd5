"""Django's Tasks API on a real worker and a real Redis: what Django's documentation and the
backport's test-suite expect of a backend (status, return values, errors of every attempt,
attempts and worker ids, timestamps, context, signals in the logs), and what `jobs` adds (retries
with backoff, dead letters that `requeue_dead` replays, run_after, async enqueue)."""

from __future__ import annotations

import asyncio
import json
from datetime import timedelta

import pytest
from django.core.management import call_command
from django.utils import timezone

from jobs.context import request_id_var
from jobs.models import DeadLetter
from jobs.tasks_compat import TaskResultDoesNotExist, TaskResultStatus
from tests.integration import django_tasks as samples
from tests.integration.conftest import wait_for

pytestmark = [pytest.mark.integration, pytest.mark.django_db(transaction=True)]

WORKER_ARGS = ["-I", "tests.integration.django_tasks"]


def finished(task, result_id: str, timeout: float = 30.0):
    """The task's result once it has finished (read as a caller would: get_result)."""

    def read():
        result = task.get_result(result_id)  # never TaskResultDoesNotExist in between
        return result if result.is_finished else None

    return wait_for(read, timeout=timeout)


def log_lines(worker) -> list[dict]:
    lines = []
    for line in worker.log().splitlines():
        if line.startswith("{"):
            try:
                lines.append(json.loads(line))
            except ValueError:
                continue
    return lines


def test_tasks_run_and_get_result_reports_what_happened(start_worker, redis_client):
    worker = start_worker(extra_args=WORKER_ARGS)
    token = request_id_var.set("rid-django-task")  # as RequestIdMiddleware sets it for a request
    try:
        added = samples.add.enqueue(2, b=3)
    finally:
        request_id_var.reset(token)
    paired = samples.pair.enqueue("x")  # priority 10: the high queue
    async_added = samples.async_add.enqueue(4, 5)
    broken = samples.not_json.enqueue()

    result = finished(samples.add, added.id)
    assert result.status == TaskResultStatus.SUCCESSFUL
    assert result.return_value == 5
    assert (result.args, result.kwargs, result.errors) == ([2], {"b": 3}, [])
    assert result.attempts == 1
    assert result.worker_ids[0].startswith("test-")
    assert result.enqueued_at == added.enqueued_at
    assert added.enqueued_at <= result.started_at == result.last_attempted_at <= result.finished_at

    added.refresh()  # the result enqueue returned catches up
    assert added.status == TaskResultStatus.SUCCESSFUL
    assert added.return_value == 5

    assert finished(samples.pair, paired.id).return_value == ["x", "x"]  # a tuple, as JSON has it
    assert finished(samples.async_add, async_added.id).return_value == 9

    failed = finished(samples.not_json, broken.id)
    assert failed.status == TaskResultStatus.FAILED
    with pytest.raises(ValueError, match="failed"):
        _ = failed.return_value
    assert [e.exception_class_path for e in failed.errors] == ["builtins.TypeError"]
    assert failed.errors[0].exception_class is TypeError
    assert "Unsupported type" in failed.errors[0].traceback

    # Django's own signal receivers log each step; the worker's lines are JSON with the task id.
    def signalled():
        events = [line for line in log_lines(worker) if line.get("logger") in {"django.tasks", "django_tasks"}]
        return events if any("state=FAILED" in line["event"] for line in events) else None

    events = signalled() or wait_for(signalled, timeout=10)
    assert any(f"Task id={added.id}" in line["event"] and "state=RUNNING" in line["event"] for line in events)
    assert any(f"Task id={added.id}" in line["event"] and "state=SUCCESSFUL" in line["event"] for line in events)
    # The request id of the request that enqueued it is in the task's log lines.
    ran = [line for line in events if line.get("task_id") == added.id]
    assert ran
    assert {line.get("request_id") for line in ran} == {"rid-django-task"}
    failure = [line for line in events if "state=FAILED" in line["event"]]
    assert failure[0]["level"] == "ERROR"
    assert "Unsupported type" in json.dumps(failure[0])


def test_a_transient_error_is_retried_and_every_attempt_is_in_the_result(start_worker, redis_client):
    start_worker(extra_args=WORKER_ARGS)
    enqueued = samples.flaky.enqueue("flaky", 2)
    result = finished(samples.flaky, enqueued.id)
    assert result.status == TaskResultStatus.SUCCESSFUL
    assert result.return_value == 3
    assert result.attempts == 3
    assert len(result.worker_ids) == 3
    assert [e.exception_class_path for e in result.errors] == ["jobs.exceptions.TransientError"] * 2
    assert "attempt 1 failed" in result.errors[0].traceback
    assert "attempt 2 failed" in result.errors[1].traceback
    assert result.started_at < result.last_attempted_at <= result.finished_at
    assert not DeadLetter.objects.exists()


def test_the_context_knows_the_attempt_and_the_result_id(start_worker, redis_client):
    start_worker(extra_args=WORKER_ARGS)
    enqueued = samples.context_attempts.enqueue("context")
    result = finished(samples.context_attempts, enqueued.id)
    assert result.return_value == {"attempt": 2, "id": enqueued.id}
    seen = [value.decode() for value in redis_client.lrange("context", 0, -1)]
    assert seen == [f"1:{enqueued.id}", f"2:{enqueued.id}"]


def test_a_permanent_failure_is_a_dead_letter_that_requeue_dead_replays(start_worker, redis_client):
    start_worker(extra_args=WORKER_ARGS)
    enqueued = samples.refuse.enqueue("refuse")
    result = finished(samples.refuse, enqueued.id)
    assert result.status == TaskResultStatus.FAILED
    assert [e.exception_class_path for e in result.errors] == ["jobs.exceptions.PermanentError"]
    assert result.attempts == 1  # a permanent error is not retried
    dead = wait_for(lambda: DeadLetter.objects.filter(task_id=enqueued.id).first())
    assert dead.task_name == "tests.integration.django_tasks.refuse"
    assert dead.reason == DeadLetter.Reason.PERMANENT_ERROR
    assert dead.args == ["refuse"]

    redis_client.set("refuse:healed", 1)
    call_command("requeue_dead", str(dead.pk))
    dead.refresh_from_db()
    assert dead.status == DeadLetter.Status.REQUEUED
    replay = finished(samples.refuse, dead.requeued_task_id)
    assert replay.status == TaskResultStatus.SUCCESSFUL
    assert replay.return_value == "healed"
    assert replay.args == ["refuse"]
    assert int(redis_client.get("refuse")) == 2
    # The first run keeps its outcome: a requeue is a new run, under the dead letter's requeued id.
    assert samples.refuse.get_result(enqueued.id).status == TaskResultStatus.FAILED


def test_run_after_holds_the_job_until_then(start_worker, redis_client):
    start_worker(extra_args=WORKER_ARGS)
    when = timezone.now() + timedelta(seconds=3)
    enqueued = samples.add.using(run_after=when).enqueue(1, 1)
    result = finished(samples.add, enqueued.id)
    assert result.started_at >= when
    assert result.task.run_after == when


def test_aenqueue_and_aget_result_from_async_code(start_worker, redis_client):
    start_worker(extra_args=WORKER_ARGS)

    async def view_then_poll():
        result = await samples.add.aenqueue(20, 22)
        for _ in range(300):
            await result.arefresh()
            if result.is_finished:
                return result
            await asyncio.sleep(0.1)
        raise AssertionError("not finished in 30 s")

    result = asyncio.run(view_then_poll())
    assert result.return_value == 42
    assert (asyncio.run(samples.add.aget_result(result.id))).return_value == 42
    with pytest.raises(TaskResultDoesNotExist):
        asyncio.run(samples.add.aget_result("no-such-id"))
