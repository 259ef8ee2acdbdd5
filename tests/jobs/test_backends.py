"""`jobs.backends.CeleryBackend` without a worker: validation, enqueue (ledger, queues, run_after,
signals), get_result of a job not run yet, options and checks. With a worker:
tests/integration/test_django_tasks.py."""

from __future__ import annotations

import json
import uuid
from datetime import datetime, timedelta
from decimal import Decimal
from typing import Any, Literal

import pytest
from django.db import transaction
from django.test import override_settings
from django.utils import timezone

from jobs import backends
from jobs.backends import CeleryBackend, CeleryTask, task_options
from jobs.conf import jobs_settings
from jobs.models import DeadLetter, DeadLetterEvent, OutboxMessage
from jobs.runtime import django_tasks as runner
from jobs.runtime.outbox import outbox_relay
from jobs.runtime.results import results_write
from jobs.tasks_compat import (
    InvalidTask,
    TaskResultDoesNotExist,
    TaskResultMismatch,
    TaskResultStatus,
    task,
    task_backends,
    task_enqueued,
)
from tests.integration import django_tasks as samples

pytestmark = pytest.mark.django_db(transaction=True)


def queued(redis_client, queue: str) -> list[dict]:
    """The messages waiting in `queue` of the suite's Redis, oldest first (headers and body)."""
    return [json.loads(raw) for raw in reversed(redis_client.lrange(queue, 0, -1))]


def message_of(redis_client, task_id: str) -> tuple[str, dict]:
    for queue in ("high", "normal", "low", "celery"):
        for message in queued(redis_client, queue):
            if message["headers"]["id"] == task_id:
                return queue, message
    raise AssertionError(f"no message of {task_id} in any queue")


def test_the_backend_says_what_it_supports():
    backend = task_backends["default"]
    assert isinstance(backend, CeleryBackend)
    assert (backend.supports_defer, backend.supports_async_task, backend.supports_get_result) == (True, True, True)
    assert backend.supports_priority is True
    assert backend.queues == {"default", "high", "normal", "low"}


def test_enqueue_returns_a_ready_result_that_get_result_reads_back_equal(redis_client):
    result = samples.add.enqueue(2, b=3)
    assert result.status == TaskResultStatus.READY
    assert uuid.UUID(result.id).version == 4
    assert result.enqueued_at is not None
    assert (result.started_at, result.finished_at, result.last_attempted_at) == (None, None, None)
    assert (result.args, result.kwargs, result.backend, result.errors, result.worker_ids) == (
        [2],
        {"b": 3},
        "default",
        [],
        [],
    )
    with pytest.raises(ValueError, match="not finished"):
        _ = result.return_value
    assert samples.add.get_result(result.id) == result  # read from the ledger: every field equal
    row = OutboxMessage.objects.get(task_id=result.id)
    assert row.task_name == "tests.integration.django_tasks.add"
    queue, message = message_of(redis_client, result.id)
    assert queue == "normal"  # priority 0
    assert message["headers"]["task"] == "tests.integration.django_tasks.add"


def test_a_job_that_ends_between_get_results_reads_is_read_finished(monkeypatch):
    """The worker writes a job's end and deletes its ledger row in one commit. A reader that found
    no end yet, then no ledger row, must read the end again rather than call the job unknown (seen
    once in CI: TaskResultDoesNotExist while the job had succeeded)."""
    result = samples.add.enqueue(2, b=3)
    record = {"task": "tests.integration.django_tasks.add", "args": [2], "kwargs": {"b": 3}, "attempts": []}
    record_of = CeleryBackend._record
    calls = []

    def worker_commits_after_the_first_read(row):
        if not calls:  # the reader has just found no history row: now the worker commits
            history_row(result.id, "SUCCESS", meta={"django_task": record, "children": []}, result="5")
            results_write([], ledger_done=[(result.id, "")])
        calls.append(row)
        return record_of(row)

    monkeypatch.setattr(CeleryBackend, "_record", staticmethod(worker_commits_after_the_first_read))
    got = samples.add.get_result(result.id)
    assert calls[0] is None
    assert not OutboxMessage.objects.filter(task_id=result.id).exists()
    assert (got.status, got.return_value) == (TaskResultStatus.SUCCESSFUL, 5)


def test_a_task_used_with_other_settings_comes_back_as_that_task():
    later = timezone.now() + timedelta(seconds=30)
    variant = samples.add.using(priority=-20, run_after=later)
    result = variant.enqueue(1, 1)
    got = variant.get_result(result.id)
    assert got == result
    assert (got.task.priority, got.task.run_after) == (-20, later)


def test_unknown_ids_and_results_of_another_task_are_refused():
    with pytest.raises(TaskResultDoesNotExist):
        task_backends["default"].get_result(str(uuid.uuid4()))
    with pytest.raises(TaskResultDoesNotExist):
        task_backends["default"].get_result("not-an-id")
    result = samples.add.enqueue(1, 2)
    with pytest.raises(TaskResultMismatch):
        samples.flaky.get_result(result.id)


def test_arguments_that_are_not_json_are_refused_at_enqueue_and_nothing_is_kept():
    with pytest.raises(TypeError, match="Unsupported type"):
        samples.add.enqueue(timezone.now(), 1)
    with pytest.raises(TypeError):
        samples.add.enqueue({1, 2}, 1)
    assert not OutboxMessage.objects.exists()


def test_tuples_become_lists_as_json_has_them():
    result = samples.add.enqueue((1, 2), b=(3,))
    assert (result.args, result.kwargs) == ([[1, 2]], {"b": [3]})


@pytest.mark.parametrize(
    ("priority", "queue_name", "queue"),
    [
        (10, "default", "high"),
        (1, "default", "high"),
        (0, "default", "normal"),
        (-1, "default", "low"),
        (50, "low", "low"),
    ],
)
def test_priority_picks_the_queue_unless_one_is_named(redis_client, priority, queue_name, queue):
    result = samples.add.using(priority=priority, queue_name=queue_name).enqueue(1, 1)
    assert message_of(redis_client, result.id)[0] == queue


def test_a_queue_celery_does_not_declare_is_refused():
    with pytest.raises(InvalidTask, match="nowhere"):
        samples.add.using(queue_name="nowhere")


def test_queue_by_priority_is_an_option_and_an_undeclared_queue_falls_back(redis_client):
    options = {"QUEUE_BY_PRIORITY": [(-100, "missing"), (5, "high")]}  # any order: the highest minimum first
    with override_settings(TASKS={"default": {"BACKEND": "jobs.backends.CeleryBackend", "OPTIONS": options}}):
        backend = task_backends["default"]
        # Celery's default queue (this site's: normal)
        assert backend.queue_for(samples.add.using(priority=4)) == jobs_settings.default_queue
        assert backend.queue_for(samples.add.using(priority=5)) == "high"
        warnings = [m.id for m in backend.check()]
        assert "jobs.W012" in warnings


def test_enqueue_in_a_transaction_publishes_and_signals_only_once_it_commits(redis_client):
    sent = []

    def receiver(sender, task_result, **kwargs):
        sent.append((sender, task_result.id))

    task_enqueued.connect(receiver)
    try:
        dropped = []

        def failing_view() -> None:
            with transaction.atomic():
                dropped.append(samples.add.enqueue(1, 1))
                raise RuntimeError("the view failed")

        with pytest.raises(RuntimeError):
            failing_view()
        assert sent == []
        assert not OutboxMessage.objects.filter(task_id=dropped[0].id).exists()
        with pytest.raises(TaskResultDoesNotExist):
            samples.add.get_result(dropped[0].id)

        with transaction.atomic():
            kept = samples.add.enqueue(1, 1)
            assert sent == []
            assert redis_client.llen("normal") == 0  # not before the commit
        assert sent == [(CeleryBackend, kept.id)]
        assert message_of(redis_client, kept.id)[0] == "normal"
    finally:
        task_enqueued.disconnect(receiver)


def test_a_near_run_after_is_an_eta_in_the_broker(redis_client):
    when = timezone.now() + timedelta(seconds=3)
    result = samples.add.using(run_after=when).enqueue(1, 1)
    _queue, message = message_of(redis_client, result.id)
    assert message["headers"]["eta"] == when.isoformat()
    assert OutboxMessage.objects.get(task_id=result.id).not_before is None


def test_a_far_run_after_waits_in_the_table_and_is_published_just_before_it(redis_client):
    """A run_after of a few minutes used to be an ETA held by a worker (up to the ETA limit, 600
    s): a burst of them filled a worker's memory and met the visibility timeout."""
    when = timezone.now() + timedelta(minutes=5)
    result = samples.add.using(run_after=when).enqueue(1, 1)
    row = OutboxMessage.objects.get(task_id=result.id)
    assert row.state == OutboxMessage.State.SCHEDULED
    assert row.not_before == when - backends.ledger_lead()
    assert row.published_at is None
    assert redis_client.llen("normal") == 0
    assert outbox_relay()["published"] == 0  # not due yet
    OutboxMessage.objects.filter(pk=row.pk).update(not_before=timezone.now() - timedelta(seconds=1))
    assert outbox_relay()["published"] == 1
    _queue, message = message_of(redis_client, result.id)
    assert message["headers"]["eta"] == when.isoformat()  # still runs at run_after, not earlier


def test_the_eta_limit_stays_below_the_redis_visibility_timeout(settings):
    assert task_backends["default"].eta_ceiling(samples.add) == 5  # JOBS_HOLD_IN_BROKER_MAX
    settings.JOBS_HOLD_IN_BROKER_MAX = 10_000
    settings.CELERY_BROKER_TRANSPORT_OPTIONS = {"visibility_timeout": 300}
    settings.CELERY_TASK_TIME_LIMIT = 60
    backend = task_backends["default"]
    # 300 s visibility - 60 s time limit - 60 s margin
    assert backend.eta_ceiling(samples.add) == 180
    settings.CELERY_BROKER_TRANSPORT_OPTIONS = {"visibility_timeout": 7200}
    assert backend.eta_ceiling(samples.add) == backends.DEFAULT_ETA_LIMIT


def test_options_from_the_decorator_the_task_and_the_settings():
    from celery import current_app

    from jobs.exceptions import TransientError

    path = "tests.integration.django_tasks.add"
    assert runner.registered()["tests.integration.django_tasks.flaky"] == {"backoff_base": 0.2, "backoff_max": 0.3}
    try:
        # Django 6.1 and the backport pass @task keywords on to the backend's task class.
        made = CeleryTask(
            func=samples.add.func, priority=0, backend="default", queue_name="default", run_after=None, max_retries=1
        )
        assert runner.registered()[path] == {"max_retries": 1}
        assert current_app.tasks[path].retries_allowed() == 1
        options = {"TASKS": {path: {"max_retries": 4, "permanent_errors": ["jobs.exceptions.TransientError"]}}}
        with override_settings(TASKS={"default": {"BACKEND": "jobs.backends.CeleryBackend", "OPTIONS": options}}):
            made.using(priority=1)  # validated again: the settings' options win over the code's
            assert runner.registered()[path] == {"max_retries": 4, "permanent_errors": (TransientError,)}
            assert current_app.tasks[path].retries_allowed() == 4
            assert current_app.tasks[path].classify(TransientError("x")) == "permanent"
    finally:
        samples.add.using(priority=1)  # registered again with the code's own options: none
    assert runner.registered()[path] == {}
    assert current_app.tasks[path].retries_allowed() == jobs_settings.TASK_MAX_RETRIES


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"retries": 3}, "unknown option 'retries'"),
        ({"max_retries": -1}, "max_retries must be a whole number >= 0"),
        ({"max_retries": True}, "max_retries must be a whole number"),
        ({"backoff_base": 0}, "backoff_base must be a number of seconds > 0"),
        ({"permanent_errors": (ValueError, "x")}, "permanent_errors"),
        ({"transient_errors": ["no.such.Error"]}, "transient_errors: "),
    ],
)
def test_bad_options_are_refused_with_the_option_named(options, message):
    with pytest.raises(InvalidTask, match=message):
        task_options(**options)


def test_task_options_above_task_update_the_registered_task():
    from celery import current_app

    decorated = task_options(max_retries=2)(samples.refuse)
    assert decorated is samples.refuse
    assert current_app.tasks["tests.integration.django_tasks.refuse"].retries_allowed() == 2
    try:
        task_options(max_retries=5)(samples.refuse)
        assert current_app.tasks["tests.integration.django_tasks.refuse"].retries_allowed() == 5
    finally:
        del samples.refuse.func.__jobs_task_options__
        samples.refuse.using(priority=0)  # registered again with no options
    assert current_app.tasks["tests.integration.django_tasks.refuse"].retries_allowed() == 5  # the default


@task
def stray() -> None:
    """A @task in a module no worker imports (not an app's tasks module, not in CELERY_IMPORTS)."""


def test_a_task_outside_the_modules_a_worker_imports_is_an_error_of_check():
    from celery import current_app

    paths = {m.obj for m in task_backends["default"].check() if m.id == "jobs.E012"}
    assert "tests.jobs.test_backends.stray" in paths
    current_app.conf.imports = ("tests.jobs.test_backends",)
    try:
        paths = {m.obj for m in task_backends["default"].check() if m.id == "jobs.E012"}
    finally:
        current_app.conf.imports = ()
    assert "tests.jobs.test_backends.stray" not in paths


@task
def takes_a_datetime(when: datetime, amount: Decimal, note: str | None = None) -> None:
    """Arguments JSON cannot carry: `manage.py check` says so."""


@task(takes_context=True)
def takes_json(context, ids: list[int], options: dict[str, Any] | None, mode: Literal["a", "b"]) -> None:
    """Arguments JSON carries: nothing to say (the context is not an argument a caller passes)."""


def test_arguments_annotated_with_types_json_cannot_carry_are_named_by_check():
    warnings = [m for m in task_backends["default"].check() if m.id == "jobs.W013"]
    named = sorted((m.obj, m.msg.split("argument ")[1].split(" ")[0]) for m in warnings)
    assert named == [
        ("tests.jobs.test_backends.takes_a_datetime", "'amount'"),
        ("tests.jobs.test_backends.takes_a_datetime", "'when'"),
    ]


def test_check_names_a_missing_results_app_and_undeclared_queues(settings):
    config = {"BACKEND": "jobs.backends.CeleryBackend", "QUEUES": ["default", "high", "elsewhere"]}
    with override_settings(TASKS={"default": config}):
        ids = {m.id: m.msg for m in task_backends["default"].check()}
    assert "elsewhere" in ids["jobs.E011"]
    apps = [app for app in settings.INSTALLED_APPS if app != "django_celery_results"]
    with override_settings(INSTALLED_APPS=apps):
        ids = {m.id for m in task_backends["default"].check()}
    assert "jobs.E010" in ids


def test_a_job_given_up_before_its_result_is_written_reads_as_failed_from_its_dead_letter():
    dead = DeadLetter.objects.create(
        task_name="tests.integration.django_tasks.refuse",
        task_id="gone-1",
        args=["k"],
        exception_type="PermanentError",
        exception_message="no",
        traceback='Traceback (most recent call last):\n  File "x.py", line 1\njobs.exceptions.PermanentError: no\n',
        reason=DeadLetter.Reason.PERMANENT_ERROR,
        worker="w1@host",
    )
    result = samples.refuse.get_result(dead.task_id)
    assert result.status == TaskResultStatus.FAILED
    assert [e.exception_class_path for e in result.errors] == ["jobs.exceptions.PermanentError"]
    assert (result.args, result.worker_ids, result.finished_at) == (["k"], ["w1@host"], dead.failed_at)


def history_row(task_id: str, status: str, *, meta: dict | None = None, **fields) -> None:
    """A task history row as the worker's main process stores a hard time limit: no job record,
    and no task name (the fresh project's default, CELERY_RESULT_EXTENDED off)."""
    now = timezone.now()
    stored = {"exc_type": "TimeLimitExceeded", "exc_module": "billiard.exceptions", "exc_message": [60]}
    row = {
        "task_id": task_id,
        "status": status,
        "result": json.dumps(stored),
        "traceback": "Traceback ...\nbilliard.exceptions.TimeLimitExceeded: 60\n",
        "meta": json.dumps(meta or {"children": []}),
        "content_type": "application/json",
        "content_encoding": "utf-8",
        "worker": "w2@host",
        "date_created": now,
        "date_started": now,
        "date_done": now,
        **fields,
    }
    results_write([row])


def test_a_hard_time_limit_stored_by_the_main_process_reads_from_its_dead_letter():
    history_row("limit-1", "FAILURE")
    DeadLetter.objects.create(
        task_name="tests.integration.django_tasks.add",
        task_id="limit-1",
        args=[1, 2],
        exception_type="TimeLimitExceeded",
        traceback="Traceback ...\nbilliard.exceptions.TimeLimitExceeded: TimeLimitExceeded(60,)\n",
        reason=DeadLetter.Reason.TIME_LIMIT,
        worker="w2@host",
    )
    result = samples.add.get_result("limit-1")
    assert result.status == TaskResultStatus.FAILED
    assert [e.exception_class_path for e in result.errors] == ["billiard.exceptions.TimeLimitExceeded"]
    assert (result.args, result.worker_ids) == ([1, 2], ["w2@host"])


def test_a_failure_stored_without_a_record_or_a_dead_letter_still_names_its_error():
    history_row("limit-2", "FAILURE", task_name="tests.integration.django_tasks.add")
    result = samples.add.get_result("limit-2")
    assert result.status == TaskResultStatus.FAILED
    assert [e.exception_class_path for e in result.errors] == ["billiard.exceptions.TimeLimitExceeded"]


def test_a_run_given_up_reads_failed_after_its_dead_letter_was_requeued_and_failed_again():
    """The dead letter's task_id moves on to the replay's id; the first id is found in its trail."""
    dead = DeadLetter.objects.create(
        task_name="tests.integration.django_tasks.refuse",
        task_id="replay-2",
        args=["k"],
        exception_type="PermanentError",
        traceback="jobs.exceptions.PermanentError: no\n",
        reason=DeadLetter.Reason.PERMANENT_ERROR,
        status=DeadLetter.Status.REQUEUED,
    )
    DeadLetterEvent.objects.create(dead_letter=dead, action=DeadLetterEvent.Action.FAILED, task_id="first-1")
    result = samples.refuse.get_result("first-1")
    assert result.status == TaskResultStatus.FAILED
    assert [e.exception_class_path for e in result.errors] == ["jobs.exceptions.PermanentError"]


def test_an_error_already_in_the_attempts_record_is_not_counted_twice():
    """A STARTED row whose record holds the attempt's error, and the dead letter of that attempt
    (written before the final state): one error."""
    error = {"exception_class_path": "jobs.exceptions.PermanentError", "traceback": "x"}
    record = {
        "task": "tests.integration.django_tasks.refuse",
        "args": ["k"],
        "kwargs": {},
        "attempts": [{"worker": "w1", "started_at": timezone.now().isoformat(), "error": error}],
    }
    history_row("twice-1", "STARTED", meta={"django_task": record, "children": []})
    DeadLetter.objects.create(
        task_name="tests.integration.django_tasks.refuse",
        task_id="twice-1",
        exception_type="PermanentError",
        traceback="jobs.exceptions.PermanentError: no\n",
        reason=DeadLetter.Reason.PERMANENT_ERROR,
    )
    result = samples.refuse.get_result("twice-1")
    assert result.status == TaskResultStatus.FAILED
    assert len(result.errors) == 1
    assert result.worker_ids == ["w1"]


def test_nan_is_refused_at_enqueue():
    with pytest.raises(ValueError, match="JSON compliant"):
        samples.add.enqueue(float("nan"), 1)
    assert not OutboxMessage.objects.exists()


def test_the_attempts_a_retry_carries_are_bounded():
    from celery import current_app

    runner_task = current_app.tasks["tests.integration.django_tasks.flaky"]
    long_error = {"exception_class_path": "x.Y", "traceback": "t" * 10_000}
    attempts = [{"worker": f"w{i}", "error": long_error} for i in range(30)]

    class Request:
        meta = {"django_task": {"attempts": attempts}}

    carried = runner_task.retry_headers(Request(), RuntimeError("x"))["jobs_attempts"]
    assert len(carried) == runner.ATTEMPTS_KEPT
    assert carried[0]["worker"] == "w0"  # the first, then the latest
    assert carried[-1]["worker"] == "w29"
    assert all(len(entry["error"]["traceback"]) == runner.EARLIER_TRACEBACK_KEPT for entry in carried)
    assert len(json.dumps(carried)) < 30_000


def test_celery_may_set_a_tasks_time_limit_at_run_time():
    from celery import current_app

    path = "tests.integration.django_tasks.pair"
    celery_task = current_app.tasks[path]
    try:
        celery_task.time_limit = 7  # what `celery control time_limit` does
        assert celery_task.time_limit == 7
        assert runner.registered()[path]["time_limit"] == 7
    finally:
        samples.pair.using(priority=10)  # registered again: the code's options
    assert celery_task.time_limit is None


def test_a_task_unique_by_its_arguments_and_limited_per_key(redis_client):
    from celery import current_app

    from jobs.limits import Limit, LimitKey, limit_keys

    first = samples.day_report.enqueue("2026-12-07")
    assert samples.day_report.enqueue(day="2026-12-07", region="us").id == first.id  # one per day
    assert samples.day_report.enqueue("2026-12-08").id != first.id
    assert OutboxMessage.objects.filter(unique_key="report:2026-12-07").count() == 1
    # The worker's side: the limit's key from the function's own parameters.
    runner_task = current_app.tasks["tests.integration.django_tasks.day_report"]
    assert limit_keys(runner_task, ["2026-12-07"], {"region": "us"}) == [
        LimitKey("tests-report", "us", "concurrency", 1, 1.0)
    ]
    assert limit_keys(runner_task, ["2026-12-07"], {}) == [LimitKey("tests-report", "eu", "concurrency", 1, 1.0)]
    with pytest.raises(InvalidTask, match=r"limits must be a list of jobs\.limits\.Limit, each name once"):
        task_options(limits=[Limit("a", concurrency=1), Limit("a", rate=2)])
    with pytest.raises(InvalidTask, match=r"unique must be a jobs\.limits\.UniqueJob"):
        task_options(unique="report:{day}")


def test_a_task_taking_its_context_gets_its_keys_from_the_parameters_after_it(redis_client):
    from celery import current_app

    from jobs.limits import LimitKey, limit_keys

    first = samples.tenant_sync.enqueue("acme")
    assert samples.tenant_sync.enqueue(tenant="acme").id == first.id
    assert OutboxMessage.objects.filter(unique_key="sync:acme").count() == 1
    runner_task = current_app.tasks["tests.integration.django_tasks.tenant_sync"]
    assert limit_keys(runner_task, ["acme"], {}) == [LimitKey("tests-tenant", "acme", "concurrency", 1, 1.0)]
