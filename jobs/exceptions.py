"""How a task says what kind of failure it met.

Raise (or wrap into) these at the edge, where the cause is known: a corrupt image is permanent,
an SMTP timeout is transient. `JobTask` retries transient errors with backoff, sends permanent
ones straight to a dead letter, and ends a job that failed on what a user sent (`UserError`)
without one.
"""

from __future__ import annotations


class JobError(Exception):
    """Base of the project's task errors."""


class TransientError(JobError):
    """Worth retrying later: a timeout, a refused connection, a provider's 5xx or 429."""


class PermanentError(JobError):
    """Retrying cannot help: bad input, a rejected recipient, a corrupt file."""


class UserError(PermanentError):
    """The job cannot work because of what a user sent: a corrupt upload, an address the provider
    refuses for good. It ends failed, its app shows the user `user_message`, and it is logged
    (`job.user_error`), but it is no dead letter and alerts nobody: there is nothing to replay and
    nothing for an operator to fix."""

    def __init__(self, message: str, *, user_message: str | None = None) -> None:
        super().__init__(message)
        self.user_message = user_message or message


class InvalidTaskArguments(PermanentError):
    """A task was called with arguments it cannot accept (wrong type, out of range)."""


class RetryLater(TransientError):
    """Not yet: the job waits for something with a known end (another attempt's lease on the same
    row). Retried with the usual backoff, but never later than `retry_after` seconds, and without
    using up the retry budget (up to `JobTask.postpone_limit` times)."""

    def __init__(self, message: str, *, retry_after: float) -> None:
        super().__init__(message)
        self.retry_after = max(float(retry_after), 1.0)


class DuplicateJob(JobError):
    """`enqueue(..., unique_key=..., unique_policy="raise")` met an unfinished job holding the key."""

    def __init__(self, unique_key: str, task_id: str) -> None:
        super().__init__(f"job {task_id} holds the unique key {unique_key!r}")
        self.unique_key = unique_key
        self.task_id = task_id
