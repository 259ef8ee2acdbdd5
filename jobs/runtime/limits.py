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

import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

from django.db import connection, transaction
from django.utils import timezone

from jobs.conf import jobs_settings
from jobs.limits import LimitKey
from jobs.logging import get_logger
from jobs.models import LimitHold, OutboxMessage
from jobs.runtime import store

logger = get_logger("jobs.runtime.limits")

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


def _db_now() -> tuple[str, list[Any]]:
    """The database's clock as SQL and its parameters (SQLite has none of its own that compares
    with Django's stored times: this process's, on the one host SQLite serves)."""
    if connection.vendor == "postgresql":
        return "STATEMENT_TIMESTAMP()", []
    return "%s", [_dt(timezone.now())]


def _lock_and_read(cursor: Any, task_id: str, keys: Sequence[LimitKey]) -> tuple[datetime, Any]:
    """Waits for every other start of these keys to commit, then reads the clock, and the job's
    row: (now, (id, state, retries, not_before) or None). A start's time is always after the one
    it waited for. (The row may be older than the lock: only a copy of the same job, which takes
    the same locks, changes it meanwhile, and the UPDATE that follows re-checks its state.)"""
    job, _holds = _tables()
    if connection.vendor == "postgresql":
        names = sorted({f"{k.name}\x1f{k.key}" for k in keys})
        # As a plain start: its commit does not wait for the WAL flush (`store._async_commit`).
        commit = "off" if jobs_settings.LEASE_ASYNC_COMMIT else "on"
        # Taken in key order (a VALUES list is read in its order): two starts never wait on each other.
        values = ", ".join(["(%s)"] * len(names))
        cursor.execute(
            "WITH locks AS MATERIALIZED (SELECT pg_advisory_xact_lock(hashtextextended(v.k, 7355)) "  # noqa: S608
            f"FROM (VALUES {values}) AS v(k)) SELECT clock_timestamp(), j.id, j.state, j.retries, j.not_before, "
            "set_config('synchronous_commit', %s, true) "
            f"FROM (SELECT count(*) FROM locks) AS held LEFT JOIN {job} j ON j.task_id = %s",
            [*names, commit, task_id],
        )
        now, *row, _commit = cursor.fetchone()
        return now, (tuple(row) if row[0] is not None else None)
    # SQLite: the transaction (IMMEDIATE) already holds the only write lock.
    cursor.execute(f"SELECT id, state, retries, not_before FROM {job} WHERE task_id = %s", [task_id])  # noqa: S608
    return timezone.now(), cursor.fetchone()


def job_start_limited(
    task_id: str, *, retries: int, hostname: str, keys: Sequence[LimitKey]
) -> store.Run | store.Skip | Throttled:
    """Takes the row of `task_id` for attempt `retries` when every limit in `keys` allows it;
    otherwise makes it `throttled`. A message that must not start the body gets the `Skip` that
    `store.job_start` would give. On PostgreSQL two statements and the commit: the locks with
    the row, then the limits' use with the start and its holds (the start only if the use allows
    it: one snapshot, taken once the locks are held)."""
    owner = store.owner_prefix(hostname) + uuid.uuid4().hex[:12]
    lease = float(jobs_settings.LEASE_SECONDS)
    with transaction.atomic(), connection.cursor() as cursor:
        now, found = _lock_and_read(cursor, task_id, keys)
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

        start = _Start(task_id, pk, retries, owner, now, lease)
        use_sql, use_params = _use_sql(keys, pk, now)
        if connection.vendor == "postgresql":
            use, started = _use_and_take(cursor, start, keys, use_sql, use_params)
        else:
            cursor.execute(use_sql, use_params)
            use, started = _use_rows(cursor.fetchall()), None
        blocked = _blocked(keys, use, now, lease)
        if blocked:
            throttled = max(blocked, key=lambda b: b.until)
            _throttle(cursor, task_id, pk, retries, keys, throttled.until)
            return throttled
        if started is None:
            started = _take(cursor, start, keys)
        if not started:
            return store.Skip.COPY
    run = store.Run(task_id=task_id, owner=owner, limits=tuple((k.name, k.key) for k in keys if k.kind == CONCURRENCY))
    store.keep_run(run)
    return run


def _blocked(
    keys: Sequence[LimitKey], use: list[tuple[int, datetime | None, int]], now: datetime, lease: float
) -> list[Throttled]:
    """The limits that keep this job waiting, each with when it may allow it."""
    blocked: list[Throttled] = []
    for limit, (used, edge, waiting) in zip(keys, use, strict=True):
        if used + waiting < limit.number:
            continue
        line = used + waiting - limit.number  # jobs ahead of this one once the slots are full
        if limit.kind == CONCURRENCY:
            # Rechecks when the first running lease could lapse (a finish wakes it sooner).
            wait = min(lease * (1 + line // limit.number), MAX_WAIT)
            until = edge if edge is not None and line < limit.number else now + timedelta(seconds=wait)
        else:
            first = (edge or now) + timedelta(seconds=limit.per)  # the oldest start leaves the window
            until = max(first, now + timedelta(seconds=min(limit.per * (line // limit.number), MAX_WAIT)))
        blocked.append(Throttled(limit.name, limit.key, until))
    return blocked


@dataclass(frozen=True)
class _Start:
    task_id: str
    pk: int
    retries: int
    owner: str
    now: datetime
    lease: float


def _use_sql(keys: Sequence[LimitKey], pk: int, now: datetime) -> tuple[str, list[Any]]:
    """One row per limit (n, its number, the jobs that arrived before this one and wait for the
    same key (throttled, or woken and on their way to a worker), its use now (runs holding a
    slot, or starts in the window), the first lease to expire or the oldest start)."""
    job, holds = _tables()
    parts: list[str] = []
    params: list[Any] = []
    for n, limit in enumerate(keys):
        waiting = (
            f"(SELECT count(*) FROM {holds} w JOIN {job} wj ON wj.id = w.job_id WHERE w.name = %s "  # noqa: S608
            "AND w.key = %s AND w.kind = %s AND w.started_at IS NULL AND w.job_id < %s AND wj.state <> %s)"
        )
        params += [n, limit.number, limit.name, limit.key, limit.kind, pk, State.EXECUTING]
        if limit.kind == CONCURRENCY:
            used = (
                f"SELECT count(*) AS c, min(j.lease_until) AS m FROM {holds} h JOIN {job} j "  # noqa: S608
                "ON j.task_id = h.task_id AND j.lease_owner = h.owner WHERE h.name = %s AND h.key = %s "
                "AND h.kind = %s AND h.started_at IS NOT NULL AND j.state = %s AND j.lease_until > %s"
            )
            params += [limit.name, limit.key, CONCURRENCY, State.EXECUTING, _dt(now)]
        else:
            used = (
                f"SELECT count(*) AS c, min(started_at) AS m FROM {holds} "  # noqa: S608
                "WHERE name = %s AND key = %s AND kind = %s AND started_at > %s"
            )
            params += [limit.name, limit.key, RATE, _dt(now - timedelta(seconds=limit.per))]
        parts.append(f"SELECT %s AS n, %s AS lim, {waiting} AS waiting, u.c, u.m FROM ({used}) u")  # noqa: S608
    return " UNION ALL ".join(parts), params


def _use_rows(rows: Sequence[Sequence[Any]]) -> list[tuple[int, datetime | None, int]]:
    return [(int(row[3]), _parse(row[4]), int(row[2])) for row in sorted(rows, key=lambda row: row[0])]


def _start_sql(start: _Start) -> tuple[str, list[Any], str, list[Any]]:
    """The job's UPDATE to `executing`, and the DELETE of what this job held before: its own
    waits are over, and an earlier run's concurrency start no longer counts (its rate starts do,
    for their window)."""
    job, holds = _tables()
    update = (
        f"UPDATE {job} SET state = %s, lease_owner = %s, lease_until = %s, started_at = %s, "  # noqa: S608
        "runs = runs + 1, published_at = COALESCE(published_at, %s), not_before = NULL, "
        "unique_key = CASE WHEN unique_while_running THEN unique_key END, "
        "missing_since = NULL, claim = '', claimed_until = NULL "
        # Startable as `store.job_start` has it, not "as read": the relay marks a row it published
        # `available` after the broker took the message, which may be after this worker read it.
        "WHERE id = %s AND retries = %s AND (state = %s OR (state IN (%s, %s, %s) "
        "AND (not_before IS NULL OR not_before <= %s)))"
    )
    now = _dt(start.now)
    until = _dt(start.now + timedelta(seconds=start.lease))
    update_params = [
        *(State.EXECUTING, start.owner, until, now, now, start.pk, start.retries, State.AVAILABLE),
        *(State.SCHEDULED, State.RETRYABLE, State.THROTTLED, now),
    ]
    forget = f"DELETE FROM {holds} WHERE task_id = %s AND (started_at IS NULL OR kind = %s)"  # noqa: S608
    return update, update_params, forget, [start.task_id, CONCURRENCY]


def _use_and_take(
    cursor: Any, start: _Start, keys: Sequence[LimitKey], use_sql: str, use_params: list[Any]
) -> tuple[list[tuple[int, datetime | None, int]], bool]:
    """PostgreSQL: the limits' use, and the start with its holds when the use allows it, in one
    statement. Returns (the use, started)."""
    _job, holds = _tables()
    update, update_params, forget, forget_params = _start_sql(start)
    values = ", ".join(["(%s, %s, %s, %s::timestamptz)"] * len(keys))
    value_params: list[Any] = []
    for k in keys:
        value_params += [k.name, k.key, k.kind, start.now + timedelta(seconds=k.per) if k.kind == RATE else None]
    quote = connection.ops.quote_name
    cursor.execute(
        f"WITH use AS MATERIALIZED ({use_sql}), "  # noqa: S608
        f"started AS ({update} AND NOT EXISTS (SELECT 1 FROM use WHERE use.c + use.waiting >= use.lim) "
        "RETURNING id), "
        f"forgotten AS ({forget} AND EXISTS (SELECT 1 FROM started)), "
        f"held AS (INSERT INTO {holds} (name, {quote('key')}, kind, task_id, job_id, owner, started_at, "
        "counts_until) SELECT v.name, v.key, v.kind, %s, started.id, %s, %s, v.until FROM started, "
        f"(VALUES {values}) AS v(name, key, kind, until) RETURNING 1) "
        "SELECT use.n, use.lim, use.waiting, use.c, use.m, (SELECT count(*) FROM started) FROM use",
        [*use_params, *update_params, *forget_params, start.task_id, start.owner, start.now, *value_params],
    )
    rows = cursor.fetchall()
    return _use_rows(rows), bool(rows and rows[0][5])


def _take(cursor: Any, start: _Start, keys: Sequence[LimitKey]) -> bool:
    """Elsewhere than PostgreSQL: the start, then its holds. False when the row was no longer as
    read (a copy started it)."""
    update, update_params, forget, forget_params = _start_sql(start)
    cursor.execute(update, update_params)
    if cursor.rowcount != 1:
        return False
    cursor.execute(forget, forget_params)
    _insert_holds(cursor, start.task_id, start.pk, keys, owner=start.owner, started_at=start.now)
    return True


def _throttle(cursor: Any, task_id: str, pk: int, retries: int, keys: Sequence[LimitKey], until: datetime) -> None:
    job, holds = _tables()
    cursor.execute(
        f"UPDATE {job} SET state = %s, not_before = %s, published_at = NULL, missing_since = NULL, "  # noqa: S608
        # Whatever it is now but running: the relay may have marked it published since it was read.
        "claim = '', claimed_until = NULL WHERE id = %s AND retries = %s AND state <> %s",
        [State.THROTTLED, _dt(until), pk, retries, State.EXECUTING],
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
    `JOBS_SCHEDULE_POLL_INTERVAL`), and this run's starts are forgotten.

    On PostgreSQL it first waits for the keys' locks, as a start does: a start that saw this run
    still running and is about to make its job wait commits first, and its job is then the one
    woken (else it would wait for the run's old lease end with the slot free)."""
    if not run.limits:
        return
    job, holds = _tables()
    oldest = (
        f"SELECT h.job_id FROM {holds} h JOIN {job} w ON w.id = h.job_id WHERE h.name = %s "  # noqa: S608
        "AND h.key = %s AND h.kind = %s AND h.started_at IS NULL AND w.state = %s ORDER BY h.job_id LIMIT 1"
    )
    # Only this run's own starts: a place in line the same job took since (a retry) stays.
    forget = f"DELETE FROM {holds} WHERE task_id = %s AND kind = %s AND owner = %s AND started_at IS NOT NULL"  # noqa: S608
    forget_params: list[Any] = [run.task_id, CONCURRENCY, run.owner]
    keys = [LimitKey(name, key, CONCURRENCY, 1, 1.0) for name, key in run.limits]
    now_sql, now_params = _db_now()
    if connection.vendor == "postgresql":
        firsts = " UNION ALL ".join(f"({oldest})" for _ in run.limits)
        params: list[Any] = [*forget_params, State.THROTTLED]
        for name, key in run.limits:
            params += [name, key, CONCURRENCY, State.THROTTLED]
        with transaction.atomic(), connection.cursor() as cursor:
            _lock_and_read(cursor, run.task_id, keys)
            cursor.execute(
                f"WITH forgotten AS ({forget}) UPDATE {job} SET not_before = {now_sql} "  # noqa: S608
                f"WHERE state = %s AND id IN ({firsts})",
                params,
            )
        return
    with connection.cursor() as cursor:
        cursor.execute(forget, forget_params)
        for name, key in run.limits:
            cursor.execute(
                f"UPDATE {job} SET not_before = {now_sql} WHERE state = %s AND id = ({oldest})",  # noqa: S608
                [*now_params, State.THROTTLED, name, key, CONCURRENCY, State.THROTTLED],
            )


def release_ended(task_id: str, owner_prefix: str) -> None:
    """A run given back by its worker's main process (its pool process died, a shutdown): the
    jobs waiting for its concurrency keys are woken as after any end (`run_ended`)."""
    rows = LimitHold.objects.filter(
        task_id=task_id, kind=CONCURRENCY, owner__startswith=owner_prefix, started_at__isnull=False
    ).values_list("owner", "name", "key")
    by_owner: dict[str, list[tuple[str, str]]] = {}
    for owner, name, key in rows:
        by_owner.setdefault(owner, []).append((name, key))
    for owner, limits in by_owner.items():
        run_ended(store.Run(task_id=task_id, owner=owner, limits=tuple(limits)))


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
    # Database time, as `counts_until` is: a sweeper whose clock runs ahead must not forget a
    # start that still counts.
    now_sql, now_params = _db_now()
    with connection.cursor() as cursor:
        cursor.execute(
            f"DELETE FROM {holds} WHERE (kind = %s AND counts_until < {now_sql}) OR (kind = %s AND NOT EXISTS ("  # noqa: S608
            f"SELECT 1 FROM {job} j WHERE j.task_id = {holds}.task_id AND (j.lease_owner = {holds}.owner "
            f"OR ({holds}.started_at IS NULL AND j.state <> %s))))",
            [RATE, *now_params, CONCURRENCY, State.EXECUTING],
        )
        purged = int(cursor.rowcount)
        cursor.execute(
            f"DELETE FROM {holds} WHERE kind = %s AND started_at IS NULL AND NOT EXISTS ("  # noqa: S608
            f"SELECT 1 FROM {job} j WHERE j.task_id = {holds}.task_id AND j.state <> %s)",
            [RATE, State.EXECUTING],
        )
        return purged + int(cursor.rowcount)
