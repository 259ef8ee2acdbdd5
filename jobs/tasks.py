"""Tasks of the jobs machinery."""

from __future__ import annotations

import socket

from celery import shared_task

from jobs.base import JobTask


@shared_task(name="jobs.ping")
def ping() -> dict[str, str]:
    """A no-op that proves a worker consumes and stores results (smoke tests, deploy checks)."""
    return {"pong": socket.gethostname()}


@shared_task(base=JobTask, name="jobs.dead_letter_digest", alert_on_dead_letter=False, retry_limit=2)
def dead_letter_digest() -> int:
    """Mails the digest of new dead letters (see `jobs.alerts`)."""
    from jobs.alerts import dead_letter_digest_send

    return dead_letter_digest_send()
