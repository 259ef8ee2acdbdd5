"""The Celery signal handlers of `jobs` (connected when the app is ready).

The request id travels in a message header: it is added when a task is published inside an HTTP
request or inside another task, restored in the worker around the task, and cleared after.
"""

from __future__ import annotations

import logging
from types import FrameType
from typing import TYPE_CHECKING, Any

from celery import signals

from jobs.conf import jobs_settings
from jobs.context import get_request_id, request_id_var, sane_request_id, task_id_var, task_name_var
from jobs.logging import get_logger

if TYPE_CHECKING:
    from celery import Task
    from celery.app.task import Context
    from celery.worker.consumer import Consumer
    from celery.worker.request import Request

REQUEST_ID_HEADER = "request_id"

logger = get_logger("jobs.runtime.handlers")


@signals.worker_init.connect
def _install_worker(sender: Any = None, **kwargs: Any) -> None:
    from jobs.runtime.worker import install_worker

    install_worker(sender)


@signals.before_task_publish.connect
def _add_request_id(headers: dict[str, Any] | None = None, **kwargs: Any) -> None:
    if headers is not None and not headers.get(REQUEST_ID_HEADER):
        request_id = get_request_id()
        if request_id:
            headers[REQUEST_ID_HEADER] = request_id


@signals.task_prerun.connect
def _enter_task(task_id: str | None = None, task: Task[..., Any] | None = None, **kwargs: Any) -> None:
    request = getattr(task, "request", None)
    request_id_var.set(sane_request_id(getattr(request, REQUEST_ID_HEADER, None)))
    task_id_var.set(task_id)
    task_name_var.set(getattr(task, "name", None))
    _recycle_connections(request)
    if request is not None:
        from jobs.runtime.task import SKIP_ATTRIBUTE, lease_take

        lease_take(request, task)
        if getattr(request, SKIP_ATTRIBUTE, None) is not None:
            return
    starting = getattr(task, "attempt_starting", None)
    if starting is not None:
        starting()


@signals.task_received.connect
def _count_received(request: Request | None = None, **kwargs: Any) -> None:
    from jobs import metrics

    metrics.task_event(getattr(request, "name", None) or "<unknown>", "received")


@signals.worker_process_init.connect
def _pool_process_started(**kwargs: Any) -> None:
    from jobs.runtime.results import results_start_buffering

    results_start_buffering()


@signals.worker_shutdown.connect
@signals.worker_process_shutdown.connect
def _pool_process_exiting(**kwargs: Any) -> None:
    from jobs.runtime.results import results_stop_buffering
    from jobs.runtime.store import flush_pending, pending_writes

    results_stop_buffering()
    if pending_writes():  # ends of jobs the database refused: one last try before the process goes
        flush_pending(timeout=5.0)


@signals.worker_ready.connect
def _on_worker_ready(**kwargs: Any) -> None:

    from jobs import metrics

    _bound_sigterm()
    _buffer_results_without_prefork(kwargs.get("sender"))
    metrics.start_worker_metrics_server(jobs_settings.WORKER_METRICS_PORT, jobs_settings.WORKER_METRICS_ADDR)
    _relay_outbox_at_start()


def _buffer_results_without_prefork(consumer: Consumer | None) -> None:
    """A pool that runs tasks in this process (threads, gevent, solo) writes their results in
    batches from here; a prefork worker's main process forks, and writes its few results (hard
    time limits, lost processes) at once."""
    from celery.concurrency.prefork import TaskPool as PreforkPool

    from jobs.runtime.results import results_start_buffering

    pool = getattr(consumer, "pool", None)
    if pool is not None and not isinstance(pool, PreforkPool):
        results_start_buffering()


def _bound_sigterm() -> None:
    """SIGTERM (a deploy, `docker stop`, Kubernetes) becomes Celery's cold shutdown with its soft
    phase: running tasks get CELERY_SHUTDOWN_TIMEOUT seconds to finish, then whatever is still
    running, reserved or held for an ETA is given back to the broker. Celery's own SIGTERM (warm
    shutdown) would wait for running tasks without limit, until the orchestrator's SIGKILL."""
    import os
    import signal

    def term_to_quit(signum: int, frame: FrameType | None) -> None:
        os.kill(os.getpid(), signal.SIGQUIT)

    signal.signal(signal.SIGTERM, term_to_quit)


def _relay_outbox_at_start() -> None:
    """Whatever waited in the outbox while the broker was down goes out as soon as a worker is up."""

    from django.db import connection

    from jobs.db import with_fresh_connection
    from jobs.runtime.outbox import outbox_relay

    try:
        with_fresh_connection(outbox_relay, what="outbox_relay_at_start")
    except Exception:  # never keep a worker from starting
        logging.getLogger("jobs.runtime.outbox").warning("outbox.relay_at_start_failed", exc_info=True)
    finally:
        connection.close()  # the main process keeps no connection to go stale (jobs.db)


@signals.task_postrun.connect
def _leave_task(
    task: Task[..., Any] | None = None, task_id: str | None = None, state: str | None = None, **kwargs: Any
) -> None:
    request_id_var.set(None)
    task_id_var.set(None)
    task_name_var.set(None)
    request = getattr(task, "request", None)
    if task_id and request is not None and getattr(request, "jobs_run", None) is not None:
        _ledger_end(task, request, task_id, state, kwargs.get("retval"))
    _recycle_connections(request)


def _recycle_connections(request: Context | None) -> None:
    """Django's rule for a request, around every task: a connection that errored, or is older
    than CONN_MAX_AGE, is dropped; one kept is health-checked before its next use. (Celery's
    Django fix-up closed every connection twice per task instead, so each task that touched the
    database paid for a new connection: CELERY_DB_REUSE_MAX turns that off.) Not for a task run
    eagerly, inside its caller's transaction."""
    if getattr(request, "is_eager", False):
        return
    from jobs.db import recycle_between_tasks

    recycle_between_tasks()


def _ledger_end(
    task: Task[..., Any] | None, request: Context, task_id: str, state: str | None, retval: Any = None
) -> None:
    """A run of the job table has ended in this pool process: its row follows (see
    `jobs.runtime.store`). A JobTask's failure is finished by the failure path, and only once its
    dead letter is safe; a retry of a JobTask was written by the task itself."""
    from celery import states

    from jobs.runtime.store import job_finish, job_retry, run_ended

    run = request.jobs_run  # type: ignore[attr-defined]  # set by jobs.runtime.task.lease_take
    is_job_task = getattr(task, "on_give_up", None) is not None
    try:
        if state in {states.SUCCESS, states.IGNORED} or (state == states.FAILURE and not is_job_task):
            if getattr(task, "ledger_after_result", False):
                _result_with_ledger(task_id, run.owner)
                return
            job_finish(task_id, owner=run.owner)
        elif state == states.RETRY and not getattr(request, "jobs_retry_written", False):
            # A plain task's own `self.retry()`: its message is out already; the row follows.
            job_retry(task_id, retries=int(request.retries or 0) + 1, postponed=0, delay=0, owner=run.owner)
        elif state == states.REJECTED and not getattr(request, "jobs_retry_written", False):
            _rejected(task, request, task_id, run, retval)
        # Any other end (the process stopped under its hard time limit: the main process ends
        # the job) leaves the row to whoever ends it, or to the lease.
    finally:
        run_ended(task_id, run.owner)
        if run.limits:
            _wake_waiting(run)


def _wake_waiting(run: Any) -> None:
    """The run held concurrency slots: the next job waiting for each is due now."""
    from jobs.runtime.limits import run_ended as limits_run_ended

    try:
        limits_run_ended(run)
    except Exception as exc:  # noqa: BLE001 - the waiting jobs recheck by themselves when their lease-bound wait ends
        logger.warning("job.limit_wake_failed", extra={"error": f"{type(exc).__name__}: {exc}"[:300]})


def _rejected(task: Task[..., Any] | None, request: Context, task_id: str, run: Any, exc: Any) -> None:
    """The task raised `Reject`: given back (requeue), the row is available for the message that
    comes back; dropped, the job ends (a JobTask's as a dead letter)."""
    from jobs.models import DeadLetter
    from jobs.runtime.store import job_finish, job_release

    if getattr(exc, "requeue", False):
        job_release(task_id, owner_prefix=run.owner)
        return
    if getattr(task, "on_give_up", None) is None:
        if isinstance(getattr(exc, "reason", None), BaseException):
            # Celery's own `self.retry()` whose publish failed (the broker full, paused, gone)
            # rejects the message: the job waits in the table for its retry instead of being lost.
            from jobs.conf import jobs_settings
            from jobs.runtime.ledger import ledger_defer_retry

            delivery = request.delivery_info or {}
            ledger_defer_retry(
                task_name=str(getattr(task, "name", "") or ""),
                task_id=task_id,
                args=request.args,
                kwargs=request.kwargs,
                headers=dict(request.headers or {}),
                queue=str(delivery.get("routing_key") or ""),
                retries=int(request.retries or 0) + 1,
                delay=float(jobs_settings.TASK_RETRY_BACKOFF_BASE),
                owner=run.owner,
            )
            return
        job_finish(task_id, owner=run.owner)
        return
    from jobs.outcomes import Job, job_gave_up

    delivery = request.delivery_info or {}
    job_gave_up(
        task=task,
        job=Job(
            task_name=str(getattr(task, "name", "") or ""),
            task_id=task_id,
            args=tuple(request.args or ()),
            kwargs=dict(request.kwargs or {}),
            retries=int(request.retries or 0),
            queue=str(delivery.get("routing_key") or ""),
            request_id=str(getattr(request, "request_id", None) or ""),
            dead_letter_id=getattr(request, "dead_letter_id", None),
        ),
        reason=getattr(request, "jobs_reason", None) or DeadLetter.Reason.REJECTED,
        exc_type="Reject",
        exc_message=str(getattr(exc, "reason", None) or "the task rejected its message without requeue"),
        worker=str(request.hostname or ""),
    )


def _result_with_ledger(task_id: str, owner: str) -> None:
    """A Django task's end: its final state, waiting in this process's buffer, is written in the
    transaction that deletes its ledger row (`get_result` reads one or the other, never neither).
    When the database will not take it, both are written later by the process's keeper."""
    from jobs.db import with_fresh_connection
    from jobs.runtime.results import entry_row, results_buffered, results_write

    buffer = results_buffered()
    entry = buffer.take(task_id) if buffer is not None else None
    try:
        rows = [entry_row(entry)] if entry is not None else []
    except Exception:
        logger.warning("results.not_stored", extra={"task_id": task_id}, exc_info=True)
        entry, rows = None, []
    try:
        with_fresh_connection(lambda: results_write(rows, ledger_done=[(task_id, owner)]), what="result_and_ledger")
    except Exception as exc:  # noqa: BLE001 - never fail a task's end on its bookkeeping
        # Kept and retried in the background, the lease renewed meanwhile: the end is written
        # once the database answers, and the sweeper never takes the job for a crashed one.
        from jobs.runtime.store import keep_write

        logger.warning("ledger.finish_kept", extra={"task_id": task_id, "error": f"{type(exc).__name__}: {exc}"[:300]})
        keep_write(task_id, owner, lambda: results_write(rows, ledger_done=[(task_id, owner)]))
