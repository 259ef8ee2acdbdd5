"""Readiness checks: can this process reach its database and its broker right now?

Each check is quick (short timeouts) and returns a small dict; none raises.
"""

from __future__ import annotations

import time
from typing import Any
from urllib.parse import urlsplit, urlunsplit

from django.db import connections

BROKER_CHECK_TIMEOUT = 2.0


def redact_url(url: str) -> str:
    """`url` with any password replaced by `***`, safe to log or show."""
    try:
        parts = urlsplit(url)
    except ValueError:
        return "<unparsable url>"
    if parts.password is None:
        return url
    netloc = parts.netloc.rsplit("@", 1)[1]
    user = parts.username or ""
    return urlunsplit(parts._replace(netloc=f"{user}:***@{netloc}"))


def _timed(check) -> dict[str, Any]:
    started = time.perf_counter()
    try:
        details = check() or {}
    except Exception as exc:  # noqa: BLE001 - any failure makes the check fail, with its reason
        return {"ok": False, "error": f"{type(exc).__name__}: {redact_url(str(exc))}"[:300]}
    return {"ok": True, "latency_ms": round((time.perf_counter() - started) * 1000, 1), **details}


def check_database(alias: str = "default") -> dict[str, Any]:
    """Runs `SELECT 1` on the database."""

    def run() -> None:
        with connections[alias].cursor() as cursor:
            cursor.execute("SELECT 1")
            cursor.fetchone()

    return _timed(run)


def check_broker() -> dict[str, Any]:
    """Opens a fresh connection to the Celery broker (never a pooled one that may be stale)."""
    from config.celery import app

    def run() -> dict[str, Any]:
        with app.connection_for_write() as conn:
            conn.ensure_connection(max_retries=0, timeout=BROKER_CHECK_TIMEOUT)
            channel = conn.default_channel
            client = getattr(channel, "client", None)
            if client is not None:  # Redis: a round trip, not only a socket
                client.ping()
            return {"transport": conn.transport.driver_name}

    return _timed(run)


def readiness() -> tuple[bool, dict[str, Any]]:
    """All readiness checks and whether every one passed."""
    checks = {"database": check_database(), "broker": check_broker()}
    return all(c["ok"] for c in checks.values()), checks
