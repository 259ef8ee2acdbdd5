"""Worker-side classes: the request wrapper and the consumer the project installs."""

from __future__ import annotations

import base64
import json
import threading
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from celery import bootsteps
from celery.worker.consumer import Consumer
from celery.worker.request import Request
from vine import promise

from jobs import metrics
from jobs.conf import jobs_settings
from jobs.heartbeat import liveness_touch

if TYPE_CHECKING:
    import redis
    from celery.app.task import Context
    from kombu.asynchronous import Hub
    from kombu.asynchronous.timer import Entry
    from kombu.message import Message

    from jobs.outcomes import Job
    from jobs.runtime.ledger import Sweeper
from jobs.logging import get_logger

logger = get_logger(__name__)


class JobRequest(Request):
    """The worker main process's view of one task message.

    Counts the task's metrics here, where the prefork pool reports every outcome, and runs
    `on_timeout` with the task's own request context pushed, so a hard time limit (handled in
    the main process) still dead-letters with queue, headers and request id."""

    _running = False
    # Set by Celery's Request (its private attributes are not in celery-types).
    _request_dict: dict[str, Any]
    _context: Context

    # The pool reports the pid of its process, an int (celery-types has str).
    def on_accepted(self, pid: int, time_accepted: float) -> None:  # type: ignore[override]
        self._running = True
        metrics.task_event(self.name, "started")
        metrics.IN_PROGRESS.labels(task=self.name).inc()
        super().on_accepted(pid, time_accepted)  # type: ignore[arg-type]

    def _finished(self) -> None:
        if self._running:
            self._running = False
            metrics.IN_PROGRESS.labels(task=self.name).dec()

    def send_event(self, type: str, **fields: Any) -> None:  # `type`: Celery's name, callers may pass it by keyword
        if type == "task-succeeded":
            self._finished()
            metrics.task_event(self.name, "succeeded")
            if fields.get("runtime") is not None:
                metrics.RUNTIME.labels(task=self.name).observe(fields["runtime"])
        elif type == "task-failed":
            self._finished()
            metrics.task_event(self.name, "failed")
            # A JobTask's failure is a dead letter, unless it was a Reject: a retry the broker
            # refused, which the ledger keeps.
            rejected = str(fields.get("exception") or "").startswith("Reject(")
            if getattr(self.task, "alert_on_dead_letter", None) is not None and not rejected:
                metrics.task_event(self.name, "dead_lettered")
        elif type == "task-retried":
            self._finished()
            metrics.task_event(self.name, "retried")
        super().send_event(type, **fields)

    def revoked(self) -> bool:
        """Celery asks this before it hands the task to the pool: a JobTask whose pool process
        died under it `JOBS_WORKER_LOST_LIMIT` times is quarantined here, in the main process,
        without being run again (it might kill its process before its own code can stop it)."""
        if super().revoked():
            return True
        if self._quarantined():
            self._already_revoked = True
            return True
        return False

    def _quarantined(self) -> bool:

        from jobs import crashloop

        if getattr(self.task, "on_give_up", None) is None or not (self.delivery_info or {}).get("redelivered"):
            return False
        deaths = crashloop.losses(self.id)
        if deaths < jobs_settings.WORKER_LOST_LIMIT:
            return False
        from celery.worker.state import task_ready

        from jobs.models import DeadLetter
        from jobs.outcomes import job_gave_up

        message = f"the worker running this task was lost {deaths} times in a row; quarantined"
        task_ready(self)
        self.send_event("task-failed", exception=f"Quarantined({message!r})", traceback="")
        job_gave_up(
            task=self.task,
            job=self._job(),
            reason=DeadLetter.Reason.WORKER_LOST,
            exc_type="Quarantined",
            exc_message=message,
            worker=str(self.hostname or ""),
        )
        crashloop.clear(self.id)
        self.acknowledge()
        return True

    def _job(self) -> Job:
        """What the give-up hook is told about this job."""
        from jobs.outcomes import Job, run_token

        headers = self._request_dict or {}
        pid = getattr(self, "worker_pid", None)
        return Job(
            task_name=self.name,
            task_id=self.id,
            args=tuple(self.args or ()),
            kwargs=dict(self.kwargs or {}),
            retries=int(headers.get("retries") or 0),
            queue=str((self.delivery_info or {}).get("routing_key") or ""),
            request_id=str(headers.get("request_id") or ""),
            dead_letter_id=headers.get("dead_letter_id"),
            run=run_token(self.id, str(self.hostname or ""), int(pid)) if pid else "",
        )

    def _announce_cancelled(self, emit_retry: bool = True) -> None:
        """Celery stopped the running task itself (the broker connection dropped, with
        `worker_cancel_long_running_tasks_on_connection_loss`): the message comes back and the job
        runs again, so the app releases what the stopped attempt held."""
        super()._announce_cancelled(emit_retry=emit_retry)  # type: ignore[misc]  # private: not in celery-types
        self._tell_lost()
        # The lease is not given back here: the body may have returned and its end be on its way
        # (the chaos run saw a job run again beside its live first run). A process Celery stops
        # gives it back when it reports Terminated (on_failure); one that finishes ends its row.

    def _tell_lost(self) -> None:
        hook = getattr(self.task, "on_lost", None)
        if hook is None or getattr(self, "_told_lost", False):
            return
        self._told_lost = True
        from jobs.db import with_fresh_connection

        try:
            with_fresh_connection(lambda: hook(self._job()), what="on_lost")
        except Exception:
            logger.exception("worker.on_lost_failed", extra={"task_id": self.id})

    def _announce_revoked(self, reason: str, terminated: bool, signum: Any, expired: bool) -> None:
        """A revoked, expired or terminated JobTask ends here, in the main process: kept as a dead
        letter (no alert: someone chose this), its app told, its ledger row forgotten. (Celery's
        `task_revoked` signal carries no arguments of the task, so this is not a signal handler.)
        A periodic tick that expired (django-celery-beat's header says so) is not recorded."""
        super()._announce_revoked(reason, terminated, signum, expired)  # type: ignore[misc]  # private: not in celery-types
        # A periodic tick that came too late (beat's `expires`) is not recorded: the next one runs.
        skipped_tick = expired and (self._request_dict or {}).get("periodic_task_name")
        if getattr(self.task, "on_give_up", None) is None or skipped_tick:
            self._ledger_forget()
            return
        from jobs.models import DeadLetter
        from jobs.outcomes import job_gave_up

        what = "expired before it ran" if expired else ("terminated" if terminated else "revoked")
        try:
            job_gave_up(
                task=self.task,
                job=self._job(),
                reason=DeadLetter.Reason.REVOKED,
                exc_type="Revoked",
                exc_message=f"the task was {what}",
                worker=str(self.hostname or ""),
                alert=False,
            )
        except Exception:
            logger.exception("worker.revoke_not_recorded", extra={"task_id": self.id})

    def _ledger_forget(self) -> None:
        """The job ended without the failure path (which clears its ledger row itself)."""
        from jobs.outcomes import LEDGER_HEADER

        if not (self._request_dict or {}).get(LEDGER_HEADER):
            return
        from jobs.runtime.ledger import ledger_finish

        _fresh_db()
        ledger_finish(self.id)

    def on_failure(self, exc_info: Any, send_failed_event: bool = True, return_ok: bool = False) -> None:
        from billiard.exceptions import Terminated, WorkerLostError

        exc = getattr(exc_info, "exception", None)
        exc = getattr(exc, "exc", exc)  # billiard wraps it in an ExceptionWithTraceback
        if isinstance(exc, WorkerLostError) and getattr(self.task, "on_give_up", None):
            from jobs import crashloop

            crashloop.note_loss(self.id)
            self._tell_lost()
        _fresh_db()  # Celery may write the result from this (main) process
        if isinstance(exc, WorkerLostError):
            self._lease_release(crashed=True)
        elif isinstance(exc, Terminated):  # stopped by a shutdown or a revoke: given back, no crash
            self._lease_release()
        try:
            super().on_failure(exc_info, send_failed_event=send_failed_event, return_ok=return_ok)
        finally:
            self._finished()  # also when the task was given back (worker lost, shutdown)

    def _lease_release(self, *, crashed: bool = False) -> None:
        """The pool process running this job died (`crashed`) or was stopped (a shutdown, a lost
        broker connection): its run's lease is given up now, so the message Celery gives back
        starts at once, not after the lease. A plain task whose runs died `JOBS_WORKER_LOST_LIMIT`
        times is given up (a JobTask has its own quarantine)."""
        from jobs.outcomes import LEDGER_HEADER

        pid = getattr(self, "worker_pid", None)
        if not (self._request_dict or {}).get(LEDGER_HEADER) or not pid:
            return
        from jobs.db import with_fresh_connection
        from jobs.runtime.store import job_release, owner_prefix

        prefix = owner_prefix(str(self.hostname or ""), int(pid))

        def release() -> int | None:
            from jobs.runtime.limits import release_ended

            crashes = job_release(self.id, owner_prefix=prefix, crashed=crashed)
            if crashes is not None:
                release_ended(self.id, prefix)  # the jobs waiting for its slots need not wait for the lease
            return crashes

        try:
            crashes = with_fresh_connection(release, what="lease_release")
        except Exception as exc:  # noqa: BLE001 - the lease then lapses by itself
            logger.warning("worker.lease_not_released", extra={"task_id": self.id, "error": f"{exc}"[:200]})
            return
        plain = getattr(self.task, "on_give_up", None) is None
        if crashed and crashes is not None and crashes >= jobs_settings.WORKER_LOST_LIMIT and plain:
            from jobs.models import DeadLetter
            from jobs.outcomes import job_gave_up

            job_gave_up(
                task=self.task,
                job=self._job(),
                reason=DeadLetter.Reason.WORKER_LOST,
                exc_type="WorkerLost",
                exc_message=f"the process running this job died {crashes} times; quarantined",
                worker=str(self.hostname or ""),
            )

    def on_timeout(self, soft: bool, timeout: float) -> None:
        if soft:
            return super().on_timeout(soft, timeout)
        _fresh_db()
        self.task.request_stack.push(self._context)
        try:
            return super().on_timeout(soft, timeout)
        finally:
            self.task.request_stack.pop()
            # A plain task killed by its hard limit ends here: Celery acks it without
            # `task_postrun`, so nothing else would finish its row (a JobTask's failure path did).
            if getattr(self.task, "on_give_up", None) is None:
                self._ledger_forget()


def _message_summary(message: Message) -> tuple[dict[str, Any], str, tuple[Any, ...], dict[str, Any]]:
    """Headers, the start of the body (secrets redacted), and the arguments when the body is
    a protocol 2 JSON message (`[args, kwargs, embed]`)."""
    from jobs.redaction import redact, redact_text

    headers = dict(getattr(message, "headers", None) or {})
    body = getattr(message, "body", b"") or b""
    if isinstance(body, str):
        body = body.encode(errors="replace")
    args: tuple[Any, ...] = ()
    kwargs: dict[str, Any] = {}
    try:
        payload = json.loads(body)
    except (ValueError, UnicodeDecodeError):
        payload = None
    if isinstance(payload, list) and len(payload) >= 2 and isinstance(payload[0], list):
        args, kwargs = tuple(payload[0]), payload[1] if isinstance(payload[1], dict) else {}
    if payload is not None:
        text = json.dumps(redact(payload)[0])[:4000]
    else:
        try:
            text = body[:4000].decode()
        except UnicodeDecodeError:
            text = "base64:" + base64.b64encode(body[:3000]).decode()
    return headers, redact_text(text), args, kwargs


def _fresh_db() -> None:
    """Celery's own main-process writes (the result backend's mark_as_failure) run on this
    process's connection: drop it first if it died or aged (see jobs.db)."""
    from jobs.db import drop_stale_connection

    drop_stale_connection()


class JobConsumer(Consumer):
    """Celery's consumer, plus a dead letter for every message it has to throw away
    (undecodable, disallowed content type such as pickle, unknown or invalid task), written with
    its arguments so it can be replayed once a worker knows the task.

    Task events (for Flower and the metrics exporter) are published in batches: Celery schedules
    a publish for every event, which under load is a broker round trip for every loop iteration,
    the largest share of the main process's work per task. Here they wait
    `JOBS_TASK_EVENTS_FLUSH_INTERVAL` (0.1 s) at most, or until 24 are buffered, and go out in one
    message; they are flushed before the consumer stops."""

    _events_flush_due = False
    _arm_events_flush_promise: promise | None = None
    # Set by Celery's Consumer, not in celery-types.
    hub: Hub | None
    _flush_events: Callable[[], None]

    # Celery's returns None too (celery-types has a callable).
    def on_send_event_buffered(self) -> None:  # type: ignore[override]

        interval = jobs_settings.TASK_EVENTS_FLUSH_INTERVAL
        if self.hub is None or interval <= 0:
            super().on_send_event_buffered()  # Celery's own way
        elif threading.current_thread() is not threading.main_thread():
            # An event sent from a pool's thread (the threads pool): the event loop's timers are
            # not to be touched from here. Ask the loop to arm the timer, the way Celery asks it
            # to flush: one promise, so asked many times it is armed once, and `call_soon` takes
            # the hub's lock and wakes the loop.
            if self._arm_events_flush_promise is None:
                self._arm_events_flush_promise = promise(self._arm_events_flush)
            self.hub.call_soon(self._arm_events_flush_promise)
        else:
            self._arm_events_flush()

    def _arm_events_flush(self) -> None:
        if not self._events_flush_due:
            self._events_flush_due = True
            # Only armed when the consumer has a hub (see on_send_event_buffered).
            self.hub.call_later(jobs_settings.TASK_EVENTS_FLUSH_INTERVAL, self._flush_events_due)  # type: ignore[union-attr]

    def _flush_events_due(self) -> None:
        self._events_flush_due = False
        self._flush_events()

    def _flush_events_before(self, what: str) -> None:
        try:
            self._flush_events()
        except Exception as exc:  # noqa: BLE001 - never keep a consumer from stopping
            logger.warning("worker.events_not_flushed", extra={"at": what, "error": f"{type(exc).__name__}: {exc}"})

    def on_close(self) -> None:
        """The connection closed (a broker restart, a channel error): Celery clears the timers,
        ours too, and starts a new event dispatcher that carries over only what failed to publish.
        What is buffered goes out now (or, the broker being gone, into that carried-over buffer)."""
        self._flush_events_before("close")
        self._events_flush_due = False
        super().on_close()

    def stop(self) -> None:
        self._flush_events_before("stop")
        super().stop()

    def shutdown(self) -> None:
        self._flush_events_before("shutdown")
        super().shutdown()

    def _dead_letter(self, message: Message, exc: BaseException | None, what: str) -> None:
        from jobs.models import DeadLetter
        from jobs.outcomes import Job, job_gave_up

        headers, text, args, kwargs = _message_summary(message)
        delivery = getattr(message, "delivery_info", None) or {}
        try:
            job_gave_up(
                task=None,
                job=Job(
                    task_name=str(headers.get("task") or "<unknown>")[:200],
                    task_id=str(headers.get("id") or "")[:64],
                    args=args,
                    kwargs=kwargs,
                    retries=int(headers.get("retries") or 0) if str(headers.get("retries", "0")).isdigit() else 0,
                    queue=str(delivery.get("routing_key") or ""),
                    request_id=str(headers.get("request_id") or "")[:128],
                    dead_letter_id=headers.get("dead_letter_id"),
                ),
                reason=DeadLetter.Reason.UNDECODABLE,
                exc_type=type(exc).__name__ if exc else what,
                exc_message=f"{what}: {exc}"[:2000] if exc else what,
                worker=str(self.hostname or ""),
                raw_message=f"content-type={getattr(message, 'content_type', '')} body={text}",
            )
        except Exception:
            logger.exception("dead_letter.consumer_record_failed")

    def on_decode_error(self, message: Any, exc: BaseException) -> None:
        self._dead_letter(message, exc, "message could not be decoded")
        self._guarded(super().on_decode_error, message, exc)

    def on_unknown_task(self, body: Any, message: Any, exc: BaseException) -> None:
        self._dead_letter(message, exc, "unknown task")
        self._guarded(super().on_unknown_task, body, message, exc)

    def on_invalid_task(self, body: Any, message: Any, exc: BaseException) -> None:
        self._dead_letter(message, exc, "invalid task message")
        self._guarded(super().on_invalid_task, body, message, exc)

    def _guarded(self, handler: Any, *args: Any) -> None:
        """Celery's handlers reject the message, then mark the result failed in the database: a
        database error there must not stop the consumer (the dead letter is written already)."""
        from django.db import Error as DatabaseError

        _fresh_db()
        try:
            handler(*args)
        except DatabaseError as exc:
            logger.warning("worker.result_not_stored", extra={"error": f"{type(exc).__name__}: {exc}"[:300]})


class ZeroIsNoLimitStep(bootsteps.Step):
    """`CELERY_WORKER_MAX_TASKS_PER_CHILD=0` (or `..._MAX_MEMORY_PER_CHILD=0`) means no limit.

    The settings turn 0 into None, but the `celery` command also reads `CELERY_WORKER_*`
    variables as its own options (click's `auto_envvar_prefix`), and those win over settings:
    billiard would then refuse 0 and the worker die at start. Every step of the blueprint is
    constructed before any builds its part, so this runs before the pool is created."""

    def __init__(self, parent: Any, **kwargs: Any) -> None:
        super().__init__(parent, **kwargs)
        for name in ("max_tasks_per_child", "max_memory_per_child"):
            if not getattr(parent, name, None):
                setattr(parent, name, None)


class ShutdownLogStep(bootsteps.StartStopStep):
    """Logs `worker.stopping` as a shutdown begins, warm or cold (Celery's own notice is printed
    from its signal handler, and its `worker_shutdown` signal is not sent on a cold shutdown)."""

    label = "Shutdown log"

    def close(self, worker: Any) -> None:
        logger.info("worker.stopping", extra={"hostname": worker.hostname})


class LivenessStep(bootsteps.StartStopStep):
    """Refreshes the worker's liveness file from the consumer's own event loop, and only while
    the consumer is connected and consuming queues: a worker process that lives on but no longer
    consumes (a stuck reconnect, every queue cancelled) lets the file go stale, and
    `manage.py probe worker` fails."""

    requires = ("celery.worker.consumer.tasks:Tasks",)

    def __init__(self, parent: Any, **kwargs: Any) -> None:
        super().__init__(parent, **kwargs)
        self.tref: Entry | None = None
        self.client: redis.Redis | None = None

    def start(self, parent: Any) -> None:
        from jobs.runtime.ledger import _redis_client

        self.client = _redis_client()
        self.touch(parent)

        interval = jobs_settings.LIVENESS_INTERVAL
        self.tref = parent.timer.call_repeatedly(interval, self.touch, (parent,), priority=10)

    def stop(self, parent: Any) -> None:
        if self.tref is not None:
            self.tref.cancel()
            self.tref = None

    def touch(self, parent: Any) -> None:
        connection = parent.connection
        task_consumer = parent.task_consumer
        queues = [q.name for q in getattr(task_consumer, "queues", None) or []]
        # Queues an operator paused count as consumed: a worker idle by choice is alive.
        queues += sorted(getattr(parent, "jobs_paused_queues", ()))
        if connection is None or not connection.connected or not queues:
            return
        try:
            liveness_touch("worker", hostname=parent.hostname, queues=queues)
        except OSError:
            logger.warning("worker.liveness_write_failed", exc_info=True)
        try:
            from jobs.runtime.ledger import worker_reserved_publish

            worker_reserved_publish(parent.hostname, held_task_ids(), client=self.client)
        except Exception as exc:  # noqa: BLE001 - Redis paused or full: the sweeper then waits longer
            logger.warning("worker.reserved_write_failed", extra={"error": f"{type(exc).__name__}: {exc}"[:200]})


class QueuePauseStep(bootsteps.StartStopStep):
    """Applies the paused queues (`jobs.runtime.pause`): read once before the consumer takes
    anything, then by a thread every `JOBS_PAUSE_SYNC_SECONDS`, applied from the event loop."""

    requires = ("celery.worker.consumer.tasks:Tasks",)

    def __init__(self, parent: Any, **kwargs: Any) -> None:
        super().__init__(parent, **kwargs)
        self.sync: Any = None
        self.tref: Entry | None = None

    def start(self, parent: Any) -> None:
        from jobs.runtime.pause import PauseSync

        self.sync = PauseSync(parent)
        self.sync.refresh()
        self.sync.apply()
        self.sync.start()
        interval = float(jobs_settings.PAUSE_SYNC_SECONDS)
        self.tref = parent.timer.call_repeatedly(interval, self.sync.apply, priority=10)

    def stop(self, parent: Any) -> None:
        if self.tref is not None:
            self.tref.cancel()
            self.tref = None
        if self.sync is not None:
            self.sync.stop()
            self.sync = None


def held_task_ids() -> set[str]:
    """Ids of the tasks this worker holds: running, prefetched, or waiting for their ETA."""
    from celery.worker import state

    held: set[str] = set()
    # scheduled_requests (Celery 5.5+) is not in celery-types.
    for requests in (state.active_requests, state.reserved_requests, state.scheduled_requests):  # type: ignore[attr-defined]
        held.update(request.id for request in list(requests))
    return held


class LedgerStep(bootsteps.StartStopStep):
    """Runs the ledger's upkeep (`jobs.runtime.ledger`: publish what waits, bring back what the broker
    lost) in a thread of the worker's main process, so it goes on whether beat runs or not."""

    label = "Ledger sweeper"

    def __init__(self, parent: Any, **kwargs: Any) -> None:
        super().__init__(parent, **kwargs)
        self.sweeper: Sweeper | None = None

    def start(self, parent: Any) -> None:

        from jobs.runtime.ledger import Sweeper

        interval = jobs_settings.LEDGER_SWEEP_INTERVAL
        if interval > 0:
            self.sweeper = Sweeper(interval).start()

    def stop(self, parent: Any) -> None:
        if self.sweeper is not None:
            self.sweeper.stop()
            self.sweeper = None


def guard_plain_tasks(app: Any) -> None:
    """A task not built on `JobTask` (a plain `@shared_task`) that is enqueued into the job table
    gets the same start lease: its class's `__call__` acknowledges a copy instead of running the
    body (`jobs.runtime.task.skip_copy`; the lease itself is taken in `task_prerun`). Done before
    the pool starts, so every pool process builds its tracers on the guarded classes."""
    from celery.app.task import Task
    from celery.utils.objects import mro_lookup

    from jobs.runtime.task import JobTask, limit_refused, skip_copy

    for name, task in list(app.tasks.items()):
        cls = type(task)
        if isinstance(task, JobTask) or name.startswith("celery.") or cls.__dict__.get("_jobs_guarded"):
            continue
        custom = mro_lookup(cls, "__call__", stop={Task, object}, monkey_patched=["celery.app.task"])
        inner = cls.__call__ if custom is not None else None

        def guarded(self: Any, *args: Any, _jobs_inner: Any = inner, **kwargs: Any) -> Any:
            request = self.request
            if not request.called_directly:
                skip_copy(request)
                limit_refused(request)
            if _jobs_inner is not None:
                return _jobs_inner(self, *args, **kwargs)
            if request.called_directly:
                return Task.__call__(self, *args, **kwargs)
            return self.run(*args, **kwargs)

        cls.__call__ = guarded
        cls._jobs_guarded = True
        if cls.Request == Task.Request:
            # The worker's side of the same job: a hard time limit ends its row (JobRequest.on_timeout).
            cls.Request = "jobs.runtime.worker:JobRequest"


def install_worker(worker: Any) -> None:
    """Makes a starting worker (any Celery app's: Celery's `worker_init` signal) a `jobs` worker:
    its bootsteps join the blueprint, `JobConsumer` replaces Celery's default consumer, and SIGTERM
    gives running tasks JOBS_SHUTDOWN_TIMEOUT seconds (Celery's soft shutdown, off by default in
    Celery). A project that sets a consumer (`CELERY_WORKER_CONSUMER`) or a soft shutdown timeout
    (`CELERY_WORKER_SOFT_SHUTDOWN_TIMEOUT`) of its own keeps it."""
    from celery.utils.imports import symbol_by_name

    if jobs_settings.celery("WORKER_SOFT_SHUTDOWN_TIMEOUT") is None:
        worker.app.conf.worker_soft_shutdown_timeout = float(jobs_settings.SHUTDOWN_TIMEOUT)

    worker.app.steps["worker"].update({ZeroIsNoLimitStep, ShutdownLogStep, LedgerStep})
    guard_plain_tasks(worker.app)
    worker.app.steps["consumer"].update({LivenessStep, QueuePauseStep})
    if symbol_by_name(worker.consumer_cls) is Consumer:
        worker.consumer_cls = JobConsumer
