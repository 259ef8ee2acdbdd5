"""Task history written in batches (jobs/runtime/results.py): one row per task, its last state, never undone."""

from __future__ import annotations

import time
from datetime import timedelta

import pytest
from celery import current_app, states
from django.db import DataError, OperationalError, connection
from django.utils import timezone
from django_celery_results.models import TaskResult
from kombu.exceptions import EncodeError

from jobs.models import OutboxMessage
from jobs.runtime import results

pytestmark = pytest.mark.django_db


class Request:
    """What Celery hands the backend about a running task (the fields the history keeps)."""

    def __init__(self, task_id: str) -> None:
        self.id = task_id
        self.task = "tests.history"
        self.argsrepr = "('a', 1)"
        self.kwargsrepr = "{'b': 2}"
        self.hostname = "worker-1@host"
        self.periodic_task_name = None
        self.children = []
        self.ignore_result = False
        self.parent_id = None
        self.root_id = None
        self.group = None
        self.chord = None


@pytest.fixture
def buffer(settings):
    """This process writes results the way a pool process does; the writing thread is given a
    long interval, so the test decides when a batch is written."""
    settings.JOBS_RESULTS_FLUSH_INTERVAL = 3600
    buffer = results.results_start_buffering()
    yield buffer
    results._buffer = None
    buffer.rows.clear()  # nothing for the thread to write outside the test's transaction
    buffer.stopped.set()
    buffer.wake.set()


def store(task_id: str, state: str, result=None, traceback=None):
    return current_app.backend.store_result(task_id, result, state, traceback=traceback, request=Request(task_id))


def test_a_task_is_one_row_with_its_last_state_and_its_start_time(buffer):
    store("t-1", states.STARTED, {"pid": 1})
    started = timezone.now()
    store("t-1", states.SUCCESS, {"answer": 42})

    assert not TaskResult.objects.filter(task_id="t-1").exists()  # noted, not written yet
    assert buffer.flush() == 1
    row = TaskResult.objects.get(task_id="t-1")
    assert row.status == states.SUCCESS
    assert row.result == '{"answer": 42}'
    assert row.task_name == "tests.history"
    assert row.task_args == "\"('a', 1)\""
    assert row.worker == "worker-1@host"
    assert row.date_started is not None
    assert row.date_started <= started
    assert row.date_created <= row.date_started <= row.date_done


def test_a_long_task_shows_as_started_until_it_ends(buffer):
    store("t-2", states.STARTED, {"pid": 1})
    buffer.flush()
    assert TaskResult.objects.get(task_id="t-2").status == states.STARTED

    store("t-2", states.SUCCESS, None)
    buffer.flush()
    row = TaskResult.objects.get(task_id="t-2")
    assert row.status == states.SUCCESS
    assert row.date_started is not None  # kept from the first write


def test_a_late_non_final_state_never_undoes_a_final_one():
    # Written synchronously, as the worker's main process does (a hard time limit), then a pool
    # process's STARTED arrives late: the FAILURE stays.
    store("t-3", states.FAILURE, RuntimeError("hard time limit"), traceback="Traceback ...")
    store("t-3", states.STARTED, {"pid": 1})
    assert TaskResult.objects.get(task_id="t-3").status == states.FAILURE
    # A requeued job that then succeeds does replace its failure.
    store("t-3", states.SUCCESS, 7)
    assert TaskResult.objects.get(task_id="t-3").status == states.SUCCESS


def test_states_of_one_task_noted_out_of_order_keep_the_final_one(buffer):
    store("t-4", states.SUCCESS, 1)
    store("t-4", states.RETRY, None)
    buffer.flush()
    assert TaskResult.objects.get(task_id="t-4").status == states.SUCCESS


def test_a_result_that_cannot_be_encoded_still_fails_the_task(buffer):
    with pytest.raises(EncodeError):
        store("t-5", states.SUCCESS, object())
    assert buffer.flush() == 0


def test_a_refused_batch_is_kept_for_the_next_round(buffer, caplog):
    store("t-6", states.SUCCESS, 1)
    store("t-7", states.SUCCESS, 2)

    def refuse(execute, sql, params, many, context):
        raise OperationalError("server closed the connection unexpectedly")

    with connection.execute_wrapper(refuse):
        assert buffer.flush() == 0
    assert "results.flush_failed" in caplog.text
    assert not TaskResult.objects.filter(task_id__in=["t-6", "t-7"]).exists()

    store("t-7", states.FAILURE, RuntimeError("later"))  # newer than what was kept
    assert buffer.flush() == 2
    assert dict(TaskResult.objects.values_list("task_id", "status")) == {"t-6": "SUCCESS", "t-7": "FAILURE"}


def test_a_django_tasks_end_is_written_with_its_ledger_row_deleted_in_one_go(buffer):
    """get_result reads the ledger row until the result row is there: the end of a Django task is
    written at once, in the transaction that deletes its ledger row; the database refusing keeps
    both, written later by the process's keeper (the run's lease renewed meanwhile)."""
    from jobs.runtime.handlers import _result_with_ledger
    from jobs.runtime.store import flush_pending, pending_writes

    OutboxMessage.objects.create(task_name="tests.history", task_id="j-1", lease_owner="w:1:a")
    OutboxMessage.objects.create(task_name="tests.history", task_id="j-2")
    store("j-1", states.SUCCESS, 1)

    def refuse(execute, sql, params, many, context):
        raise OperationalError("server closed the connection unexpectedly")

    with connection.execute_wrapper(refuse):
        _result_with_ledger("j-1", "w:1:a")
    assert set(OutboxMessage.objects.values_list("task_id", flat=True)) == {"j-1", "j-2"}
    assert pending_writes() == 1  # kept for the keeper, not lost

    assert flush_pending()
    assert TaskResult.objects.get(task_id="j-1").status == states.SUCCESS
    assert set(OutboxMessage.objects.values_list("task_id", flat=True)) == {"j-2"}
    assert buffer.rows == {}

    _result_with_ledger("j-2", "")  # nothing buffered (written earlier): the ledger row goes alone
    assert not OutboxMessage.objects.exists()


def test_a_run_that_lost_its_lease_does_not_delete_the_row_of_the_run_that_took_it(buffer):
    from jobs.runtime.handlers import _result_with_ledger

    OutboxMessage.objects.create(task_name="tests.history", task_id="j-3", lease_owner="w:2:new")
    store("j-3", states.SUCCESS, 1)
    _result_with_ledger("j-3", "w:1:old")
    assert OutboxMessage.objects.filter(task_id="j-3").exists()


def test_a_row_the_database_will_never_take_is_dropped_alone(buffer, caplog):
    store("ok-1", states.SUCCESS, 1)
    store("bad-1", states.SUCCESS, 2)
    store("ok-2", states.SUCCESS, 3)

    def too_long(execute, sql, params, many, context):
        rows = params if many else [params or ()]
        if any("bad-1" in row for row in rows):
            raise DataError("value too long for type character varying(255)")
        return execute(sql, params, many, context)

    with connection.execute_wrapper(too_long):
        assert buffer.flush() == 2
    assert set(TaskResult.objects.values_list("task_id", flat=True)) == {"ok-1", "ok-2"}
    assert [r.task_id for r in caplog.records if r.msg == "results.not_stored"] == ["bad-1"]
    assert buffer.rows == {}  # not kept to fail again


def test_members_of_a_chord_are_written_at_once(buffer):
    """django-celery-results' chord counter calls the body only if every member's result is
    stored when the last one finishes."""
    request = Request("member-1")
    request.chord = {"task": "tests.body"}
    current_app.backend.store_result("member-1", 5, states.SUCCESS, request=request)
    assert TaskResult.objects.get(task_id="member-1").status == states.SUCCESS
    assert buffer.rows == {}


@pytest.mark.django_db(transaction=True)
def test_a_chord_members_result_the_database_refuses_is_raised_not_swallowed(buffer, settings, caplog, monkeypatch):
    """Swallowed, the chord never called its body and nobody heard of it."""
    from celery.exceptions import BackendStoreError

    monkeypatch.setattr(current_app.backend, "max_retries", 0)
    request = Request("member-2")
    request.chord = {"task": "tests.body"}

    def refuse(execute, sql, params, many, context):
        raise OperationalError("the database system is shutting down")

    with connection.execute_wrapper(refuse), pytest.raises((OperationalError, BackendStoreError)):
        current_app.backend.store_result("member-2", 5, states.SUCCESS, request=request)
    assert "results.chord_member_not_stored" in caplog.text


def test_a_database_down_for_long_costs_the_oldest_history_not_the_memory(settings, caplog):
    buffer = results.ResultBuffer(interval=3600, limit=2)
    now = timezone.now()
    for n in range(5):
        row = current_app.backend.result_row(f"old-{n}", None, states.SUCCESS, request=Request(f"old-{n}"))
        buffer.rows[row["task_id"]] = {**row, "date_done": now + timedelta(seconds=n)}

    def refuse(execute, sql, params, many, context):
        raise OperationalError("the database system is starting up")

    with connection.execute_wrapper(refuse):
        buffer.flush()
    assert sorted(buffer.rows) == ["old-3", "old-4"]
    assert buffer.dropped == 3
    assert buffer.flush() == 2


@pytest.mark.django_db(transaction=True)
def test_the_writing_thread_writes_on_its_own_and_at_exit(settings):
    settings.JOBS_RESULTS_FLUSH_INTERVAL = 0.05
    results.results_start_buffering()
    try:
        store("t-8", states.SUCCESS, "done")
        deadline = time.monotonic() + 10
        while not TaskResult.objects.filter(task_id="t-8").exists():
            assert time.monotonic() < deadline, "the writing thread never wrote"
            time.sleep(0.02)
        settings.JOBS_RESULTS_FLUSH_INTERVAL = 3600
        results.results_start_buffering()
        store("t-9", states.SUCCESS, "at exit")
    finally:
        results.results_stop_buffering()  # a pool process exiting writes what waits
    assert TaskResult.objects.get(task_id="t-9").status == states.SUCCESS
    assert results.results_buffered() is None


def test_a_copy_that_does_not_start_its_body_writes_no_started_state(buffer):
    """A copy acknowledged without running (its job waits for a retry) overwrote the job's RETRY
    with STARTED: a Django task showed as running."""
    store("w-1", states.RETRY, None)
    copy = Request("w-1")
    copy.jobs_skip = "not_due"
    current_app.backend.store_result("w-1", {"pid": 1}, states.STARTED, request=copy)
    assert buffer.rows["w-1"]["status"] == states.RETRY
