"""Connections between tasks: Django's request-cycle rule, without a health-check query before
every short task."""

from __future__ import annotations

import time

import pytest
from django.db import connection

from jobs import db

pytestmark = pytest.mark.django_db(transaction=True)


@pytest.fixture(autouse=True)
def health_checked(monkeypatch):
    # What the shipped settings give PostgreSQL (persistent connections with health checks), on
    # whatever database the suite runs: SQLite's default CONN_MAX_AGE=0 would close every one.
    monkeypatch.setitem(connection.settings_dict, "CONN_MAX_AGE", 60)
    connection.close()
    connection.ensure_connection()
    connection.health_check_enabled = True
    db._recycled.__dict__.clear()
    yield
    connection.health_check_enabled = False


def _health_checks(before) -> int:
    """Runs `before()` and a query, and counts the health checks (`is_usable`) Django made."""
    calls = []
    original = connection.is_usable

    def counting() -> bool:
        calls.append(1)
        return original()

    connection.is_usable = counting
    try:
        before()
        with connection.cursor() as cursor:
            cursor.execute("SELECT 1")
    finally:
        del connection.is_usable
    return len(calls)


def _real_now() -> float:
    """The clock the tests move by hand starts at the real one: patching `time.monotonic` also moves
    Django's own clock (`CONN_MAX_AGE`'s `close_at`), and a made-up start before it (a machine up
    for less than that) would close every connection as too old."""
    return time.monotonic()


def test_a_healthy_connection_is_checked_at_most_once_a_second(monkeypatch):
    now = [_real_now()]
    monkeypatch.setattr(db.time, "monotonic", lambda: now[0])
    assert _health_checks(db.recycle_between_tasks) == 1  # the first task
    now[0] += 0.2
    assert _health_checks(db.recycle_between_tasks) == 0  # the next ones: none
    now[0] += 0.2
    assert _health_checks(db.recycle_between_tasks) == 0
    now[0] += db.TASK_RECYCLE_INTERVAL
    assert _health_checks(db.recycle_between_tasks) == 1  # a second later: again


def test_a_connection_that_saw_an_error_is_recycled_at_once(monkeypatch):
    now = [_real_now()]
    monkeypatch.setattr(db.time, "monotonic", lambda: now[0])
    db.recycle_between_tasks()
    connection.errors_occurred = True
    now[0] += 0.1
    assert _health_checks(db.recycle_between_tasks) == 1
    assert connection.errors_occurred is False


def test_a_connection_left_in_a_transaction_is_dropped_at_once(monkeypatch):
    """A time limit that fired inside a transaction leaves autocommit off: the next task's writes
    would go into a transaction nobody commits. It is dropped before that task, not a second later."""
    now = [_real_now()]
    monkeypatch.setattr(db.time, "monotonic", lambda: now[0])
    db.recycle_between_tasks()
    connection.set_autocommit(False)
    now[0] += 0.1
    db.recycle_between_tasks()
    assert connection.connection is None  # closed; the next query opens one in autocommit
    assert connection.get_autocommit() is True
