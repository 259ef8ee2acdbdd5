"""Database access from the places a request cycle never cleans up after: the worker's main
process, its background threads, and the end of a task.

Celery's Django fix-up closes connections around tasks in the pool processes only. The worker's
main process keeps the connection it opened first for as long as it lives, so after a database
restart or failover every later write there would fail on a dead socket. `with_fresh_connection`
runs a call and, when it fails on a connection error, closes the connection and tries again on a
new one (no health check up front: that would be one more query before every write).
"""

from __future__ import annotations

import contextlib
import threading
import time
from collections.abc import Callable
from typing import TypeVar

from django.db import InterfaceError, OperationalError, close_old_connections, connection, connections

from jobs.logging import get_logger

logger = get_logger("jobs.db")

T = TypeVar("T")

#: Errors of the connection rather than of the statement: worth a new connection and one more try.
CONNECTION_ERRORS = (InterfaceError, OperationalError)


def with_fresh_connection(call: Callable[[], T], *, what: str, attempts: int = 3, pause: float = 0.5) -> T:
    """Runs `call()` (a few statements) on a usable connection, reconnecting after a connection
    error up to `attempts` times; the last error is raised. Inside a transaction nothing can be
    retried: the error is raised at once."""
    for attempt in range(1, attempts + 1):
        try:
            return call()
        except CONNECTION_ERRORS as exc:
            if connection.in_atomic_block or attempt == attempts:
                raise
            logger.warning(
                "db.reconnecting",
                extra={"what": what, "attempt": attempt, "error": f"{type(exc).__name__}: {exc}"[:300]},
            )
            close_connection()
            time.sleep(pause * attempt)
    raise AssertionError("unreachable")  # pragma: no cover


def drop_stale_connection() -> None:
    """Drops this thread's connection if it errored or outlived CONN_MAX_AGE (the next query then
    connects, and health-checks a kept one): for code that runs outside a request cycle."""
    with contextlib.suppress(Exception):  # closing a dead socket may fail too; it is gone anyway
        close_old_connections()


#: How often a task's connections are checked at most (see `recycle_between_tasks`).
TASK_RECYCLE_INTERVAL = 1.0
_recycled = threading.local()


def recycle_between_tasks() -> None:
    """Django's request-cycle rule between tasks (`drop_stale_connection`), applied at most once a
    second per thread unless a connection saw an error or was left in a transaction: a worker
    draining hundreds of short tasks a second would otherwise pay a health-check query
    (`SELECT 1`) before each one. A connection the database dropped within that second fails the
    next task's first query, a connection error every task's retry policy already treats as
    transient; it is dropped right after."""
    now = time.monotonic()
    if not _needs_recycling() and now - getattr(_recycled, "at", float("-inf")) < TASK_RECYCLE_INTERVAL:
        return
    _recycled.at = now
    drop_stale_connection()


def _needs_recycling() -> bool:
    """A connection that saw an error, or was left outside autocommit or inside an atomic block
    (a time limit that fired mid-transaction): Django's rule must run now, not in a second, or the
    next task's writes would go into a transaction nobody commits. No query is made."""
    for conn in connections.all(initialized_only=True):
        if conn.errors_occurred or conn.in_atomic_block:
            return True
        if conn.connection is not None and not conn.get_autocommit():
            return True
    return False


def close_connection() -> None:
    """Closes this thread's connection, dead or alive, without raising."""
    with contextlib.suppress(Exception):
        connection.close()
