"""Tasks of the jobs machinery."""

from __future__ import annotations

import socket
from typing import Any, TypedDict

from celery import shared_task

from jobs.base import JobTask
from jobs.conf import jobs_settings


@shared_task(base=JobTask, name="jobs.ping", retry_limit=0)
def ping() -> dict[str, str]:
    """A no-op that proves a worker consumes and stores results (smoke tests, deploy checks)."""
    return {"pong": socket.gethostname()}


@shared_task(base=JobTask, name="jobs.dead_letter_digest", alert_on_dead_letter=False, retry_limit=2)
def dead_letter_digest(window: str = "") -> int:
    """Mails the digest of new dead letters (see `jobs.alerts`); with `window`, the follow-up
    due when that alert window ends."""
    from jobs.alerts import dead_letter_digest_send, dead_letter_follow_up

    return dead_letter_follow_up(window) if window else dead_letter_digest_send()


class _Quiet(TypedDict):
    """A TypedDict, not a dict[str, bool]: `shared_task(**QUIET)` then type-checks key by key."""

    ignore_result: bool
    send_events: bool


#: Housekeeping that runs every few seconds stays out of the task history and Flower's task list
#: (about 11 500 rows a day otherwise); the worker's metrics still count it, and a failure still
#: ends in a dead letter.
QUIET: _Quiet = {"ignore_result": True, "send_events": False}


@shared_task(base=JobTask, name="jobs.heartbeat", retry_limit=0, alert_on_dead_letter=False, **QUIET)
def heartbeat() -> dict[str, Any]:
    """Sent by beat every 30 s: records that a worker consumes (for `/api/jobs/health/`)."""
    from jobs.heartbeat import heartbeat_write

    return heartbeat_write("worker")


@shared_task(base=JobTask, name="jobs.cleanup_temp_files")
def cleanup_temp_files() -> dict[str, Any]:
    """Removes temporary files older than CLEANUP_MAX_AGE_HOURS (hourly)."""
    from datetime import timedelta

    from jobs.cleanup import cleanup_roots, temp_files_cleanup

    report = temp_files_cleanup(roots=cleanup_roots(), max_age=timedelta(hours=jobs_settings.CLEANUP_MAX_AGE_HOURS))
    return report.as_dict()


@shared_task(base=JobTask, name="jobs.dead_letter_retention")
def dead_letter_retention() -> int:
    """Purges requeued and discarded dead letters older than JOBS_DEAD_LETTER_RETENTION_DAYS, and
    jobs' attempts older than JOBS_ATTEMPT_RETENTION_DAYS (daily). Returns the dead letters purged."""
    from datetime import timedelta

    from jobs.services import dead_letters_purge, job_attempts_purge

    job_attempts_purge(older_than=timedelta(days=jobs_settings.ATTEMPT_RETENTION_DAYS))
    return dead_letters_purge(older_than=timedelta(days=jobs_settings.DEAD_LETTER_RETENTION_DAYS), actor="retention")


@shared_task(base=JobTask, name="jobs.daily_report")
def daily_report() -> int:
    """Stores (and mails, when DEAD_LETTER_ALERT_EMAILS is set) the daily task report."""
    from jobs.reports import daily_report_create

    return daily_report_create().pk


@shared_task(base=JobTask, name="jobs.outbox_relay", retry_limit=0, alert_on_dead_letter=False, **QUIET)
def outbox_relay() -> dict[str, Any]:
    """The ledger's upkeep from beat (every 10 s), besides every worker's own sweeper thread:
    publishes what waits in the outbox, republishes what the broker lost (`jobs.runtime.ledger`)."""
    from jobs.runtime.ledger import ledger_run

    return ledger_run()
