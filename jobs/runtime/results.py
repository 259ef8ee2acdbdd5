"""Task history: django-celery-results' table, written in batches off the task's path.

Stock django-celery-results writes every state a task goes through (STARTED, then SUCCESS) with a
synchronous `get_or_create` and `save` from the pool process: four statements per task, paid
before the process may take its next message. That made a no-op task five times slower than in
stock Celery. Here the pool process only notes the row in memory; a thread of the process writes
what accumulated every `JOBS_RESULTS_FLUSH_INTERVAL` seconds (0.5) in one upsert statement, one
row per task however many states it went through in between.

What this can lose, and what it cannot:
- A pool process killed outright (SIGKILL, the OOM killer) loses the states it had not written
  yet, at most the last half second of its history. A process that exits normally (recycled after
  `max_tasks_per_child`, a warm shutdown) writes them first. The jobs themselves are never at
  stake: their truth is the broker's acknowledgement, the ledger (`jobs.runtime.ledger`), the app's rows
  and the dead letters, all written synchronously where they were.
- A pool process killed after its task ended but before the worker's main process heard of it:
  Celery looks for a stored SUCCESS before it gives such a job back to the broker, and the
  SUCCESS noted in the dead process is not there, so the job runs once more. That is the
  at-least-once delivery every late-acknowledged job has anyway (a process can die a moment
  before its task's result is stored, too); the project's tasks are idempotent for it (an email
  is claimed before it is sent).
- A database that is down when a batch is due: the batch is kept and written later (up to
  `JOBS_RESULTS_BUFFER_LIMIT` rows, the oldest dropped beyond it, with a warning).
- `AsyncResult.get()` sees a result up to one flush interval later. Members of a group or chord
  are written at once (a chord's last member reads the others' results to call its body).
- A row the database will never take (a value too long, say) is dropped alone, logged.
- A state never goes backwards: a STARTED or RETRY that reaches the table after the task's
  SUCCESS, FAILURE or REVOKED (written by another process: the worker's main process records hard
  time limits and lost pool processes) leaves the final state alone.

Writes made elsewhere (the worker's main process, web processes, beat, eager runs) stay
synchronous, through the same upsert. So does the end of a job of Django's Tasks API (see
`jobs.runtime.django_tasks`): its final state is written in the transaction that deletes its
ledger row, which every ledger job pays anyway, so `get_result` always finds one or the other.
A connection the database cut (a restart, a failover) is replaced and the write retried; a
result that still cannot be written is logged and dropped: results are history, never the job's
truth.
"""

from __future__ import annotations

import atexit
import os
import threading
from collections.abc import Iterable
from datetime import datetime
from functools import partial
from typing import Any

from celery import states
from celery.exceptions import BackendStoreError
from django.db import Error as DatabaseError
from django.db import InterfaceError, OperationalError, connections, router, transaction
from django.utils import timezone
from django_celery_results.backends.database import DatabaseBackend as StockDatabaseBackend
from django_celery_results.models import TaskResult

from jobs.conf import jobs_settings
from jobs.db import close_connection, drop_stale_connection
from jobs.logging import get_logger

logger = get_logger("jobs.runtime.results")

#: The columns the upsert writes, in order.
COLUMNS = (
    "task_id",
    "status",
    "result",
    "traceback",
    "meta",
    "content_encoding",
    "content_type",
    "periodic_task_name",
    "task_name",
    "task_args",
    "task_kwargs",
    "worker",
    "date_created",
    "date_started",
    "date_done",
)
#: Written again when a task's row exists: all but its id and creation time.
UPDATED = tuple(c for c in COLUMNS if c not in {"task_id", "date_created"})
#: States a task ends in: a later non-final state never replaces them.
FINAL_STATES = tuple(sorted(states.READY_STATES))
#: Rows that wake the writing thread before its interval is up.
CHUNK = 500
#: Database vendors the upsert is written for; elsewhere each row is stored the stock way.
UPSERT_VENDORS = frozenset({"postgresql", "sqlite"})

Row = dict[str, Any]


def _upsert_sql(db: Any) -> str:
    """One row's upsert; a batch runs it with `executemany` in one transaction (the statement
    text is the same for every batch, so the driver parses and caches it once)."""
    quote = db.ops.quote_name
    table = quote(TaskResult._meta.db_table)
    values = "(" + ", ".join(["%s"] * len(COLUMNS)) + ")"
    updates = ", ".join(
        f"{quote(c)} = COALESCE(excluded.{quote(c)}, {table}.{quote(c)})"
        if c == "date_started"
        else f"{quote(c)} = excluded.{quote(c)}"
        for c in UPDATED
    )
    final = ", ".join(f"'{s}'" for s in FINAL_STATES)
    # Identifiers from the model and constants only; every value is a parameter.
    insert = f"INSERT INTO {table} ({', '.join(quote(c) for c in COLUMNS)}) VALUES {values} "  # noqa: S608
    status = quote("status")
    return (
        insert + f"ON CONFLICT ({quote('task_id')}) DO UPDATE SET {updates} "
        f"WHERE NOT ({table}.{status} IN ({final}) AND excluded.{status} NOT IN ({final}))"
    )


def results_write(rows: Iterable[Row], *, ledger_done: Iterable[tuple[str, str]] = ()) -> int:
    """Writes `rows` (one per task id) in one transaction, and deletes the job table's rows of
    the finished jobs `ledger_done` (task id, the run's lease owner) in it, each only while that
    run holds it; returns how many rows were sent. Raises the database's error."""
    rows = list(rows)
    done = sorted(ledger_done)
    if not rows and not done:
        return 0
    alias = router.db_for_write(TaskResult)
    db = connections[alias]
    if db.vendor not in UPSERT_VENDORS:  # pragma: no cover - the project runs PostgreSQL or SQLite
        from jobs.runtime.store import jobs_finished_sql

        with transaction.atomic(using=alias):
            for row in rows:
                _store_stock(row, alias)
            if done:
                with db.cursor() as cursor:
                    cursor.executemany(jobs_finished_sql(db.ops), [[task_id, lease] for task_id, lease in done])
        return len(rows)
    adapt = db.ops.adapt_datetimefield_value
    rows.sort(key=lambda row: row["task_id"])  # one lock order in every process: no deadlock
    params = [
        [adapt(value) if isinstance(value, datetime) else value for value in (row.get(c) for c in COLUMNS)]
        for row in rows
    ]
    with transaction.atomic(using=alias), db.cursor() as cursor:
        if params:
            cursor.executemany(_upsert_sql(db), params)
        if done:
            from jobs.runtime.store import jobs_finished_sql

            cursor.executemany(jobs_finished_sql(db.ops), [[task_id, lease] for task_id, lease in done])
    return len(rows)


def _store_stock(row: Row, alias: str) -> None:  # pragma: no cover - other database vendors
    fields = {c: row.get(c) for c in UPDATED if c != "date_started"}
    if row.get("date_started"):
        fields["date_started"] = row["date_started"]
    TaskResult.objects.using(alias).update_or_create(task_id=row["task_id"], defaults=fields)


def merge(older: Row | None, newer: Row) -> Row:
    """One entry for a task that went through two states before they were written: the newer
    state, the first creation time, the start time of either; a final state is never undone."""
    if older is None:
        return newer
    if older["status"] in states.READY_STATES and newer["status"] not in states.READY_STATES:
        return older
    merged = {**newer, "date_created": older["date_created"]}
    if merged.get("date_started") is None:
        merged["date_started"] = older.get("date_started")
    return merged


def entry_row(entry: Row) -> Row:
    """The table row of a buffered entry: built now (off the task's path) unless it was already."""
    build = entry.get("build")
    if build is None:
        return entry
    return {**build(), **{k: entry[k] for k in ("status", "date_created", "date_started", "date_done")}}


class ResultBuffer:
    """The rows of one process waiting to be written, and the thread that writes them."""

    def __init__(self, *, interval: float, limit: int) -> None:
        self.interval = interval
        self.limit = limit
        self.lock = threading.Lock()
        self.rows: dict[str, Row] = {}
        self.wake = threading.Event()
        self.stopped = threading.Event()
        self.thread: threading.Thread | None = None
        self.pid = os.getpid()
        self.dropped = 0

    def add(self, row: Row) -> None:
        """Notes a row, or an entry whose `build()` makes the row later (its `status`, `task_id`
        and dates given)."""
        with self.lock:
            self.rows[row["task_id"]] = merge(self.rows.pop(row["task_id"], None), row)
            self._bound()
            full = len(self.rows) >= CHUNK
            if self.thread is None or not self.thread.is_alive():
                self._start_thread()
        if full:
            self.wake.set()

    def take(self, task_id: str) -> Row | None:
        """Removes and returns what waits for `task_id` (its caller writes it now), if anything."""
        with self.lock:
            return self.rows.pop(task_id, None)

    def _start_thread(self) -> None:
        thread = threading.Thread(target=self._run, name="jobs-results", daemon=True)
        try:
            thread.start()
        except RuntimeError:  # no thread to be had (interpreter exiting): written at exit, if at all
            logger.warning("results.writer_not_started", exc_info=True)
            return
        self.thread = thread

    def _bound(self) -> int:
        """Drops the oldest rows beyond `limit` (called with the lock held); returns how many."""
        overflow = len(self.rows) - self.limit
        if overflow > 0:
            for task_id in list(self.rows)[:overflow]:
                del self.rows[task_id]
            self.dropped += overflow
        return max(overflow, 0)

    def _run(self) -> None:
        while not self.stopped.is_set():
            self.wake.wait(self.interval)
            self.wake.clear()
            try:
                self.flush()
            except Exception:  # the thread must outlive anything a round meets
                logger.exception("results.flush_crashed")
        self.flush()

    def flush(self) -> int:
        """Writes what waits (on a connection of this thread). The database down or the
        connection lost: the batch is kept for the next round. Any other database error: each
        row is tried on its own and only those refused are dropped (a row the database will never
        take must not hold up the rest). Returns how many rows were written."""
        with self.lock:
            batch, self.rows = self.rows, {}
        if not batch:
            return 0
        rows: dict[str, Row] = {}
        for task_id, entry in batch.items():
            try:
                rows[task_id] = entry_row(entry)
            except Exception as exc:  # noqa: BLE001 - one row that cannot be built never stops the rest
                _not_stored(task_id, entry["status"], exc)
        db = connections[router.db_for_write(TaskResult)]
        if not db.in_atomic_block:
            drop_stale_connection()  # CONN_MAX_AGE and health checks apply to this thread too
        try:
            return results_write(rows.values())
        except (OperationalError, InterfaceError) as exc:
            if not db.in_atomic_block:  # the next round connects afresh
                close_connection()
            self._keep(rows, exc)
            return 0
        except DatabaseError:
            written = 0
            for task_id, row in rows.items():
                try:
                    written += results_write([row])
                except DatabaseError as exc:
                    _not_stored(task_id, row["status"], exc)
            return written

    def _keep(self, batch: dict[str, Row], exc: BaseException) -> None:
        with self.lock:
            for task_id, row in self.rows.items():  # what arrived meanwhile is newer
                batch[task_id] = merge(batch.pop(task_id, None), row)
            self.rows = batch
            dropped = self._bound()
            waiting = len(self.rows)
        logger.warning(
            "results.flush_failed",
            extra={"waiting": waiting, "dropped": dropped, "error": f"{type(exc).__name__}: {exc}"[:300]},
        )

    def close(self, timeout: float = 5.0) -> None:
        """Writes what waits and stops the thread (a process exiting)."""
        self.stopped.set()
        self.wake.set()
        if self.thread is not None and self.thread.is_alive():
            self.thread.join(timeout)
            if self.thread.is_alive():
                logger.warning("results.not_written_at_exit", extra={"waiting": len(self.rows)})
        else:
            self.flush()


def _not_stored(task_id: str, state: str, exc: BaseException) -> None:
    logger.warning(
        "results.not_stored",
        extra={"task_id": task_id, "state": state, "error": f"{type(exc).__name__}: {exc}"[:300]},
    )


_buffer: ResultBuffer | None = None


def results_buffered() -> ResultBuffer | None:
    """This process's buffer, if it writes results in batches (a pool process)."""
    if _buffer is not None and _buffer.pid == os.getpid():
        return _buffer
    return None


def results_start_buffering() -> ResultBuffer:
    """From now on this process notes results and writes them in batches (called in each pool
    process as it starts)."""
    global _buffer
    results_stop_buffering()
    # Also on the way out of a worker whose shutdown sends no signal (a cold one: SIGTERM here);
    # a pool process leaves through `worker_process_shutdown` instead (it skips atexit).
    atexit.unregister(results_stop_buffering)
    atexit.register(results_stop_buffering)
    _buffer = ResultBuffer(interval=jobs_settings.RESULTS_FLUSH_INTERVAL, limit=jobs_settings.RESULTS_BUFFER_LIMIT)
    return _buffer


def results_stop_buffering() -> None:
    """Writes what waits and goes back to synchronous writes (a pool process exiting)."""
    global _buffer
    buffer, _buffer = results_buffered(), None
    if buffer is not None:
        buffer.close()


class DatabaseBackend(StockDatabaseBackend):  # type: ignore[misc] # django-celery-results has no types
    def exception_safe_to_retry(self, exc: BaseException) -> bool:
        if isinstance(exc, InterfaceError | OperationalError):
            close_connection()  # the next try connects afresh
            return True
        return bool(super().exception_safe_to_retry(exc))

    def store_result(
        self, task_id: str, result: Any, state: str, traceback: Any = None, request: Any = None, **kwargs: Any
    ) -> Any:
        if state == states.STARTED and getattr(request, "jobs_skip", None) is not None:
            # A copy that will not start the body (jobs.runtime.task.skip_copy): its STARTED would
            # overwrite what the job's own run wrote (a RETRY waiting in the table, say).
            return result
        try:
            return super().store_result(task_id, result, state, traceback=traceback, request=request, **kwargs)
        except (BackendStoreError, DatabaseError) as exc:
            if getattr(request, "chord", None):
                # A chord counts its members' results in this table: one not written would stop the
                # chord without a word (its body never called). Raised, it is seen and the task fails.
                logger.error(
                    "results.chord_member_not_stored",
                    extra={"task_id": task_id, "state": state, "error": f"{type(exc).__name__}: {exc}"[:300]},
                )
                raise
            logger.warning(
                "results.not_stored",
                extra={"task_id": task_id, "state": state, "error": f"{type(exc).__name__}: {exc}"[:300]},
            )
            return result

    def _store_result(
        self, task_id: str, result: Any, status: str, traceback: Any = None, request: Any = None, using: Any = None
    ) -> Any:
        buffer = results_buffered()
        if buffer is None or getattr(request, "chord", None) or getattr(request, "group", None):
            # Synchronous outside pool processes, and for the members of a group or chord: the
            # chord's last member reads every member's result to decide whether to call its body.
            results_write([self.result_row(task_id, result, status, traceback=traceback, request=request)])
            return result
        # In a pool process: only note it. The row is encoded by the writing thread, and not at
        # all for a state the next one replaces before the write (a short task's STARTED). A
        # result is encoded here all the same: one that cannot be fails the task, as it always did.
        encoded = None if status == states.STARTED else self.encode_content(result)
        buffer.add(
            {
                "task_id": task_id,
                "status": status,
                **_dates(status),
                "build": partial(
                    self.result_row, task_id, result, status, traceback=traceback, request=request, encoded=encoded
                ),
            }
        )
        return result

    def result_row(
        self,
        task_id: str,
        result: Any,
        status: str,
        *,
        traceback: Any = None,
        request: Any = None,
        encoded: tuple[str, str, Any] | None = None,
    ) -> Row:
        """The table row of `task_id` in state `status`, as django-celery-results would store it
        (`encoded`: the result's content type, encoding and text, when already encoded)."""
        content_type, content_encoding, text = encoded or self.encode_content(result)
        meta = {**self._get_meta_from_request(request), "children": self.current_task_children(request)}
        _, _, encoded_meta = self.encode_content(meta)
        return {
            "task_id": task_id,
            "status": status,
            "result": text,
            "meta": encoded_meta,
            "content_encoding": content_encoding,
            "content_type": content_type,
            **self._get_extended_properties(request, traceback),
            "traceback": traceback,
            **_dates(status),
        }


def _dates(status: str) -> Row:
    """A row's times for a state noted now: created and done now, started now if it starts."""
    now = timezone.now()
    return {"date_created": now, "date_started": now if status == states.STARTED else None, "date_done": now}
