"""The mailer's tasks: send one stored email, by id (a Celery task on `JobTask`), and purge old
sent emails (a `@task` of Django's Tasks API, run on the same workers by `jobs.backends`)."""

from __future__ import annotations

import smtplib
import ssl
from typing import Any

import django
import requests
from anymail.exceptions import AnymailAPIError, AnymailError, AnymailRecipientsRefused
from celery import shared_task
from celery.signals import worker_process_shutdown

from jobs.backends import task_options
from jobs.base import JobTask
from jobs.exceptions import InvalidTaskArguments
from jobs.ids import is_row_id
from jobs.outcomes import USER_ERROR, ErrorKind, Job
from mailer import backend
from mailer.models import Email
from mailer.services import HandOffInProgress, email_mark_failed, email_release, email_send, emails_purge

if django.VERSION >= (6, 0):
    from django.tasks import task

    # Django 6.0 deprecates BadHeaderError: a header with CR or LF is the email package's ValueError.
    BadHeaderError: type[ValueError] = ValueError
else:  # Django 5.2 LTS: Django's Tasks API is the django-tasks backport
    from django.core.mail import BadHeaderError
    from django_tasks import task


#: SMTP replies to RCPT that say the address itself is bad (the user's input), not our sending.
USER_RECIPIENT_CODES = frozenset({550, 551, 553})


def classify_send_error(exc: BaseException) -> str | None:
    """`"transient"`, `"permanent"` or `"user"` for an error a backend raised, None when it is
    not one of the errors this knows (then `JobTask`'s own lists decide).

    SMTP: 4xx replies are transient (greylisting, a full queue, 451 local error), 5xx permanent;
    refused recipients are the user's (`"user"`: the email fails with a message saying so, no
    dead letter pages an operator) unless every refusal was a 4xx. Providers (anymail): 429 and
    5xx are transient, other 4xx are invalid requests and permanent; refused recipients are the
    user's; timeouts and connection errors are transient everywhere.
    """
    if isinstance(exc, AnymailRecipientsRefused):
        return ErrorKind.USER  # the address the user gave: the email fails, no dead letter
    if isinstance(exc, requests.Timeout | requests.ConnectionError):  # anymail wraps these too
        return "transient"
    if isinstance(exc, AnymailAPIError):
        status = exc.status_code if exc.status_code is not None else _boto_status(exc.__cause__)
        if status is None:
            return "transient" if _is_boto_network_error(exc.__cause__) else None
        if status == 429 or status >= 500:
            return "transient"
        if 400 <= status < 500:
            return "permanent"
        return None
    if isinstance(exc, AnymailError):  # invalid address, unsupported feature, serialization
        return "permanent"
    if isinstance(exc, smtplib.SMTPRecipientsRefused):
        codes = [code for code, _ in exc.recipients.values()]
        if codes and all(400 <= code < 500 for code in codes):
            return "transient"
        # 550/551/553 about the mailbox (5.1.x: no such user, bad address) are the user's; a policy
        # refusal (5.7.x: our IP blocklisted, relaying denied) fails every email: the system's.
        replies = [bytes(reply).decode(errors="replace") for _, reply in exc.recipients.values()]
        if all(code in USER_RECIPIENT_CODES for code in codes) and not any("5.7." in r for r in replies):
            return ErrorKind.USER
        return "permanent"
    if isinstance(exc, smtplib.SMTPServerDisconnected | smtplib.SMTPConnectError):
        return "transient"
    if isinstance(exc, smtplib.SMTPResponseException):
        if 400 <= exc.smtp_code < 500:
            return "transient"
        if 500 <= exc.smtp_code < 600:
            return "permanent"
        return None
    if isinstance(exc, smtplib.SMTPNotSupportedError | ssl.SSLCertVerificationError | BadHeaderError):
        return "permanent"  # a configuration or a message that retrying cannot change
    if isinstance(exc, FileNotFoundError | PermissionError):
        return "permanent"  # an attachment gone from storage
    if isinstance(exc, OSError):
        return "transient"  # network unreachable, connection reset, TLS hiccups
    return None


def _boto_status(cause: BaseException | None) -> int | None:
    """The HTTP status of a botocore `ClientError` (Amazon SES), which anymail wraps."""
    response = getattr(cause, "response", None)
    if isinstance(response, dict):
        status = response.get("ResponseMetadata", {}).get("HTTPStatusCode")
        return status if isinstance(status, int) else None
    return None


def _is_boto_network_error(cause: BaseException | None) -> bool:
    # botocore's EndpointConnectionError, ConnectTimeoutError, ReadTimeoutError (not imported:
    # boto3 is only installed where Amazon SES is used).
    return cause is not None and any(
        klass.__module__.startswith("botocore") and klass.__name__.endswith(("ConnectionError", "TimeoutError"))
        for klass in type(cause).__mro__
    )


class EmailTask(JobTask):
    """`JobTask` that reads SMTP reply codes and provider statuses, and marks the email `failed`
    when the job is given up (the dead letter is `JobTask`'s; an address refused for good is the
    user's: a message for them, no dead letter)."""

    def classify(self, exc: BaseException) -> str:
        return classify_send_error(exc) or super().classify(exc)

    def user_message(self, exc: BaseException) -> str:
        if isinstance(exc, smtplib.SMTPRecipientsRefused):
            return f"The receiving mail server refused the address for good: {', '.join(sorted(exc.recipients))}."
        if isinstance(exc, AnymailRecipientsRefused):
            return f"The mail provider refused the address for good ({exc})."
        return super().user_message(exc)

    def on_lost(self, job: Job) -> None:
        email_id = job.argument(0, "email_id")
        if is_row_id(email_id) and job.run:
            email_release(email_id=email_id, attempt=job.run)

    def on_give_up(self, job: Job, *, reason: str, error: str) -> None:
        email_id = job.argument(0, "email_id")
        if error.startswith(f"{HandOffInProgress.__name__}:"):
            return  # a copy gave up waiting; the attempt that holds the email decides its status
        if is_row_id(email_id):
            email_mark_failed(email_id=email_id, error=error, users_error=reason == USER_ERROR)


@shared_task(bind=True, base=EmailTask, name="mailer.send_email")  # routed to `high` by CELERY_TASK_ROUTES
def send_email(self: EmailTask, email_id: int) -> str:
    """Sends the stored email `email_id`; returns its status."""
    if not is_row_id(email_id):
        raise InvalidTaskArguments(f"email_id must be a positive integer, not {email_id!r}")
    try:
        return email_send(email=email_id, attempt=self.run_token()).status
    except Email.DoesNotExist:  # never existed, or deleted after it was queued: nothing a retry could fix
        raise InvalidTaskArguments(f"email {email_id} does not exist") from None


@worker_process_shutdown.connect
def _close_connection(**kwargs: Any) -> None:
    backend.close_connection()


@task(priority=-10)  # no queue named: a negative priority runs it on `low`
@task_options(max_retries=3)
def purge_sent_emails(older_than_days: int) -> int:
    """Deletes emails sent more than `older_than_days` days ago, with their attachment files, and
    returns how many (`POST /api/emails/purge/` enqueues it; `get_result` reports it)."""
    return emails_purge(older_than_days=older_than_days)
