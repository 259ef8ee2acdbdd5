"""`JobTask`: the base class of every task of the project.

It owns what each task would otherwise get wrong on its own:

- errors sorted into transient (retried with exponential backoff and jitter), permanent and
  unexpected (both straight to a dead letter); each task type may extend the lists;
- a retry delay that never reaches the Redis visibility timeout (else the held retry would be
  delivered twice);
- crash-loop quarantine: a task whose worker died under it `WORKER_LOST_LIMIT` times in a row is
  dead-lettered instead of being handed to the next worker;
- one dead letter per logical job, written when the task fails for good;
- the request id and task id in every log line the task writes (see `jobs.runtime.handlers`).

A concrete task stays a few lines::

    @shared_task(base=JobTask, name="thumbnails.generate", transient_errors=(StorageUnavailable,))
    def generate(image_id: int) -> None: ...
"""

from __future__ import annotations

import errno
import os
import smtplib
import socket
import time
from typing import Any, ClassVar

import requests
from celery import Task
from celery.exceptions import Ignore, Reject, Retry, SoftTimeLimitExceeded, TimeLimitExceeded
from django.db import InterfaceError, OperationalError

from jobs import crashloop
from jobs.conf import jobs_settings
from jobs.exceptions import PermanentError, RetryLater, TransientError, UserError
from jobs.limits import LimitError, LimitKey, limit_keys
from jobs.logging import get_logger
from jobs.models import DeadLetter
from jobs.outcomes import LEDGER_HEADER, USER_ERROR, ErrorKind, Job, job_gave_up, job_refused_input, run_token
from jobs.reports import retry_count_add
from jobs.retries import retry_delay
from jobs.runtime.store import Run, Skip, job_retry, job_start_waiting

logger = get_logger("jobs.task")

#: Network and database hiccups: worth another try for any task.
DEFAULT_TRANSIENT_ERRORS: tuple[type[BaseException], ...] = (
    TransientError,
    TimeoutError,
    ConnectionError,
    socket.gaierror,
    smtplib.SMTPServerDisconnected,
    smtplib.SMTPConnectError,
    requests.ConnectionError,
    requests.Timeout,
    OperationalError,
    InterfaceError,
)

#: A plain OSError with one of these is the network, not the task: retried too.
NETWORK_ERRNOS = frozenset(
    {
        errno.ENETDOWN,
        errno.ENETUNREACH,
        errno.ENETRESET,
        errno.EHOSTDOWN,
        errno.EHOSTUNREACH,
        errno.ECONNABORTED,
        errno.ECONNRESET,
        errno.ECONNREFUSED,
        errno.ETIMEDOUT,
        errno.EPIPE,
    }
)


def is_transient_by_default(exc: BaseException) -> bool:
    """Network and database errors, an SMTP 4xx reply and an HTTP 429 or 5xx (requests)."""
    if isinstance(exc, DEFAULT_TRANSIENT_ERRORS):
        return True
    if isinstance(exc, smtplib.SMTPResponseException):
        return 400 <= exc.smtp_code < 500
    if isinstance(exc, requests.HTTPError) and exc.response is not None:
        return exc.response.status_code == 429 or exc.response.status_code >= 500
    return isinstance(exc, OSError) and exc.errno in NETWORK_ERRNOS


#: Share of the visibility timeout a retry delay may use at most.
VISIBILITY_MARGIN = 0.9
#: Message header counting the postponements (`RetryLater`) among a job's retries.
POSTPONED_HEADER = "jobs_postponed"
#: Where a request keeps its run of the job table (`jobs.runtime.store.Run`), or why it skipped.
RUN_ATTRIBUTE = "jobs_run"
SKIP_ATTRIBUTE = "jobs_skip"
LIMIT_ERROR_ATTRIBUTE = "jobs_limit_error"


def lease_take(request: Any, task: Any = None) -> None:
    """Before a job of the table starts (`task_prerun`, any task class): takes its start lease,
    under the limits `task` declares (`jobs.limits`), or notes why this message must not start the
    body (`skip_copy` then acknowledges it: a copy, or a job throttled to wait in the table). When
    the database does not answer, the message goes back to the broker: nothing may start unleased."""
    if not getattr(request, LEDGER_HEADER, None) or getattr(request, "is_eager", False) or request.called_directly:
        return
    if getattr(request, RUN_ATTRIBUTE, None) is not None or getattr(request, SKIP_ATTRIBUTE, None) is not None:
        return
    from jobs.runtime.pause import is_paused

    if is_paused(str((request.delivery_info or {}).get("routing_key") or "")):
        # Taken before its worker stopped consuming the queue: back to the queue, where it waits.
        setattr(request, SKIP_ATTRIBUTE, "paused")
        return
    keys = []
    if task is not None:
        try:
            keys = limit_keys(task, request.args or (), request.kwargs or {})
        except LimitError as exc:
            # Started without its limits only to end at once as a dead letter naming why.
            setattr(request, LIMIT_ERROR_ATTRIBUTE, str(exc))
    try:
        outcome = _start(request, keys)
    except Exception as exc:  # noqa: BLE001 - fail closed: Celery would log a raise and run the body unleased
        logger.warning("job.lease_unavailable", extra={"error": f"{type(exc).__name__}: {exc}"[:300]})
        setattr(request, SKIP_ATTRIBUTE, "database")
        return
    if isinstance(outcome, Run):
        setattr(request, RUN_ATTRIBUTE, outcome)
    elif isinstance(outcome, Skip):
        setattr(request, SKIP_ATTRIBUTE, outcome)
    else:
        setattr(request, SKIP_ATTRIBUTE, "throttled")
        logger.info("job.throttled", extra={"limit": outcome.limit, "until": outcome.until.isoformat()})


def _start(request: Any, keys: list[LimitKey]) -> Any:
    retries, hostname = int(request.retries or 0), request.hostname or ""
    if not keys:
        return job_start_waiting(request.id, retries=retries, hostname=hostname)
    from functools import partial

    from jobs.runtime.limits import job_start_limited

    limited = partial(job_start_limited, keys=keys)
    return job_start_waiting(request.id, retries=retries, hostname=hostname, start=limited)


def limit_refused(request: Any) -> None:
    """Raises the `PermanentError` of a job whose limit keys its arguments could not give."""
    error = getattr(request, LIMIT_ERROR_ATTRIBUTE, None)
    if error:
        raise PermanentError(error)


def skip_copy(request: Any) -> None:
    """Raises what ends a message that must not start its job's body: `Ignore` (acknowledged:
    a copy, or the job has ended), or `Reject(requeue=True)` (given back: the database did not
    answer, or the previous attempt has not handed the row over yet)."""
    skip = getattr(request, SKIP_ATTRIBUTE, None)
    if skip is None:
        return
    from jobs import metrics

    if skip in {"database", "paused", Skip.EARLY}:
        time.sleep(1.0)  # not a hot loop of deliveries while the database is away
        raise Reject(f"job not started: {skip}", requeue=True)
    if skip == "throttled":
        raise Ignore()  # it waits in the job table for its limit (`job.throttled` said so)
    metrics.copy_skipped(task_name=str(request.task or ""), reason=str(skip))
    logger.info("job.copy_skipped", extra={"reason": str(skip), "retries": request.retries or 0})
    raise Ignore()


class Quarantined(PermanentError):
    """The task's worker was lost too many times in a row while running it."""


class MeteredTask(Task[..., Any]):
    """The app's default task class (see config/celery.py): every task, even one not built on
    `JobTask` (Celery's own `celery.backend_cleanup`), is counted in the worker's metrics."""

    abstract = True
    Request = "jobs.runtime.worker:JobRequest"


class JobTask(MeteredTask):
    """Base task: retry policy, dead letters, quarantine, logging context."""

    abstract = True
    # A job is acknowledged once it has ended, and given back when its pool process dies (the
    # crash-loop quarantine stops one that keeps killing it), whatever the project's defaults.
    acks_late = True
    reject_on_worker_lost = True

    #: Exception classes retried with backoff, in addition to `is_transient_by_default`.
    transient_errors: ClassVar[tuple[type[BaseException], ...]] = ()
    #: Exception classes never retried (checked before the transient ones).
    permanent_errors: ClassVar[tuple[type[BaseException], ...]] = ()
    #: Per task type; `None` takes `JOBS_TASK_MAX_RETRIES`, `JOBS_TASK_RETRY_BACKOFF_BASE`, `..._MAX`.
    retry_limit: int | None = None
    backoff_base: float | None = None
    backoff_max: float | None = None
    #: Whether a dead letter of this task sends alerts (off for the alerting task itself).
    alert_on_dead_letter: bool = True
    #: Postponements (`RetryLater`) allowed before they count against the retry budget (a safety
    #: net: what a job waits for has an end, and the backoff soon reaches it).
    postpone_limit: int = 50

    #: What Celery logs as expected besides a user's error (`throws`).
    _declared_throws: tuple[type[BaseException], ...] = ()

    @property  # type: ignore[override]
    def throws(self) -> tuple[type[BaseException], ...]:
        """What Celery logs as an expected failure (INFO, no traceback) rather than at ERROR: a
        user's error (`ErrorKind.USER`: a corrupt upload) is theirs to fix, logged as
        `job.user_error` already, and must not page anyone; and what the task declares."""
        if getattr(self.request, "jobs_reason", None) == USER_ERROR:
            return (BaseException,)
        return self._declared_throws

    @throws.setter
    def throws(self, value: tuple[type[BaseException], ...]) -> None:
        self._declared_throws = tuple(value)

    # --- policy -------------------------------------------------------------------------------

    def classify(self, exc: BaseException) -> str:
        """`ErrorKind.USER`, `PERMANENT`, `TRANSIENT` or `UNEXPECTED` for an exception the task
        raised. Override to look inside an exception (an SMTP reply code, an HTTP status)."""
        if isinstance(exc, UserError):
            return ErrorKind.USER
        if isinstance(exc, (PermanentError, *self.permanent_errors)):
            return ErrorKind.PERMANENT
        if isinstance(exc, self.transient_errors) or is_transient_by_default(exc):
            return ErrorKind.TRANSIENT
        return ErrorKind.UNEXPECTED

    def on_lost(self, job: Job) -> None:
        """Hook: the pool process running this job died or was stopped (a crash, the OOM killer,
        Celery cancelling it when the broker connection dropped). The job will run again; release
        here what its attempt held (a claim with a lease), so the next attempt need not wait for
        the lease: what was claimed under `job.run` (see `run_token`), never by the task id alone,
        which another run of the same job shares. Called in the worker's main process; must be
        idempotent and quick."""

    def run_token(self) -> str:
        """Names this run of the job (in the body): claim the app's rows under it, and `on_lost`
        receives the same token as `job.run` when this run's process is lost."""
        return run_token(str(self.request.id or ""), str(self.request.hostname or ""), os.getpid())

    def on_give_up(self, job: Job, *, reason: str, error: str) -> None:
        """Hook for the app that owns the job: it was given up for good (its dead letter is
        written). Mark the app's own row failed here. Called once per give-up, in whichever process
        saw the job end (a pool process, or the worker's main process after a hard time limit or a
        revoke), with a usable database connection; it must be idempotent."""

    def attempt_starting(self) -> None:
        """Hook: an attempt is about to run (`task_prerun`, before its STARTED state is stored);
        `self.request` is the attempt's."""

    def retry_headers(self, request: Any, exc: BaseException) -> dict[str, Any]:
        """Hook: headers the retry's message carries on to the next attempt (this one failed
        with `exc`)."""
        return {}

    def user_message(self, exc: BaseException) -> str:
        """What the user is told when the job failed on what they sent (`ErrorKind.USER`): the
        exception's `user_message`, else its text. Override to word it for people."""
        return str(getattr(exc, "user_message", None) or exc)

    def retries_allowed(self) -> int:
        return jobs_settings.TASK_MAX_RETRIES if self.retry_limit is None else self.retry_limit

    def backoff_policy(self) -> tuple[float, float]:
        """(base, cap) of this task's retry delays: its own, else the project's settings."""
        base = jobs_settings.TASK_RETRY_BACKOFF_BASE if self.backoff_base is None else self.backoff_base
        cap = jobs_settings.TASK_RETRY_BACKOFF_MAX if self.backoff_max is None else self.backoff_max
        return base, cap

    def retry_countdown(self, attempt: int, *, capped: bool = True) -> float:
        """Seconds before retry `attempt` (1-based), below the broker's visibility timeout
        (`capped`; a job of the job table waits there instead, uncapped)."""
        base, cap = self.backoff_policy()
        return retry_delay(attempt, base=base, cap=cap, ceiling=self.retry_ceiling() if capped else None)

    def retry_ceiling(self) -> float | None:
        """The longest a retry may wait on Redis: a held retry must be run (and acknowledged)
        before the visibility timeout, else Redis hands it to a second worker. So the delay, the
        task's time limit and a margin for waiting on a free pool process must all fit in it."""
        if not jobs_settings.broker_is_redis:
            return None
        visibility = jobs_settings.visibility_timeout
        time_limit = self.time_limit or jobs_settings.task_time_limit
        margin = max(visibility * (1 - VISIBILITY_MARGIN), 60.0)
        return max(visibility - time_limit - margin, 1.0)

    def _below_visibility(self, delay: float) -> float:
        ceiling = self.retry_ceiling()
        return delay if ceiling is None else min(delay, ceiling)

    # --- execution ----------------------------------------------------------------------------

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        request = self.request
        if request.called_directly:  # a plain function call, in tests or from other code
            return self.run(*args, **kwargs)
        skip_copy(request)
        return self._run_attempt(request, args, kwargs)

    def _run_attempt(self, request: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
        redelivered = bool((request.delivery_info or {}).get("redelivered"))
        try:
            limit_refused(request)
            if redelivered:
                deaths = crashloop.note_redelivery(request.id)
                if deaths >= jobs_settings.WORKER_LOST_LIMIT:
                    request.jobs_reason = DeadLetter.Reason.WORKER_LOST
                    raise Quarantined(f"the worker running this task was lost {deaths} times in a row; quarantined")
            return self.run(*args, **kwargs)
        except (Retry, Ignore):
            raise
        except Reject as exc:
            # A Reject the task raised itself: without requeue, the message is dropped, so the job
            # ends here (a dead letter), not in a row the sweeper would bring back for ever.
            if not getattr(exc, "requeue", False) and not getattr(request, "jobs_reason", None):
                request.jobs_reason = DeadLetter.Reason.REJECTED
            raise
        except (SoftTimeLimitExceeded, TimeLimitExceeded):
            request.jobs_reason = DeadLetter.Reason.TIME_LIMIT
            raise
        except Exception as exc:
            if getattr(request, "jobs_reason", None):
                raise
            request.jobs_reason = self._failure_reason(request, exc)
            raise
        finally:
            if redelivered:
                crashloop.clear(request.id)

    def _failure_reason(self, request: Any, exc: Exception) -> str:
        """Retries a transient error (raising Retry) or names why the task fails for good."""
        kind = self.classify(exc)
        if kind == ErrorKind.USER:
            return USER_ERROR
        if kind == ErrorKind.PERMANENT:
            return DeadLetter.Reason.PERMANENT_ERROR
        if kind != ErrorKind.TRANSIENT:
            return DeadLetter.Reason.UNEXPECTED_ERROR
        limit = self.retries_allowed()
        # Postponements (RetryLater) are retries that use none of the budget; a header counts them.
        postponed = int(getattr(request, POSTPONED_HEADER, 0) or 0)
        headers = dict(request.headers or {})
        if isinstance(exc, RetryLater) and postponed < self.postpone_limit:
            attempt = request.retries + 1
            # Look again with the usual backoff, never later than the moment the wait ends.
            delay = self._below_visibility(min(self.retry_countdown(postponed + 1), exc.retry_after))
            postponed += 1
        else:
            if request.retries - postponed >= limit:
                return DeadLetter.Reason.RETRIES_EXHAUSTED
            attempt = request.retries + 1
            # A job of the table waits there for its retry: no visibility timeout to stay under.
            in_table = getattr(request, RUN_ATTRIBUTE, None) is not None
            delay = self.retry_countdown(attempt - postponed, capped=not in_table)
        headers[POSTPONED_HEADER] = postponed
        carried = self.retry_headers(request, exc)
        headers.update(carried)
        logger.warning(
            "task.retry",
            extra={
                "attempt": attempt,
                "max_retries": limit,
                "delay_seconds": round(delay, 3),
                "error": f"{type(exc).__name__}: {exc}"[:500],
            },
        )
        retry_count_add(self.name)
        request.headers = headers  # the retry's message (and a ledger row) carry the count on
        run = getattr(request, RUN_ATTRIBUTE, None)
        if run is not None:
            # The job table keeps the retry: a long one waits there (no worker holds it), a short
            # one is published now with its countdown. Either way the row says which attempt is next.
            request.jobs_retry_written = True
            if job_retry(
                request.id,
                retries=attempt,
                postponed=postponed,
                delay=delay,
                headers=carried,
                owner=run.owner,
                error=f"{type(exc).__name__}: {exc}",
            ):
                raise Retry(exc=exc, when=delay)  # type: ignore[arg-type]  # Celery takes a float (celery-types: Real)
        try:
            self.retry(exc=exc, countdown=delay, max_retries=limit + postponed, headers=headers)
        except Reject as refused:
            # Celery turns a retry whose publish failed (the broker full, paused or gone) into
            # Reject(requeue=False): the message would be acked and the job lost. The ledger keeps
            # it instead and publishes the retry when it is due.
            self._retry_refused(request, attempt, delay, refused)
        raise AssertionError("Task.retry always raises")  # pragma: no cover

    def _retry_refused(self, request: Any, attempt: int, delay: float, refused: Reject) -> None:
        from jobs.runtime.ledger import ledger_defer_retry

        # celery-types leaves out Reject's attributes (reason, requeue), which Celery sets.
        logger.error("task.retry_refused", extra={"attempt": attempt, "error": f"{refused.reason}"[:500]})  # type: ignore[attr-defined]
        delivery = request.delivery_info or {}
        deferred = ledger_defer_retry(
            task_name=self.name,
            task_id=request.id,
            args=request.args,
            kwargs=request.kwargs,
            headers=dict(request.headers or {}),
            queue=delivery.get("routing_key") or self._default_queue(),
            retries=attempt,
            delay=delay,
        )
        # Recorded: acknowledge this delivery. Not recorded (the database is down too): give the
        # message back to the broker, which keeps it (at worst until its visibility timeout).
        raise Reject(refused.reason, requeue=not deferred)  # type: ignore[attr-defined]  # as above

    # --- the end ------------------------------------------------------------------------------

    def on_failure(
        self, exc: BaseException, task_id: str, args: tuple[Any, ...], kwargs: dict[str, Any], einfo: Any
    ) -> None:
        """The task failed for good: the one failure path (`jobs.outcomes.job_gave_up`)."""
        request = self.request
        reason = getattr(request, "jobs_reason", None)
        if reason is None:
            is_timeout = isinstance(exc, TimeLimitExceeded | SoftTimeLimitExceeded)
            reason = DeadLetter.Reason.TIME_LIMIT if is_timeout else DeadLetter.Reason.UNEXPECTED_ERROR
        delivery = request.delivery_info or {}
        job = Job(
            task_name=self.name,
            task_id=task_id,
            args=tuple(args or ()),
            kwargs=dict(kwargs or {}),
            retries=request.retries or 0,
            queue=delivery.get("routing_key") or self._default_queue(),
            request_id=getattr(request, "request_id", None) or "",
            dead_letter_id=getattr(request, "dead_letter_id", None),
        )
        if reason == USER_ERROR:  # the user's input: their app tells them; no dead letter, no alert
            job_refused_input(task=self, job=job, exc_type=type(exc).__name__, user_message=self.user_message(exc))
            return
        job_gave_up(
            task=self,
            job=job,
            reason=reason,
            exc_type=type(exc).__name__,
            exc_message=str(exc),
            traceback=str(getattr(einfo, "traceback", "") or ""),
            worker=request.hostname or "",
            alert=self.alert_on_dead_letter,
        )

    def _default_queue(self) -> str:
        route = self.app.amqp.router.route({}, self.name)
        queue = route.get("queue")
        return getattr(queue, "name", queue) or jobs_settings.default_queue
