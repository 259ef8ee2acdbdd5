"""The job table's start under limits per key (`jobs.limits.Limit`), cluster-wide.

A job whose task declares limits starts here instead of `jobs.runtime.store.job_start`, in one
transaction that every start of the same keys waits for (a PostgreSQL advisory lock per key, in
key order; SQLite's single writer), so two workers never both take the last slot:

- **concurrency**: the runs that count are the `LimitHold` starts whose job's row is `executing`
  under that very lease, not yet expired. A run that ends (done, retried, released) no longer
  counts the moment its row says so; a crashed one when its lease expires (`JOBS_LEASE_SECONDS`).
- **rate**: the starts of the last `per` seconds (a sliding window, in database time).
- **order of arrival per key**: a job waits while as many jobs that arrived before it (lower job
  id) wait for the same key as would fill the free slots.

A job over a limit becomes `throttled` with `not_before` set to when the limit may allow it (the
relay publishes it then, without spending a retry); a run that ends wakes the oldest job waiting
for each of its concurrency keys at once. Its message is acknowledged (`Skip`-like: nothing ran).
"""

from __future__ import annotations

import logging
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

from django.db import connection, transaction
from django.utils import timezone

from jobs.conf import jobs_settings
from jobs.limits import LimitKey
from jobs.models import LimitHold, OutboxMessage
from jobs.runtime import store

logger = logging.getLogger("jobs.runtime.limits")

State = OutboxMessage.State
CONCURRENCY = LimitHold.Kind.CONCURRENCY.value
RATE = LimitHold.Kind.RATE.value
#: A throttled job deep in a key's line rechecks at most this far apart (a missed wake-up costs this).
MAX_WAIT = 600.0


@dataclass(frozen=True)
class Throttled:
    """The job waits in the table for `limit` until `until` (database time), or a wake-up."""

    limit: str
    key: str
    until: datetime


def _tables() -> tuple[str, str]:
    quote = connection.ops.quote_name
    return quote(OutboxMessage._meta.db_table), quote(LimitHold._meta.db_table)


def _dt(value: datetime) -> Any:
    return connection.ops.adapt_datetimefield_value(value)


def _parse(value: Any) -> datetime | None:
    """A timestamp as the cursor returns it: aware on PostgreSQL, naive UTC or text on SQLite."""
    if value is None:
        return None
    if not isinstance(value, datetime):
        from django.utils.dateparse import parse_datetime

        value = parse_datetime(str(value))
        if value is None:
            return None
    return value if timezone.is_aware(value) else timezone.make_aware(value, UTC)


def _lock_and_now(cursor: Any, keys: Sequence[LimitKey]) -> datetime:
    """Waits for every other start of these keys to commit, then reads the clock: a start's time
    is always after the one it waited for."""
    if connection.vendor == "postgresql":
        names = sorted({f"{k.name}\x1f{k.key}" for k in keys})
        cursor.execute(
            "WITH locks AS MATERIALIZED (SELECT pg_advisory_xact_lock(hashtextextended(k, 7355)) "
            "FROM unnest(%s::text[]) AS k) SELECT clock_timestamp() FROM (SELECT count(*) FROM locks) AS held",
            [names],
        )
        now: datetime = cursor.fetchone()[0]
        return now
    return timezone.now()  # SQLite: the transaction (IMMEDIATE) already holds the only write lock


def job_start_limited(
    task_id: str, *, retries: int, hostname: str, keys: Sequence[LimitKey]
) -> store.Run | store.Skip | Throttled:
    """Takes the row of `task_id` for attempt `retries` when every limit in `keys` allows it;
    otherwise makes it `throttled`. A message that must not start the body gets the `Skip` that
    `store.job_start` would give."""
    job, holds = _tables()
    owner = store.owner_prefix(hostname) + uuid.uuid4().hex[:12]
    lease = float(jobs_settings.LEASE_SECONDS)
    with transaction.atomic(), connection.cursor() as cursor:
        now = _lock_and_now(cursor, keys)
        cursor.execute(
            f"SELECT id, state, retries, not_before FROM {job} WHERE task_id = %s",  # noqa: S608 - our own tables
            [task_id],
        )
        found = cursor.fetchone()
        if found is None:
            return store.Skip.FINISHED
        pk, state, row_retries, not_before = found
        not_before = _parse(not_before)
        if row_retries > retries:
            return store.Skip.STALE
        if row_retries < retries:
            return store.Skip.EARLY
        if state == State.EXECUTING:
            return store.Skip.COPY
        if state != State.AVAILABLE and not_before is not None and not_before > now:
            return store.Skip.NOT_DUE

        blocked: list[Throttled] = []
        for limit in keys:
            waiting = _older_waiting(cursor, limit, pk)
            if limit.kind == CONCURRENCY:
                running, soonest = _running(cursor, limit, now)
                if running + waiting >= limit.number:
                    line = running + waiting - limit.number  # jobs ahead once the slots are full
                    until = soonest if soonest is not None and line < limit.number else None
                    wait = min(lease * (1 + line // limit.number), MAX_WAIT)
                    blocked.append(Throttled(limit.name, limit.key, until or now + timedelta(seconds=wait)))
            else:
                started, oldest = _started(cursor, limit, now)
                if started + waiting >= limit.number:
                    line = started + waiting - limit.number
                    windows = line // limit.number
                    first = (oldest or now) + timedelta(seconds=limit.per)
                    later = now + timedelta(seconds=min(limit.per * windows, MAX_WAIT))
                    blocked.append(Throttled(limit.name, limit.key, max(first, later)))
        if blocked:
            throttled = max(blocked, key=lambda b: b.until)
            _throttle(cursor, task_id, pk, state, retries, keys, throttled.until)
            return throttled

        cursor.execute(
            f"UPDATE {job} SET state = %s, lease_owner = %s, lease_until = %s, started_at = %s, "  # noqa: S608
            "runs = runs + 1, published_at = COALESCE(published_at, %s), not_before = NULL, "
            "unique_key = CASE WHEN unique_while_running THEN unique_key END, "
            "missing_since = NULL, claim = '', claimed_until = NULL "
            "WHERE id = %s AND state = %s AND retries = %s",
            [State.EXECUTING, owner, _dt(now + timedelta(seconds=lease)), _dt(now), _dt(now), pk, state, retries],
        )
        if cursor.rowcount != 1:
            return store.Skip.COPY
        # This job's own waits are over; an earlier run's concurrency start no longer counts
        # (its rate starts do, for their window).
        cursor.execute(
            f"DELETE FROM {holds} WHERE task_id = %s AND (started_at IS NULL OR kind = %s)",  # noqa: S608
            [task_id, CONCURRENCY],
        )
        _insert_holds(cursor, task_id, pk, keys, owner=owner, started_at=now)
    run = store.Run(task_id=task_id, owner=owner, limits=tuple((k.name, k.key) for k in keys if k.kind == CONCURRENCY))
    store.keep_run(run)
    return run


def _older_waiting(cursor: Any, limit: LimitKey, pk: int) -> int:
    """Jobs that arrived before this one and wait for the same key (throttled, or woken and on
    their way to a worker)."""
    job, holds = _tables()
    cursor.execute(
        f"SELECT count(*) FROM {holds} h JOIN {job} j ON j.id = h.job_id "  # noqa: S608
        "WHERE h.name = %s AND h.key = %s AND h.kind = %s AND h.started_at IS NULL AND h.job_id < %s "
        "AND j.state <> %s",
        [limit.name, limit.key, limit.kind, pk, State.EXECUTING],
    )
    return int(cursor.fetchone()[0])


def _running(cursor: Any, limit: LimitKey, now: datetime) -> tuple[int, datetime | None]:
    """The runs holding a slot of this key now, and when the first of their leases expires."""
    job, holds = _tables()
    cursor.execute(
        f"SELECT count(*), min(j.lease_until) FROM {holds} h JOIN {job} j ON j.task_id = h.task_id "  # noqa: S608
        "AND j.lease_owner = h.owner WHERE h.name = %s AND h.key = %s AND h.kind = %s "
        "AND h.started_at IS NOT NULL AND j.state = %s AND j.lease_until > %s",
        [limit.name, limit.key, CONCURRENCY, State.EXECUTING, _dt(now)],
    )
    count, soonest = cursor.fetchone()
    return int(count), _parse(soonest)


def _started(cursor: Any, limit: LimitKey, now: datetime) -> tuple[int, datetime | None]:
    """The starts of this key in the window that ends now, and the oldest of them."""
    _job, holds = _tables()
    cursor.execute(
        f"SELECT count(*), min(started_at) FROM {holds} "  # noqa: S608
        "WHERE name = %s AND key = %s AND kind = %s AND started_at > %s",
        [limit.name, limit.key, RATE, _dt(now - timedelta(seconds=limit.per))],
    )
    count, oldest = cursor.fetchone()
    return int(count), _parse(oldest)


def _throttle(
    cursor: Any, task_id: str, pk: int, state: str, retries: int, keys: Sequence[LimitKey], until: datetime
) -> None:
    job, holds = _tables()
    cursor.execute(
        f"UPDATE {job} SET state = %s, not_before = %s, published_at = NULL, missing_since = NULL, "  # noqa: S608
        "claim = '', claimed_until = NULL WHERE id = %s AND state = %s AND retries = %s",
        [State.THROTTLED, _dt(until), pk, state, retries],
    )
    if cursor.rowcount != 1:
        return
    cursor.execute(f"DELETE FROM {holds} WHERE task_id = %s AND started_at IS NULL", [task_id])  # noqa: S608
    _insert_holds(cursor, task_id, pk, keys, owner="", started_at=None)


def _insert_holds(
    cursor: Any, task_id: str, pk: int, keys: Sequence[LimitKey], *, owner: str, started_at: datetime | None
) -> None:
    _job, holds = _tables()
    quote = connection.ops.quote_name
    cursor.executemany(
        f"INSERT INTO {holds} (name, {quote('key')}, kind, task_id, job_id, owner, started_at, counts_until) "  # noqa: S608
        "VALUES (%s, %s, %s, %s, %s, %s, %s, %s)",
        [
            (
                k.name,
                k.key,
                k.kind,
                task_id,
                pk,
                owner,
                None if started_at is None else _dt(started_at),
                _dt(started_at + timedelta(seconds=k.per)) if started_at is not None and k.kind == RATE else None,
            )
            for k in keys
        ],
    )


def run_ended(run: store.Run) -> None:
    """A run that held concurrency slots has ended (its row already says so): the oldest job
    waiting for each of its keys is due now (the relay publishes it within
    `JOBS_SCHEDULE_POLL_INTERVAL`), and its starts are forgotten."""
    if not run.limits:
        return
    job, holds = _tables()
    now_sql, now_params = "STATEMENT_TIMESTAMP()", []
    if connection.vendor != "postgresql":
        now_sql, now_params = "%s", [_dt(timezone.now())]
    with connection.cursor() as cursor:
        cursor.execute(f"DELETE FROM {holds} WHERE task_id = %s AND kind = %s", [run.task_id, CONCURRENCY])  # noqa: S608
        for name, key in run.limits:
            cursor.execute(
                f"UPDATE {job} SET not_before = {now_sql} WHERE state = %s AND id = ("  # noqa: S608
                f"SELECT h.job_id FROM {holds} h JOIN {job} w ON w.id = h.job_id WHERE h.name = %s "
                "AND h.key = %s AND h.kind = %s AND h.started_at IS NULL AND w.state = %s "
                "ORDER BY h.job_id LIMIT 1)",
                [*now_params, State.THROTTLED, name, key, CONCURRENCY, State.THROTTLED],
            )


# --- reads: the dashboard, the jobs page, the metrics --------------------------------------------


@dataclass(frozen=True)
class LimitUse:
    """One limit's use now, over all its keys."""

    name: str
    kind: str
    running: int  # concurrency: runs holding a slot
    recent: int  # rate: starts in the last minute
    throttled: int  # jobs waiting for it
    keys: int  # keys with a run, a recent start or a waiting job


def limits_in_use() -> list[LimitUse]:
    """Every limit with a run, a start in the last minute or a waiting job, by name."""
    job, holds = _tables()
    now = timezone.now()
    with connection.cursor() as cursor:
        cursor.execute(
            f"SELECT h.name, h.kind, "  # noqa: S608
            "count(*) FILTER (WHERE h.kind = %s AND h.started_at IS NOT NULL AND j.state = %s "
            "  AND j.lease_owner = h.owner AND j.lease_until > %s), "
            "count(*) FILTER (WHERE h.kind = %s AND h.started_at > %s), "
            "count(*) FILTER (WHERE h.started_at IS NULL AND j.state = %s), "
            "count(DISTINCT h.key) "
            f"FROM {holds} h LEFT JOIN {job} j ON j.task_id = h.task_id GROUP BY h.name, h.kind ORDER BY h.name",
            [CONCURRENCY, State.EXECUTING, _dt(now), RATE, _dt(now - timedelta(seconds=60)), State.THROTTLED],
        )
        return [LimitUse(*row) for row in cursor.fetchall()]


def holds_purge() -> int:
    """Forgets holds that count for nothing any more (their job ended or moved on; rate starts
    past their window): the sweeper's round. Returns how many."""
    job, holds = _tables()
    now = _dt(timezone.now())
    with connection.cursor() as cursor:
        cursor.execute(
            f"DELETE FROM {holds} WHERE (kind = %s AND counts_until < %s) OR (kind = %s AND NOT EXISTS ("  # noqa: S608
            f"SELECT 1 FROM {job} j WHERE j.task_id = {holds}.task_id AND (j.lease_owner = {holds}.owner "
            f"OR ({holds}.started_at IS NULL AND j.state <> %s))))",
            [RATE, now, CONCURRENCY, State.EXECUTING],
        )
        purged = int(cursor.rowcount)
        cursor.execute(
            f"DELETE FROM {holds} WHERE kind = %s AND started_at IS NULL AND NOT EXISTS ("  # noqa: S608
            f"SELECT 1 FROM {job} j WHERE j.task_id = {holds}.task_id AND j.state <> %s)",
            [RATE, State.EXECUTING],
        )
        return purged + int(cursor.rowcount)
