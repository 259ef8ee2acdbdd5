"""The job table's transitions: a run takes a job's start lease, keeps it, and ends it here.

Every transition is one conditional UPDATE (or DELETE) guarded by the state it expects, in
database time (`NOW()`), so two hosts whose clocks disagree still agree on who holds a lease:

- `job_start`: a run takes the row (`available`, or `scheduled`/`retryable` once due) for the
  attempt its message carries. Anything else is a copy (the broker redelivered it, the sweeper
  republished it while it was in fact somewhere, a deploy gave it back twice): it is acknowledged
  and does nothing (`Skip`). A lapsed lease is never taken over by a message;
- while it runs, a thread of the process renews the lease every `JOBS_LEASE_SECONDS / 4`;
- `job_finish`: the run deletes its row, only while it still holds it;
- `job_retry`: the run hands the row back for its next attempt: `retryable` in the table until it
  is due (a retry longer than `JOBS_HOLD_IN_BROKER_MAX` is never held by a worker), or
  `available` with its message published now with a short countdown;
- `job_release`: a run that was stopped (its pool process died, the worker shut down) gives the
  row back at once, so the message the broker hands out again starts without waiting for the lease;
- `jobs_lapsed`/`jobs_reclaim` (the sweeper): a lease not renewed for twice its length, whose
  process no longer beats in Redis and whose job no live worker reports, makes the job `available`
  again, once per crash.

A write a run cannot make because the database does not answer (a failover, a restart) is kept
in the process and retried in the background, its lease renewed meanwhile, so the sweeper never
takes a finished job for a crashed one.
"""

from __future__ import annotations

import enum
import json
import os
import socket
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

from django.db import DatabaseError, InterfaceError, connection, transaction
from django.db.models import Case, DateTimeField, ExpressionWrapper, F, Q, QuerySet, When
from django.db.models.expressions import CombinedExpression
from django.db.models.functions import Coalesce, Now
from django.utils import timezone

from jobs.conf import jobs_settings
from jobs.logging import get_logger
from jobs.models import JobAttempt, OutboxMessage

logger = get_logger("jobs.runtime.store")

State = OutboxMessage.State
#: How long a run waits for the previous attempt of its job to hand the row over (a plain task's
#: own `self.retry()` publishes before its attempt has ended).
EARLY_WAIT = 5.0


class Skip(enum.StrEnum):
    """Why a message does not start its job's body."""

    FINISHED = "finished"  # the job has ended (or was never in the table under this id)
    COPY = "copy"  # a live run holds it
    STALE = "stale"  # a message of an earlier attempt
    NOT_DUE = "not_due"  # it waits in the table for its time; the relay publishes it then
    EARLY = "early"  # a later attempt than the row knows: the previous one has not handed over


@dataclass(frozen=True)
class Run:
    """A run's hold on its job's row."""

    task_id: str
    owner: str
    #: The concurrency keys (limit name, key) the run holds a slot of (`jobs.runtime.limits`).
    limits: tuple[tuple[str, str], ...] = ()


def keep_run(run: Run) -> None:
    """This process holds `run`: its lease is renewed while it lasts."""
    _keeper().add(run)


def _in(seconds: float) -> ExpressionWrapper[CombinedExpression]:
    """`NOW() + seconds`, in the database's own clock."""
    return ExpressionWrapper(Now() + timedelta(seconds=seconds), output_field=DateTimeField())


def _lease_seconds() -> float:
    return float(jobs_settings.LEASE_SECONDS)


def owner_prefix(hostname: str, pid: int | None = None) -> str:
    """What every lease a process takes starts with: its worker's name and its pid."""
    return f"{hostname or socket.gethostname()}:{pid if pid is not None else os.getpid()}:"


def lapsed_before() -> ExpressionWrapper[CombinedExpression]:
    """Leases that ended before this lapsed (the run has not renewed for twice the lease: its
    process is gone, not slowed by a database that did not answer for a moment)."""
    return _in(-_lease_seconds())


# --- the start ------------------------------------------------------------------------------


def _async_commit() -> tuple[str, str]:
    """The prefix and the extra FROM/USING item that make one autocommit statement commit without
    waiting for the WAL flush (PostgreSQL's `synchronous_commit = off`, for that transaction only):
    ("", "") inside a transaction (the caller's other writes must stay durable), on other
    databases, or with `JOBS_LEASE_ASYNC_COMMIT = False`.

    Used for a run's start and finish only. The commit is visible to every session at once; what
    only a crash of the database server (or a failover to a replica not caught up) can do is lose
    the last fraction of a second of such commits: a lost start leaves the job `available` and a
    lost finish leaves it `executing` under a lease nobody renews, so the job runs again, once,
    after that crash. The producer's INSERT and every other transition stay synchronous: nothing
    accepted is ever lost this way. It saves one WAL flush (an fsync) per start and per finish."""
    if (
        connection.vendor != "postgresql"
        or connection.in_atomic_block
        or not connection.get_autocommit()
        or not jobs_settings.LEASE_ASYNC_COMMIT
    ):
        return "", ""
    return "WITH jobs_async AS (SELECT set_config('synchronous_commit', 'off', true)) ", "jobs_async"


def _start_available(task_id: str, retries: int, owner: str) -> bool:
    """The common start, an `available` row, in one plain statement on PostgreSQL (the ORM's
    compilation of the general form costs more than the statement itself)."""
    if connection.vendor != "postgresql":
        return False
    table = connection.ops.quote_name(OutboxMessage._meta.db_table)
    prefix, item = _async_commit()
    sql = (
        f"{prefix}UPDATE {table} SET state = %s, lease_owner = %s, "  # noqa: S608 - our own table
        "lease_until = STATEMENT_TIMESTAMP() + make_interval(secs => %s), started_at = STATEMENT_TIMESTAMP(), "
        "runs = runs + 1, published_at = COALESCE(published_at, STATEMENT_TIMESTAMP()), not_before = NULL, "
        "unique_key = CASE WHEN unique_while_running THEN unique_key END, "
        f"missing_since = NULL, claim = '', claimed_until = NULL {'FROM ' + item if item else ''} "
        "WHERE task_id = %s AND retries = %s AND state = %s"
    )
    with connection.cursor() as cursor:
        cursor.execute(sql, [State.EXECUTING, owner, _lease_seconds(), task_id, retries, State.AVAILABLE])
        return bool(cursor.rowcount == 1)


def job_start(task_id: str, *, retries: int, hostname: str) -> Run | Skip:
    """Takes the row of `task_id` for the attempt `retries` of its message: one UPDATE. Returns
    the run, or why this message must not start the body."""
    owner = owner_prefix(hostname) + uuid.uuid4().hex[:12]
    if _start_available(task_id, retries, owner):
        run = Run(task_id=task_id, owner=owner)
        _keeper().add(run)
        return run
    # A lapsed lease is not taken over here: only the sweeper reclaims it, once it knows the
    # process that held it is gone (`holders_alive`), not merely cut from the database.
    due = Q(not_before__isnull=True) | Q(not_before__lte=Now())
    startable = Q(state=State.AVAILABLE) | (Q(state__in=(State.SCHEDULED, State.RETRYABLE, State.THROTTLED)) & due)
    taken = OutboxMessage.objects.filter(startable, task_id=task_id, retries=retries).update(
        state=State.EXECUTING,
        lease_owner=owner,
        lease_until=_in(_lease_seconds()),
        started_at=Now(),
        runs=F("runs") + 1,
        published_at=Coalesce("published_at", Now()),
        not_before=None,
        missing_since=None,
        claim="",
        claimed_until=None,
        unique_key=Case(When(unique_while_running=True, then=F("unique_key")), default=None),
    )
    if taken:
        run = Run(task_id=task_id, owner=owner)
        _keeper().add(run)
        return run
    row = OutboxMessage.objects.filter(task_id=task_id).values("state", "retries").first()
    if row is None:
        return Skip.FINISHED
    if row["retries"] > retries:
        return Skip.STALE
    if row["retries"] < retries:
        return Skip.EARLY
    if row["state"] == State.EXECUTING:
        return Skip.COPY
    return Skip.NOT_DUE


def job_start_waiting(task_id: str, *, retries: int, hostname: str, start: Callable[..., Any] = job_start) -> Any:
    """`start` (`job_start`, or the start under limits), waiting up to `EARLY_WAIT` for an
    earlier attempt to hand the row over."""
    deadline = time.monotonic() + EARLY_WAIT
    while True:
        outcome = start(task_id, retries=retries, hostname=hostname)
        if outcome is not Skip.EARLY or time.monotonic() >= deadline:
            return outcome
        time.sleep(0.1)


# --- the end --------------------------------------------------------------------------------


def _owned(task_id: str, owner: str | None) -> QuerySet[OutboxMessage]:
    rows = OutboxMessage.objects.filter(task_id=task_id)
    return rows.filter(lease_owner=owner) if owner else rows


def current_run(task_id: str) -> Run | None:
    """The run of `task_id` this process holds, if any."""
    return _keeper().runs.get(task_id)


def job_finish(task_id: str, *, owner: str | None = None, durable: bool = True) -> bool:
    """The job has ended (done, or given up with its dead letter written): its row is deleted,
    only while `owner` (by default this process's run of it) still holds it. When the database
    does not answer, the delete is kept and retried in the background (`durable`), its lease
    renewed meanwhile. False when it was not written now."""
    if not task_id:
        return False
    run = current_run(task_id)
    owner = owner or (run.owner if run else None)

    table = connection.ops.quote_name(OutboxMessage._meta.db_table)

    def delete() -> None:
        # One statement in autocommit (QuerySet.delete() wraps it in a transaction of its own).
        prefix, item = _async_commit()
        using = f" USING {item}" if item else ""
        with connection.cursor() as cursor:
            if owner:
                cursor.execute(
                    f"{prefix}DELETE FROM {table}{using} WHERE task_id = %s AND lease_owner = %s",  # noqa: S608
                    [task_id, owner],
                )
            else:
                cursor.execute(f"{prefix}DELETE FROM {table}{using} WHERE task_id = %s", [task_id])  # noqa: S608
            deleted = cursor.rowcount
        if not deleted and owner:
            logger.warning("store.finish_not_owned", extra={"task_id": task_id, "owner": owner})

    return _write_or_keep(task_id, owner, delete, what="finish", durable=durable)


def job_retry(
    task_id: str,
    *,
    retries: int,
    postponed: int,
    delay: float,
    headers: dict[str, Any] | None = None,
    owner: str | None = None,
    error: str = "",
) -> bool:
    """The run failed (`error`) and the job runs again after `delay` seconds, as attempt `retries`.
    The attempt that failed is kept (`JobAttempt`) in the same transaction.
    Returns True when the job waits in the table (`retryable`, published by the relay once due):
    no message is sent now. False: the row is `available` for a message the caller publishes now
    with `delay` as its countdown (a delay of at most `JOBS_HOLD_IN_BROKER_MAX`). When the
    database does not answer, the write is kept for later and the job waits in the table."""
    run = current_run(task_id)
    owner = owner or (run.owner if run else None)
    in_table = delay > float(jobs_settings.HOLD_IN_BROKER_MAX)

    def write(in_table: bool) -> None:
        fields: dict[str, Any] = {
            "retries": retries,
            "postponed": postponed,
            "lease_owner": "",
            "lease_until": None,
            "missing_since": None,
            "claim": "",
            "claimed_until": None,
        }
        if in_table:
            fields.update(state=State.RETRYABLE, not_before=_in(delay), published_at=None)
        else:
            fields.update(state=State.AVAILABLE, not_before=None, published_at=Now())
        rows = _owned(task_id, owner)
        with transaction.atomic():
            row = rows.only("options", "task_name", "retries", "started_at", "lease_owner").first()
            if row is None:
                return
            if headers:
                options = dict(row.options or {})
                options["headers"] = {**(options.get("headers") or {}), **headers}
                fields["options"] = options
            if rows.update(**fields):
                _attempts_add([row], JobAttempt.Outcome.RETRIED, error)

    from jobs.db import with_fresh_connection

    try:
        with_fresh_connection(lambda: write(in_table), what="store.retry", attempts=2, pause=0.2)
    except DatabaseErrors as exc:
        # Kept for later: then it waits in the table whatever its delay (no message is sent now).
        logger.warning("store.write_kept", extra={"task_id": task_id, "what": "retry", "error": _describe(exc)})
        _keeper().keep(task_id, owner, lambda: write(True))
        return True
    return in_table


def job_release(task_id: str, *, owner_prefix: str, crashed: bool = False) -> int | None:
    """A run of this worker was stopped before its end (its pool process died, the worker shut
    down, the task gave its message back): the row is `available` again at once, for the message
    the broker hands out again; `crashed` counts it among the job's crashes. Returns the job's
    crashes after this, or None when no run of that process held the row."""
    rows = OutboxMessage.objects.filter(task_id=task_id, state=State.EXECUTING, lease_owner__startswith=owner_prefix)
    with transaction.atomic():
        held = list(rows.only("task_id", "task_name", "retries", "started_at", "lease_owner"))
        released = rows.update(
            state=State.AVAILABLE,
            lease_owner="",
            lease_until=None,
            claim="",
            claimed_until=None,
            crashes=F("crashes") + (1 if crashed else 0),
        )
        if not released:
            return None
        outcome = JobAttempt.Outcome.CRASHED if crashed else JobAttempt.Outcome.STOPPED
        _attempts_add(held, outcome, "its process died" if crashed else "stopped before its end, given back")
    return int(OutboxMessage.objects.filter(task_id=task_id).values_list("crashes", flat=True).first() or 0)


def run_ended(task_id: str, owner: str | None = None) -> None:
    """The body of this process's run of `task_id` (the run `owner`, if given) has returned: its
    lease is no longer renewed (unless a write of its end is still pending). A later run of the
    same job in another thread of the process keeps its own."""
    _keeper().discard(task_id, owner=owner)


# --- the sweeper's part ------------------------------------------------------------------------


def jobs_lapsed(*, limit: int = 500, running: Callable[[], set[str]] = set) -> list[OutboxMessage]:
    """Rows whose run stopped renewing its lease long ago and whose process no longer beats
    (`holders_alive`): its process, or its worker, died. A run cut from the database (a failover
    longer than the lease) still beats in Redis: its row is left to it, and its kept end is written
    once the database answers. `running()`: task ids the workers' main processes say they run (a
    pool process whose keeper thread a body starves of the GIL still counts as alive). Nothing
    when Redis cannot say (nothing is taken on a guess)."""
    rows = list(
        OutboxMessage.objects.filter(state=State.EXECUTING, lease_until__lt=lapsed_before()).order_by("lease_until")[
            :limit
        ]
    )
    if not rows:
        return rows
    try:
        alive = holders_alive({_holder_of(row.lease_owner) for row in rows})
        held = running()
    except Exception as exc:  # noqa: BLE001 - Redis down: reclaim nothing this round
        logger.warning("store.holders_unknown", extra={"error": _describe(exc)})
        return []
    return [row for row in rows if _holder_of(row.lease_owner) not in alive and row.task_id not in held]


HOLDER_KEY = "jobs:lease-holder:"


def _holder_of(owner: str) -> str:
    """The process part of a lease owner (`host:pid:`), what beats for it."""
    return owner.rsplit(":", 1)[0] + ":" if owner.count(":") >= 2 else owner


def holders_alive(holders: set[str]) -> set[str]:
    """Which of these processes (`owner_prefix`) beat in Redis now."""
    from jobs.redis_client import redis_client

    names = sorted(holders)
    if not names:
        return set()
    values = redis_client().mget([HOLDER_KEY + name for name in names])
    return {name for name, value in zip(names, values, strict=True) if value is not None}


def holder_beat(prefix: str) -> None:
    """This process holds leases: it says so in Redis for twice a lease."""
    from jobs.redis_client import redis_client

    redis_client().set(HOLDER_KEY + prefix, 1, px=int(_lease_seconds() * 2000))


def jobs_reclaim(ids: list[int], *, claim: str, claimed_until: Any) -> int:
    """Makes lapsed runs' rows `available` again (unpublished: the caller publishes them under
    `claim`), counting a crash each; only rows still lapsed now."""
    lapsed = OutboxMessage.objects.filter(pk__in=ids, state=State.EXECUTING, lease_until__lt=lapsed_before())
    with transaction.atomic():
        rows = list(lapsed.select_for_update().only("task_id", "task_name", "retries", "started_at", "lease_owner"))
        reclaimed = lapsed.filter(pk__in=[row.pk for row in rows]).update(
            state=State.AVAILABLE,
            crashes=F("crashes") + 1,
            lease_owner="",
            lease_until=None,
            published_at=None,
            missing_since=None,
            claim=claim,
            claimed_until=claimed_until,
        )
        _attempts_add(rows, JobAttempt.Outcome.CRASHED, "its lease lapsed: the process running it was gone")
    return reclaimed


def _attempts_add(rows: list[OutboxMessage], outcome: str, error: str) -> None:
    """The attempts these rows' runs made, ended with `outcome` now."""
    now = timezone.now()
    JobAttempt.objects.bulk_create(
        JobAttempt(
            task_id=row.task_id,
            task_name=row.task_name,
            attempt=row.retries,
            started_at=row.started_at,
            finished_at=now,
            worker=_holder_of(row.lease_owner).rstrip(":"),
            outcome=outcome,
            error=error.replace("\x00", "")[:2000],  # PostgreSQL text cannot hold NUL
        )
        for row in rows
    )


# --- the relay, the sweeper, beat and the operators ----------------------------------------------


def job_add(
    *,
    task_name: str,
    task_id: str,
    args: list[Any],
    kwargs: dict[str, Any],
    options: dict[str, Any],
    not_before: Any = None,
    state: str | None = None,
    retries: int = 0,
    postponed: int = 0,
) -> OutboxMessage:
    """An accepted job: its row, in the caller's transaction (`scheduled` when it waits for
    `not_before`, else `available`)."""
    if state is None:
        state = State.AVAILABLE if not_before is None else State.SCHEDULED
    return OutboxMessage.objects.create(
        queue=queue_of(task_name, options),
        task_name=task_name,
        task_id=task_id,
        state=state,
        args=args,
        kwargs=kwargs,
        options=options,
        not_before=not_before,
        retries=retries,
        postponed=postponed,
    )


_routes: dict[str, str] = {}


def queue_of(task_name: str, options: dict[str, Any] | None) -> str:
    """The queue a job goes to: its publish options' own, else where Celery routes its task (the
    route of a task name is looked up once per process)."""
    queue = (options or {}).get("queue")
    if queue:
        return str(getattr(queue, "name", queue))[:64]
    routed = _routes.get(task_name)
    if routed is None:
        from celery import current_app

        route = current_app.amqp.router.route({}, task_name).get("queue")
        routed = _routes[task_name] = str(getattr(route, "name", route) or jobs_settings.default_queue)[:64]
    return routed


class UniquePolicy(enum.StrEnum):
    """What `enqueue` does when an unfinished job holds the unique key it asks for."""

    RETURN = "return"  # nothing new: the existing job's id is returned
    REPLACE = "replace"  # the existing job is dropped for the new one (unless a run holds it)
    RAISE = "raise"  # jobs.exceptions.DuplicateJob


@dataclass(frozen=True)
class Unique:
    """A unique enqueue: `key`, held `seconds` at most (None: until the job ends), by a running
    job too (`while_running`) or only while it waits."""

    key: str
    seconds: float | None = None
    while_running: bool = True
    policy: UniquePolicy = UniquePolicy.RETURN


def job_add_unique(row: OutboxMessage, unique: Unique) -> tuple[OutboxMessage, bool]:
    """Inserts `row` unless an unfinished job holds `unique.key`, in the caller's transaction:
    one `INSERT ... ON CONFLICT DO NOTHING` on the key's partial unique index (a concurrent
    transaction with the same key waits for the first to commit, then finds its row). Returns
    (the job holding the key, whether it is `row`). A key past its `seconds` is freed first (one
    statement more, only for keys with a time limit)."""
    from django.db.models.constants import OnConflict

    from jobs.exceptions import DuplicateJob

    if unique.seconds is not None:
        OutboxMessage.objects.filter(unique_key=unique.key, unique_until__lt=Now()).update(unique_key=None)
    row.unique_key = unique.key
    row.unique_while_running = unique.while_running
    row.unique_until = timezone.now() + timedelta(seconds=unique.seconds) if unique.seconds is not None else None
    row.queue = row.queue or queue_of(row.task_name, row.options)
    fields = [field for field in OutboxMessage._meta.concrete_fields if not field.primary_key]
    pk = OutboxMessage._meta.pk
    for _attempt in range(2):
        # QuerySet._insert is what bulk_create uses: an INSERT that says whether it inserted.
        inserted = OutboxMessage.objects._insert(  # type: ignore[attr-defined]  # private, as bulk_create
            [row], fields=fields, returning_fields=[pk], on_conflict=OnConflict.IGNORE
        )
        # Django 6 returns the new id; 5.2 returns nothing from an ignoring insert: look it up.
        new_pk = inserted[0][0] if inserted and inserted[0] else None
        if new_pk is None:
            new_pk = (
                OutboxMessage.objects.filter(task_id=row.task_id, unique_key=unique.key)
                .values_list("pk", flat=True)
                .first()
            )
        if new_pk is not None:
            row.pk = new_pk
            row._state.adding = False
            row._state.db = connection.alias
            return row, True
        holder = OutboxMessage.objects.filter(unique_key=unique.key).first()
        if holder is None:
            continue  # it ended in between: try once more
        if unique.policy == UniquePolicy.RAISE:
            raise DuplicateJob(unique.key, holder.task_id)
        if unique.policy == UniquePolicy.REPLACE and holder.state != State.EXECUTING:
            # Its message, if published, then finds no row and does nothing.
            OutboxMessage.objects.filter(pk=holder.pk).exclude(state=State.EXECUTING).delete()
            continue
        return holder, False
    raise DuplicateJob(unique.key, "")  # pragma: no cover - the key changed hands twice in one call


def jobs_add(rows: list[OutboxMessage]) -> list[OutboxMessage]:
    """Accepted jobs built by the caller (beat's ticks, requeued dead letters), in one INSERT.
    On PostgreSQL one `INSERT ... SELECT FROM unnest(...)` of column arrays, the rows' ids set from
    its RETURNING: Django's `bulk_create` compiles a placeholder and prepares a value per field
    and row (65 us a row, most of the cost of recording a burst of 10 000 schedules)."""
    if not rows:
        return []
    for row in rows:
        row.queue = row.queue or queue_of(row.task_name, row.options)
    if connection.vendor != "postgresql":
        return OutboxMessage.objects.bulk_create(rows)
    fields = [field for field in OutboxMessage._meta.concrete_fields if not field.primary_key]
    arrays: list[list[Any]] = []
    for field in fields:
        values = [getattr(row, field.attname) for row in rows]
        if field.get_internal_type() == "JSONField":
            values = [json.dumps(value) for value in values]  # as JSONField stores it (no encoder)
        elif field.get_internal_type() == "DateTimeField":
            values = [field.get_db_prep_save(value, connection) for value in values]
        arrays.append(values)
    table = connection.ops.quote_name(OutboxMessage._meta.db_table)
    columns = ", ".join(connection.ops.quote_name(str(field.column)) for field in fields)
    arrays_sql = ", ".join(f"%s::{_array_type(field)}" for field in fields)
    names = ", ".join(f"c{n}" for n in range(len(fields)))
    selected = ", ".join(
        f"c{n}::jsonb" if field.get_internal_type() == "JSONField" else f"c{n}" for n, field in enumerate(fields)
    )
    with connection.cursor() as cursor:
        cursor.execute(
            f"INSERT INTO {table} ({columns}) SELECT {selected} FROM unnest({arrays_sql}) AS u({names}) "  # noqa: S608
            "RETURNING id, task_id",
            arrays,
        )
        ids = {task_id: pk for pk, task_id in cursor.fetchall()}
    for row in rows:
        row.pk = ids[row.task_id]
        row._state.adding = False
        row._state.db = connection.alias
    return rows


def _array_type(field: Any) -> str:
    """The PostgreSQL array type of a column's values as `jobs_add` passes them (JSON as text,
    cast to jsonb by the column)."""
    kind = field.get_internal_type()
    if kind == "JSONField":
        return "text[]"
    return f"{field.db_type(connection).split('(')[0]}[]"


def job_published(pk: int) -> None:
    """The broker took the job's message (its publisher, after commit): one statement, in
    autocommit (on SQLite a transaction would be a second wait for the write lock)."""
    table = connection.ops.quote_name(OutboxMessage._meta.db_table)
    # Only a row still as its publisher wrote it: a run may have started, failed and put it back
    # to wait for its retry meanwhile (a fast worker beats the web's own UPDATE).
    with connection.cursor() as cursor:
        cursor.execute(
            f"UPDATE {table} SET published_at = %s WHERE id = %s AND published_at IS NULL "  # noqa: S608
            "AND state = %s AND retries = 0",
            [timezone.now(), pk, State.AVAILABLE],
        )


def job_publish_failed(pk: int, *, attempts: int, error: str) -> None:
    """The broker refused the job's message: the relay tries again."""
    OutboxMessage.objects.filter(pk=pk).update(attempts=attempts, last_error=error)


def jobs_publish_failed(pks: list[int], *, error: str) -> None:
    """A batch of the jobs' messages may not have reached the broker: the relay tries them again."""
    OutboxMessage.objects.filter(pk__in=pks).update(attempts=F("attempts") + 1, last_error=error)


def jobs_claim(rows: QuerySet[OutboxMessage], *, limit: int, ttl: timedelta) -> tuple[str, list[OutboxMessage]]:
    """Claims up to `limit` rows of `rows` for one run of the relay or the sweeper, without a
    transaction held open: one conditional UPDATE takes only rows no other run holds."""
    now = timezone.now()
    free = Q(claimed_until__isnull=True) | Q(claimed_until__lt=now)
    ids = list(rows.filter(free).order_by("pk").values_list("pk", flat=True)[:limit])
    if not ids:
        return "", []
    claim = uuid.uuid4().hex
    # The same conditions as the selection: a row another run published (or ended) in between
    # is no longer taken.
    rows.filter(free, pk__in=ids).update(claim=claim, claimed_until=now + ttl)
    return claim, list(OutboxMessage.objects.filter(claim=claim, pk__in=ids).order_by("pk"))


def jobs_published(published: list[int], claimed: list[int], *, claims: set[str], republish: bool = False) -> None:
    """A run published these rows it claimed (`claims`): `available` now, and its claim given
    back on all it held. A row a run started or handed back for a retry meanwhile no longer
    carries the claim (start, retry and release clear it) and is left as that run wrote it.
    `republish`: the sweeper sent them again (judged lost); only a send the broker took counts
    towards `JOBS_LEDGER_REPUBLISH_LIMIT`, not one a full or absent broker refused."""
    extra = {"republished": F("republished") + 1} if republish else {}
    OutboxMessage.objects.filter(pk__in=published, claim__in=claims).exclude(state=State.EXECUTING).update(
        state=State.AVAILABLE,
        published_at=timezone.now(),
        missing_since=None,
        not_before=None,
        claim="",
        claimed_until=None,
        **extra,
    )
    OutboxMessage.objects.filter(pk__in=claimed, claim__in=claims).exclude(pk__in=published).update(
        claim="", claimed_until=None
    )


def jobs_forget(pks: list[int]) -> None:
    """Rows that are no job any more (periodic ticks past their expiry: the next tick runs)."""
    OutboxMessage.objects.filter(pk__in=pks).delete()


def jobs_seen(pks: list[int]) -> None:
    """The sweep found these jobs' messages in the broker again."""
    OutboxMessage.objects.filter(pk__in=pks).update(missing_since=None)


def jobs_missing(pks: list[int], *, since: Any) -> None:
    """The sweep found these jobs' messages gone, for the first time."""
    OutboxMessage.objects.filter(pk__in=pks, missing_since__isnull=True).update(missing_since=since)


def job_defer_retry(
    *,
    task_name: str,
    task_id: str,
    args: Any,
    kwargs: Any,
    options: dict[str, Any],
    headers: dict[str, Any],
    not_before: Any,
    retries: int,
    postponed: int,
    owner: str | None = None,
) -> None:
    """A retry the broker refused: the job waits in the table as `retryable` (its row made when
    it had none: a task sent by `.delay()`); the retry's headers win over what was stored. A row
    another run holds is left alone (the broker took the retry after all); `owner`'s own is not."""
    row = OutboxMessage.objects.filter(task_id=task_id).first()
    if row is None:
        from jobs.models import DeadLetter

        if DeadLetter.objects.filter(task_id=task_id, reason=DeadLetter.Reason.CANCELLED).exists():
            return  # an operator cancelled it meanwhile: it stays cancelled
        job_add(
            task_name=task_name,
            task_id=task_id,
            args=list(args or ()),
            kwargs=dict(kwargs or {}),
            options={**options, "headers": headers},
            not_before=not_before,
            state=State.RETRYABLE,
            retries=retries,
            postponed=postponed,
        )
        return
    merged = {**row.options, "headers": {**(row.options.get("headers") or {}), **headers}}
    # Not a row another run holds: the broker took the retry after all and its attempt runs.
    held = Q(state=State.EXECUTING) & ~Q(lease_owner=owner or "")
    OutboxMessage.objects.filter(pk=row.pk).exclude(held).update(
        state=State.RETRYABLE,
        lease_owner="",
        lease_until=None,
        published_at=None,
        not_before=not_before,
        retries=retries,
        postponed=postponed,
        options=merged,
        missing_since=None,
        claim="",
        claimed_until=None,
    )


def jobs_cancel(task_ids: list[str]) -> tuple[list[OutboxMessage], list[str]]:
    """An operator cancels these jobs: the rows no run holds are deleted (a message of theirs
    still in the broker then finds nothing and does nothing), locked against a start meanwhile.
    Returns (the deleted rows, the ids of those a run holds: the caller asks those to stop).
    Call it in the transaction that records what was cancelled."""
    rows = OutboxMessage.objects.filter(task_id__in=task_ids)
    cancelled = list(rows.exclude(state=State.EXECUTING).select_for_update())
    OutboxMessage.objects.filter(pk__in=[row.pk for row in cancelled]).delete()
    running = list(rows.filter(state=State.EXECUTING).values_list("task_id", flat=True))
    return cancelled, running


#: What "run now" applies to: jobs waiting in the table for their time.
RUN_NOW_STATES = (State.SCHEDULED, State.RETRYABLE)


def jobs_run_now(task_ids: list[str]) -> list[str]:
    """An operator asks these jobs, waiting for their time (scheduled, or retrying), to run now:
    each is `available` and unpublished (the caller publishes it, else the relay does); the next
    attempt keeps its number. Returns the ids it changed."""
    rows = OutboxMessage.objects.filter(task_id__in=task_ids, state__in=RUN_NOW_STATES)
    with transaction.atomic():
        chosen = list(rows.select_for_update().values_list("task_id", flat=True))
        OutboxMessage.objects.filter(task_id__in=chosen, state__in=RUN_NOW_STATES).update(
            state=State.AVAILABLE, not_before=None, published_at=None, missing_since=None, claim="", claimed_until=None
        )
    return chosen


def jobs_publish_again(task_ids: list[str]) -> list[str]:
    """An operator asks these jobs published again now (none a run holds); returns their ids."""
    rows = OutboxMessage.objects.filter(task_id__in=task_ids).exclude(state=State.EXECUTING)
    chosen = list(rows.values_list("task_id", flat=True))
    rows.filter(task_id__in=chosen).update(published_at=None, not_before=None, state=State.AVAILABLE)
    return chosen


def jobs_finished_sql(vendor_ops: Any) -> str:
    """The statement that ends a run's row (task id, lease owner), for a caller that writes it
    in a transaction of its own (a Django task's result and its row together)."""
    table = vendor_ops.quote_name(OutboxMessage._meta.db_table)
    return f"DELETE FROM {table} WHERE task_id = %s AND lease_owner = %s"  # noqa: S608 - our own table


# --- keeping leases, and writes the database did not take ---------------------------------------


#: Every error of the database, the connection's own (InterfaceError) included.
DatabaseErrors = (DatabaseError, InterfaceError)


def _write_or_keep(task_id: str, owner: str | None, write: Callable[[], None], *, what: str, durable: bool) -> bool:
    from jobs.db import with_fresh_connection

    try:
        with_fresh_connection(write, what=f"store.{what}", attempts=2, pause=0.2)
    except DatabaseErrors as exc:
        if not durable:
            logger.warning("store.write_failed", extra={"task_id": task_id, "what": what, "error": _describe(exc)})
            return False
        logger.warning("store.write_kept", extra={"task_id": task_id, "what": what, "error": _describe(exc)})
        _keeper().keep(task_id, owner, write)
        return False
    return True


def keep_write(task_id: str, owner: str | None, write: Callable[[], object]) -> None:
    """A write of a run's end the database did not take: retried in the background until it is
    done, the run's lease renewed meanwhile."""
    _keeper().keep(task_id, owner, write)


def _describe(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {exc}"[:300]


class Keeper:
    """A daemon thread of one process: renews the leases of the runs it holds that last longer
    than a quarter of a lease, and retries the writes the database did not take (their leases
    renewed until then). It opens a database connection only when it has something to write, and
    closes it after."""

    TICK = 0.5

    def __init__(self) -> None:
        self.pid = os.getpid()
        self.lock = threading.Lock()
        self.runs: dict[str, Run] = {}
        self.started: dict[str, float] = {}
        self.pending: dict[str, tuple[str | None, Callable[[], object]]] = {}
        self.renewed_at = time.monotonic()
        self.wake = threading.Event()
        self.thread: threading.Thread | None = None

    def hostname(self) -> str:
        """The worker name this process's leases carry (from any run it holds)."""
        with self.lock:
            owners = [run.owner for run in self.runs.values()] + [o for o, _w in self.pending.values() if o]
        return owners[0].split(":", 1)[0] if owners else socket.gethostname()

    def add(self, run: Run) -> None:
        with self.lock:
            self.runs[run.task_id] = run
            self.started[run.task_id] = time.monotonic()
        self._ensure_thread()

    def discard(self, task_id: str, *, owner: str | None = None) -> None:
        """The run `owner` of `task_id` no longer needs its lease renewed for its body (a write
        of its end still kept is not dropped: it is renewed until written)."""
        with self.lock:
            run = self.runs.get(task_id)
            if run is None or (owner is not None and run.owner != owner):
                return
            del self.runs[task_id]
            self.started.pop(task_id, None)

    def keep(self, task_id: str, owner: str | None, write: Callable[[], object]) -> None:
        with self.lock:
            self.pending[task_id] = (owner, write)
            run = self.runs.get(task_id)
            if run is not None and (owner is None or run.owner == owner):
                del self.runs[task_id]
                self.started.pop(task_id, None)
        self._ensure_thread()
        self.wake.set()

    def _ensure_thread(self) -> None:
        if self.thread is None or not self.thread.is_alive():
            self.thread = threading.Thread(target=self._loop, name="jobs-lease-keeper", daemon=True)
            self.thread.start()

    def _loop(self) -> None:
        while True:
            self.wake.wait(self.TICK)
            self.wake.clear()
            try:
                self.tick(close=True)
            except Exception as exc:  # noqa: BLE001 - the next tick tries again
                logger.warning("store.keeper_failed", extra={"error": _describe(exc)})

    def tick(self, *, close: bool = False) -> None:
        """One round: pending writes first, then the leases due for renewal; `close`: the
        thread's connection is closed after (the keeper's own thread keeps none open)."""
        from jobs.db import close_connection

        with self.lock:
            pending = dict(self.pending)
        every = _lease_seconds() / 4
        now = time.monotonic()
        with self.lock:
            long_runs = [run for task_id, run in self.runs.items() if now - self.started[task_id] >= every]
        renew_due = now - self.renewed_at >= every and bool(long_runs or pending)
        if not pending and not renew_due:
            return
        if renew_due:
            # In Redis first: while the database is away, the sweeper still sees this process alive.
            try:
                holder_beat(owner_prefix(self.hostname()))
            except Exception as exc:  # noqa: BLE001 - the lease in the database still speaks
                logger.warning("store.holder_beat_failed", extra={"error": _describe(exc)})
        try:
            # Leases first: a write the database still refuses must not let them lapse.
            if renew_due:
                self.renewed_at = now
                with self.lock:
                    holds = [*long_runs, *(Run(t, o) for t, (o, _w) in self.pending.items() if o)]
                for run in holds:
                    _owned(run.task_id, run.owner).update(lease_until=_in(_lease_seconds()))
            for task_id, (_owner, write) in pending.items():
                write()
                logger.info("store.kept_write_done", extra={"task_id": task_id})
                with self.lock:
                    if self.pending.get(task_id, (None, None))[1] is write:
                        del self.pending[task_id]
        finally:
            if close:
                close_connection()


_keeper_instance: Keeper | None = None
_keeper_lock = threading.Lock()


def _keeper() -> Keeper:
    """This process's keeper (a forked pool process makes its own)."""
    global _keeper_instance
    keeper = _keeper_instance
    if keeper is None or keeper.pid != os.getpid():
        with _keeper_lock:
            if _keeper_instance is None or _keeper_instance.pid != os.getpid():
                _keeper_instance = Keeper()
            keeper = _keeper_instance
    return keeper


def pending_writes() -> int:
    """Writes of this process the database has not taken yet."""
    return len(_keeper().pending)


def flush_pending(timeout: float = 5.0) -> bool:
    """Tries the kept writes until they are done or `timeout` passes (a process about to exit)."""
    keeper = _keeper()
    deadline = time.monotonic() + timeout
    while keeper.pending and time.monotonic() < deadline:
        keeper.renewed_at = float("-inf")
        try:
            keeper.tick()
        except Exception:  # noqa: BLE001
            time.sleep(0.5)
    return not keeper.pending


__all__ = [
    "Run",
    "Skip",
    "current_run",
    "flush_pending",
    "job_finish",
    "job_release",
    "job_retry",
    "job_start",
    "job_start_waiting",
    "jobs_lapsed",
    "jobs_reclaim",
    "keep_run",
    "keep_write",
    "owner_prefix",
    "pending_writes",
    "run_ended",
]
