"""The one failure path: how every job ends is decided and recorded here.

A job ends in one of three ways (`Outcome`): it succeeded, it will run again (a retry, now or
from the ledger when the broker refused the retry), or it was given up. Whatever gave it up (its
own error, retries exhausted, a time limit, quarantine after worker losses, a message the worker
cannot run, a revoke, a message the broker cannot take), `job_gave_up()`:

1. writes the dead letter (on a fresh database connection when the old one died);
2. tells the owning app through its task's `on_give_up(job, reason=..., error=...)` hook, so no
   row of the app stays `processing`, `queued` or `sending` with nothing left to move it;
3. forgets the job in the ledger, once its dead letter is safe and its app was told.
"""

from __future__ import annotations

import enum
import hashlib
from dataclasses import dataclass, field
from typing import Any

from jobs.db import with_fresh_connection
from jobs.logging import get_logger

logger = get_logger("jobs.outcomes")

#: The message header that marks a job kept in the ledger (the worker then clears its row at the end).
LEDGER_HEADER = "jobs_ledger"
#: The `reason` a give-up hook hears for a job that failed on what a user sent (`UserError`).
USER_ERROR = "user_error"


class Outcome(enum.StrEnum):
    SUCCEEDED = "succeeded"
    RETRYING = "retrying"
    GAVE_UP = "gave_up"


class ErrorKind(enum.StrEnum):
    """What an exception a task raised means (`JobTask.classify`)."""

    TRANSIENT = "transient"  # retried with backoff
    PERMANENT = "permanent"  # given up at once
    USER = "user"  # given up at once, on what a user sent: no dead letter, no alert
    UNEXPECTED = "unexpected"  # a bug: given up at once, kept as a dead letter


@dataclass(frozen=True)
class Job:
    """What a give-up hook learns about the job: enough to find the app's own row."""

    task_name: str
    task_id: str
    args: tuple[Any, ...] = ()
    kwargs: dict[str, Any] = field(default_factory=dict)
    retries: int = 0
    queue: str = ""
    request_id: str = ""
    dead_letter_id: int | str | None = None
    #: The run that held the job when it was lost (`on_lost`): the token its body got from
    #: `JobTask.run_token()`, so the app releases what that run claimed and nothing of another
    #: run of the same job. Empty where no run is known.
    run: str = ""

    def argument(self, position: int, name: str) -> Any:
        """The argument at `position`, or passed by `name`; None when there is none."""
        if len(self.args) > position:
            return self.args[position]
        return self.kwargs.get(name)


def run_token(task_id: str, hostname: str, pid: int) -> str:
    """Names one run of a job: the job (its id, up to 40 characters) and a digest of the process
    that runs it (its worker's name and its pid), 61 characters at most. Two runs of one job in
    two processes (a run reclaimed from a host cut off, not dead) never share it, also where the
    workers' names differ only at their end and their pids agree (replicas of one deployment, each
    with Celery as PID 1); the worker's main process computes the same token for the pool process
    it lost."""
    process = hashlib.blake2b(f"{hostname}\x00{pid}".encode(), digest_size=10).hexdigest()
    return f"{task_id[:40]}:{process}"


def job_gave_up(
    *,
    task: Any,
    job: Job,
    reason: str,
    exc_type: str,
    exc_message: str,
    traceback: str = "",
    worker: str = "",
    raw_message: str = "",
    alert: bool = True,
) -> Any:
    """Records a job given up for good (see the module's docstring); returns its dead letter, or
    None when the database could not take it (then the ledger keeps the job: it runs again later
    rather than being lost, and the failure is logged with all a replay needs)."""
    from jobs.runtime.ledger import ledger_finish
    from jobs.services import dead_letter_record

    row = dead_letter_record(
        task_name=job.task_name,
        task_id=job.task_id,
        queue=job.queue,
        args=job.args,
        kwargs=job.kwargs,
        exc_type=exc_type,
        exc_message=exc_message,
        traceback=traceback,
        retries=job.retries,
        reason=reason,
        request_id=job.request_id,
        worker=worker,
        dead_letter_id=job.dead_letter_id,
        raw_message=raw_message,
        alert=alert,
    )
    # When the app could not be told, the ledger keeps the job: it runs again and tells the app then.
    told = _tell_app(task, job, reason=reason, error=f"{exc_type}: {exc_message}"[:2000])
    if row is not None and told:
        ledger_finish(job.task_id)
    return row


def _tell_app(task: Any, job: Job, *, reason: str, error: str) -> bool:
    """Calls the task's `on_give_up` hook, if it has one; False when the hook failed (logged)."""
    hook = getattr(task, "on_give_up", None)
    if hook is None:
        return True
    try:
        with_fresh_connection(lambda: hook(job, reason=reason, error=error), what="on_give_up")
    except Exception:
        logger.exception("job.give_up_hook_failed", extra={"task_id": job.task_id, "job_task": job.task_name})
        return False
    return True


def job_refused_input(*, task: Any, job: Job, exc_type: str, user_message: str) -> None:
    """A job that failed on what a user sent (`jobs.exceptions.UserError`, or what a task's
    `classify` calls `ErrorKind.USER`): its app is told (`on_give_up(..., reason="user_error")`,
    to show the user `user_message`), it is logged at WARNING (and counted where metrics are served), and forgotten in
    the ledger. No dead letter, no alert: nothing to replay, nothing for an operator to fix."""
    from jobs import metrics
    from jobs.runtime.ledger import ledger_finish

    metrics.task_event(job.task_name, "user_error")
    logger.warning(
        "job.user_error",
        extra={"task_id": job.task_id, "job_task": job.task_name, "error": f"{exc_type}: {user_message}"[:500]},
    )
    # When the app could not be told, the ledger keeps the job: it runs again, fails the same way,
    # and tells the app then.
    if _tell_app(task, job, reason=USER_ERROR, error=user_message[:2000]):
        ledger_finish(job.task_id)
