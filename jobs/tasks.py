"""Tasks of the jobs machinery."""

from __future__ import annotations

import socket

from celery import shared_task


@shared_task(name="jobs.ping")
def ping() -> dict[str, str]:
    """A no-op that proves a worker consumes and stores results (smoke tests, deploy checks)."""
    return {"pong": socket.gethostname()}
