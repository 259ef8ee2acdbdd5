"""Readiness checks: can this process reach its database and its broker right now?

Each check is quick (short timeouts) and returns a small dict; none raises.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

from django.db import connections

from jobs.redaction import redact_text

BROKER_CHECK_TIMEOUT = 2


def _timed(check: Callable[[], dict[str, Any] | None]) -> dict[str, Any]:
    started = time.perf_counter()
    try:
        details = check() or {}
    except Exception as exc:  # noqa: BLE001 - any failure makes the check fail, with its reason
        return {"ok": False, "error": f"{type(exc).__name__}: {redact_text(str(exc))}"[:300]}
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
    from celery import current_app as app

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


WORKER_HEARTBEAT_MAX_AGE = 90.0  # the heartbeat task runs every 30 s
BEAT_TICK_MAX_AGE = 90.0


def _iso(timestamp: float | None) -> str | None:
    from datetime import UTC, datetime

    return datetime.fromtimestamp(timestamp, tz=UTC).isoformat() if timestamp else None


def jobs_health_report() -> dict[str, Any]:
    """`{"worker": {"ok", "last_heartbeat", "age_seconds"}, "beat": {"ok", "last_tick"}}`."""
    from jobs.heartbeat import heartbeat_read

    now = time.time()
    report = {}
    for name, key, max_age in (
        ("worker", "last_heartbeat", WORKER_HEARTBEAT_MAX_AGE),
        ("beat", "last_tick", BEAT_TICK_MAX_AGE),
    ):
        try:
            seen = heartbeat_read(name)
        except Exception:  # noqa: BLE001 - the cache being down means we cannot vouch for anything
            seen = None
        at = seen["at"] if seen else None
        age = round(now - at, 1) if at else None
        report[name] = {"ok": age is not None and age <= max_age, key: _iso(at), "age_seconds": age}
    return report


def jobs_stats_report() -> dict[str, Any]:
    """What an operator looks at first: backlog, outcomes over 24 h, dead letters."""
    from datetime import timedelta

    from django.db.models import Count
    from django.utils import timezone
    from django_celery_results.models import TaskResult

    from jobs.selectors import dead_letter_counts, dead_letter_oldest_pending_age, queue_lengths

    try:
        queues: dict[str, Any] = queue_lengths()
    except Exception as exc:  # noqa: BLE001
        queues = {"error": f"{type(exc).__name__}: {redact_text(str(exc))}"[:300]}
    since = timezone.now() - timedelta(hours=24)
    by_state: dict[str, int] = {}
    by_task: dict[str, dict[str, int]] = {}
    rows = TaskResult.objects.filter(date_done__gte=since).values("task_name", "status").annotate(n=Count("id"))
    for row in rows.order_by():
        by_state[row["status"]] = by_state.get(row["status"], 0) + row["n"]
        by_task.setdefault(row["task_name"] or "<unknown>", {})[row["status"]] = row["n"]
    from jobs.runtime.outbox import outbox_backlog

    return {
        "queues": queues,
        "outbox_backlog": outbox_backlog(),
        "tasks_24h": {"by_state": by_state, "by_task": by_task},
        "dead_letters": {
            **dead_letter_counts(),
            "oldest_pending_age_seconds": round(dead_letter_oldest_pending_age(), 1),
        },
        "health": jobs_health_report(),
    }
