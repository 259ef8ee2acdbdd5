"""Operator writes: dead letters (record, requeue, discard, purge), jobs of the table (cancel,
run now, retry), queues (pause, resume), API tokens.

The admin actions, `manage.py requeue_dead`, `manage.py dead_letters` and the API are thin
callers of these functions; each write to jobs or queues is audited (`JobAction`).
"""

from __future__ import annotations

import hashlib
import json
import math
import secrets
import time
import uuid
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any, TypedDict

from django.db import Error as DatabaseErrors
from django.db import IntegrityError, connection, transaction
from django.db.models import CharField, F, QuerySet, Value
from django.db.models.functions import Cast, Concat
from django.utils import timezone

from jobs.context import get_request_id
from jobs.db import with_fresh_connection
from jobs.logging import get_logger
from jobs.models import (
    ApiToken,
    DeadLetter,
    DeadLetterEvent,
    DeadLetterPurge,
    JobAction,
    OutboxMessage,
    PausedQueue,
)
from jobs.redaction import redact
from jobs.signals import dead_letter_created

logger = get_logger("jobs.dead_letters")


def dead_letter_record(
    *,
    task_name: str,
    task_id: str,
    queue: str,
    args: Iterable[Any],
    kwargs: dict[str, Any],
    exc_type: str,
    exc_message: str,
    traceback: str,
    retries: int,
    reason: str,
    request_id: str = "",
    worker: str = "",
    dead_letter_id: int | str | None = None,
    raw_message: str = "",
    alert: bool = True,
) -> DeadLetter | None:
    """Keeps a task that failed for good. A job requeued from a dead letter brings that row back
    to `pending`; anything else creates a row. If the database cannot be written, the failure is
    logged at ERROR with everything needed to replay it, and None is returned."""
    safe_args, args_redacted = redact(list(args or ()))
    safe_kwargs, kwargs_redacted = redact(dict(kwargs or {}))
    now = timezone.now()
    fields = {
        "task_name": task_name[:200],
        "task_id": task_id[:64],
        "queue": (queue or "")[:64],
        "args": safe_args,
        "kwargs": safe_kwargs,
        "redacted": args_redacted or kwargs_redacted,
        "exception_type": exc_type[:200],
        "exception_message": exc_message[:10000],
        "traceback": traceback[:50000],
        "retries": retries,
        "reason": reason,
        "request_id": (request_id or "")[:128],
        "worker": worker[:200],
        "raw_message": raw_message[:10000],
        "failed_at": now,
        "status": DeadLetter.Status.PENDING,
    }

    def store() -> tuple[DeadLetter, bool, bool]:
        try:
            return _store_failure(fields, now=now, task_id=task_id, dead_letter_id=dead_letter_id)
        except IntegrityError:
            # A concurrent report of the same failure won the insert (the child and the worker's
            # main process both report a hard time limit): fold this report into its row.
            return _store_failure(fields, now=now, task_id=task_id, dead_letter_id=dead_letter_id)

    try:
        # A worker's main process may hold a connection the database has since cut (a restart,
        # a failover): reconnect rather than lose the failure.
        row, created, repeated = with_fresh_connection(store, what="dead_letter_record")
    except DatabaseErrors:  # DatabaseError and InterfaceError ("connection already closed") alike
        # The failure must not be lost with the database: this line holds all a replay needs.
        logger.exception(
            "dead_letter.unsaved",
            extra={"dead_letter": {**fields, "failed_at": now.isoformat(), "dead_letter_id": dead_letter_id}},
        )
        return None

    if repeated:
        return row
    logger.error(
        "dead_letter.created" if created else "dead_letter.failed_again",
        extra={
            "dead_letter_id": row.pk,
            "dead_letter_task": task_name,
            "dead_letter_task_id": task_id,
            "queue": queue,
            "reason": reason,
            "exception_type": exc_type,
            "failure_count": row.failure_count,
        },
    )
    dead_letter_created.send(sender=DeadLetter, dead_letter=row, created=created)
    if alert:
        from jobs.alerts import dead_letter_alert_schedule

        dead_letter_alert_schedule()
    return row


def _store_failure(
    fields: dict[str, Any], *, now: datetime, task_id: str, dead_letter_id: int | str | None
) -> tuple[DeadLetter, bool, bool]:
    """Writes one failure; returns the row, whether it was created, and whether this was a
    repeated report of a failure the row already holds (same attempt, still pending)."""
    with transaction.atomic():
        rows = DeadLetter.objects.select_for_update()
        pk = _as_int(dead_letter_id) if dead_letter_id else None
        row = rows.filter(pk=pk).first() if pk is not None else None  # no int: no row has that pk
        if row is None:
            row = rows.filter(task_id=task_id[:64], status=DeadLetter.Status.PENDING).first() if task_id else None
        repeated = row is not None and row.task_id == task_id[:64] and row.status == DeadLetter.Status.PENDING
        created = row is None
        if row is None:
            row = DeadLetter.objects.create(first_failed_at=now, **fields)
        else:
            for name, value in fields.items():
                setattr(row, name, value)
            if not repeated:
                row.failure_count = F("failure_count") + 1
            row.save()
            row.refresh_from_db(fields=["failure_count"])
        note = f"{fields['reason']}: {fields['exception_type']}: {fields['exception_message']}"
        DeadLetterEvent.objects.create(
            dead_letter=row,
            action=DeadLetterEvent.Action.FAILED,
            actor=fields["worker"][:150],
            at=now,
            task_id=task_id[:64],
            note=note[:2000],
        )
    return row, created, repeated


def _as_int(value: int | str) -> int | None:
    try:
        return int(value)
    except (TypeError, ValueError):
        return None


@dataclass
class RequeueResult:
    """What a requeue run did."""

    requeued: list[tuple[int, str]] = field(default_factory=list)  # (dead letter id, new task id)
    skipped: list[tuple[int, str]] = field(default_factory=list)  # (dead letter id, why)
    waiting: list[tuple[int, str]] = field(default_factory=list)  # requeued, held in the outbox for the broker
    error: str = ""  # set when publishing failed and the run stopped

    @property
    def count(self) -> int:
        return len(self.requeued)


def dead_letters_requeue(
    *,
    dead_letters: QuerySet[DeadLetter],
    actor: str,
    batch_size: int = 500,
    rate: float | None = None,
    dry_run: bool = False,
    progress: Callable[[int], None] | None = None,
) -> RequeueResult:
    """Publishes each pending dead letter of `dead_letters` again, with its original task name,
    arguments and queue, and marks it `requeued`.

    Each batch is one short transaction that locks its rows (`SELECT ... FOR UPDATE SKIP LOCKED`
    where the database has it; only rows still pending), writes the jobs to the ledger and marks
    the rows requeued; the messages are published after it committed, outside any transaction (no
    lock, SQLite's write lock included, is held while the broker answers). So two operators
    clicking at once requeue a row once, and a requeued job is never lost: when the broker does
    not answer, the run stops, the jobs of that batch wait in the outbox (`waiting`, published by
    the relay once the broker is back) and the later rows stay pending.
    `rate` limits publishes per second: batches shrink to about a second's worth and the pause
    comes after each batch has committed. `progress` is called with the number of rows handled.
    """
    result = RequeueResult()
    ids = list(dead_letters.filter(status=DeadLetter.Status.PENDING).order_by("pk").values_list("pk", flat=True))
    if dry_run:
        result.requeued = [(pk, "") for pk in ids]
        return result
    if rate:
        batch_size = max(1, min(batch_size, math.ceil(rate)))
    lock_kwargs: _LockOptions = {"skip_locked": True} if connection.features.has_select_for_update_skip_locked else {}
    for start in range(0, len(ids), batch_size):
        began, published = time.monotonic(), result.count
        chunk = ids[start : start + batch_size]
        if not _requeue_batch(chunk, actor, lock_kwargs, result):
            break
        if progress:
            progress(min(start + batch_size, len(ids)))
        if rate and start + batch_size < len(ids):
            time.sleep(max(0.0, (result.count - published) / rate - (time.monotonic() - began)))
    logger.info(
        "dead_letter.requeued",
        extra={
            "count": result.count,
            "skipped": len(result.skipped),
            "waiting": len(result.waiting),
            "actor": actor,
            "error": result.error or None,
        },
    )
    return result


class _LockOptions(TypedDict, total=False):
    """`select_for_update()` options the database supports."""

    skip_locked: bool


def _requeue_batch(chunk: list[int], actor: str, lock_kwargs: _LockOptions, result: RequeueResult) -> bool:
    from jobs.outcomes import LEDGER_HEADER
    from jobs.runtime.outbox import ledger_publish_now
    from jobs.runtime.store import jobs_add

    now = timezone.now()
    # Task ids are `<run>-<dead letter id>`: unique, and writable to every row in one UPDATE.
    run = uuid.uuid4().hex
    with transaction.atomic():
        rows = list(
            DeadLetter.objects.select_for_update(**lock_kwargs)
            .filter(pk__in=chunk, status=DeadLetter.Status.PENDING)
            .order_by("pk")
        )
        done: list[int] = []
        jobs: list[OutboxMessage] = []
        for row in rows:
            if row.redacted:
                result.skipped.append((row.pk, "arguments were redacted when stored"))
                continue
            headers: dict[str, int | str] = {"dead_letter_id": row.pk, LEDGER_HEADER: 1}
            request_id = row.request_id or get_request_id() or ""
            if request_id:
                headers["request_id"] = request_id
            options = {"headers": headers, **({"queue": row.queue} if row.queue else {})}
            jobs.append(
                OutboxMessage(
                    task_name=row.task_name,
                    task_id=f"{run}-{row.pk}",
                    args=row.args,
                    kwargs=row.kwargs,
                    options=options,
                    created_at=now,
                )
            )
            done.append(row.pk)
        jobs_add(jobs)
        DeadLetter.objects.filter(pk__in=done).update(
            status=DeadLetter.Status.REQUEUED,
            requeued_at=now,
            requeued_by=actor[:150],
            requeued_task_id=Concat(Value(f"{run}-"), Cast("pk", CharField())),
            requeue_count=F("requeue_count") + 1,
        )
        DeadLetterEvent.objects.bulk_create(
            [
                DeadLetterEvent(
                    dead_letter_id=pk,
                    action=DeadLetterEvent.Action.REQUEUED,
                    actor=actor[:150],
                    at=now,
                    task_id=f"{run}-{pk}",
                )
                for pk in done
            ],
            batch_size=500,
        )
    result.requeued.extend((pk, f"{run}-{pk}") for pk in done)
    if not done:
        return True
    _published, error = ledger_publish_now([f"{run}-{pk}" for pk in done])
    if error:
        waiting = set(
            OutboxMessage.objects.filter(
                task_id__in=[f"{run}-{pk}" for pk in done], published_at__isnull=True
            ).values_list("task_id", flat=True)
        )
        result.waiting.extend((pk, task_id) for pk, task_id in result.requeued if task_id in waiting)
        result.error = error
        logger.error("dead_letter.requeue_waiting", extra={"waiting": len(waiting), "error": error})
        return False
    return True


def dead_letters_discard(*, dead_letters: QuerySet[DeadLetter], actor: str, note: str = "") -> int:
    """Marks the pending dead letters of `dead_letters` as discarded; returns how many."""
    now = timezone.now()
    with transaction.atomic():
        ids = list(
            dead_letters.filter(status=DeadLetter.Status.PENDING).select_for_update().values_list("pk", flat=True)
        )
        DeadLetter.objects.filter(pk__in=ids).update(
            status=DeadLetter.Status.DISCARDED, discarded_at=now, discarded_by=actor[:150]
        )
        DeadLetterEvent.objects.bulk_create(
            [
                DeadLetterEvent(
                    dead_letter_id=pk, action=DeadLetterEvent.Action.DISCARDED, actor=actor[:150], at=now, note=note
                )
                for pk in ids
            ],
            batch_size=500,
        )
    logger.info("dead_letter.discarded", extra={"count": len(ids), "actor": actor})
    return len(ids)


def dead_letters_purge(
    *,
    older_than: timedelta,
    actor: str,
    statuses: Iterable[str] = (DeadLetter.Status.REQUEUED, DeadLetter.Status.DISCARDED),
    dry_run: bool = False,
) -> int:
    """Deletes dead letters in `statuses` whose latest activity (failed, requeued or discarded,
    whichever came last) is more than `older_than` ago (retention); pending ones are kept unless
    asked for. Returns how many rows go. A row requeued today stays however long ago it first
    failed, so a requeued job that dies again still finds its row. The rows' own audit trail
    goes with them; a `DeadLetterPurge` row records who purged what, and when."""
    from django.db.models.functions import Coalesce, Greatest

    now = timezone.now()
    statuses = sorted(statuses)
    # GREATEST is NULL with a NULL argument on SQLite (not on PostgreSQL): Coalesce for both.
    last_activity = Greatest("failed_at", Coalesce("requeued_at", "failed_at"), Coalesce("discarded_at", "failed_at"))
    rows = DeadLetter.objects.alias(last_activity=last_activity).filter(
        status__in=statuses, last_activity__lt=now - older_than
    )
    count = rows.count()
    if not dry_run and count:
        with transaction.atomic():
            DeadLetterEvent.objects.filter(dead_letter__in=rows).delete()
            count = rows.delete()[1].get(DeadLetter._meta.label, 0)
            DeadLetterPurge.objects.create(
                at=now, actor=actor[:150], count=count, statuses=statuses, older_than=older_than
            )
    logger.info(
        "dead_letter.purged",
        extra={"count": count, "actor": actor, "older_than_seconds": older_than.total_seconds(), "dry_run": dry_run},
    )
    return count


# --- API tokens ------------------------------------------------------------------------------

#: A token's prefix, so a token found in a log or a script is recognisable as one of ours.
API_TOKEN_PREFIX = "jobs_"  # noqa: S105 - a marker, not a secret
#: How often a token's `last_used_at` is written at most (one UPDATE a minute, not one a request).
API_TOKEN_TOUCH_INTERVAL = timedelta(minutes=1)


def api_token_hash(raw: str) -> str:
    return hashlib.sha256(raw.encode()).hexdigest()


def api_token_create(*, user: Any, name: str) -> tuple[ApiToken, str]:
    """A new token for `user`; returns the row and the token itself (shown once: only its hash is
    kept)."""
    raw = API_TOKEN_PREFIX + secrets.token_urlsafe(32)
    token = ApiToken.objects.create(user=user, name=name[:100], key_hash=api_token_hash(raw), prefix=raw[:8])
    return token, raw


def api_token_user(raw: str) -> Any | None:
    """The active user behind a token that is not revoked, or None. One indexed read; its
    `last_used_at` is written at most once a minute."""
    if not raw or len(raw) > 200:
        return None
    token = (
        ApiToken.objects.select_related("user").filter(key_hash=api_token_hash(raw), revoked_at__isnull=True).first()
    )
    if token is None or not token.user.is_active:
        return None
    now = timezone.now()
    if token.last_used_at is None or token.last_used_at < now - API_TOKEN_TOUCH_INTERVAL:
        ApiToken.objects.filter(pk=token.pk).update(last_used_at=now)
    return token.user


def api_tokens_revoke(*, tokens: QuerySet[ApiToken]) -> int:
    return tokens.filter(revoked_at__isnull=True).update(revoked_at=timezone.now())


# --- jobs of the table and queues -----------------------------------------------------------------

#: Task ids an audit row lists (it counts them all).
AUDIT_IDS = 1000


@dataclass
class JobsResult:
    """What an operator's action on jobs did: the ids it changed, and why the others were left."""

    done: list[str] = field(default_factory=list)
    refused: list[tuple[str, str]] = field(default_factory=list)  # (task id, why)
    stopping: list[str] = field(default_factory=list)  # cancel: running, asked to stop
    error: str = ""  # the broker refused: the rest go out with the relay


def job_action_audit(
    *, action: str, actor: str, task_ids: Iterable[str] = (), count: int = 0, target: str = "", note: str = ""
) -> JobAction:
    """One line of the operators' audit log."""
    ids = list(task_ids)
    return JobAction.objects.create(
        action=action,
        actor=actor[:150],
        count=count or len(ids),
        target=target[:200],
        task_ids=ids[:AUDIT_IDS],
        note=note,
    )


def _refusals(task_ids: list[str], done: set[str], allowed: str) -> list[tuple[str, str]]:
    """Why each id not in `done` was left: its state (`allowed` says which would do), or unknown."""
    from jobs.selectors import JobState, job_state

    left = [task_id for task_id in task_ids if task_id not in done]
    rows = {row.task_id: row for row in OutboxMessage.objects.filter(task_id__in=left).only("task_id", "state")}
    dead = set(
        DeadLetter.objects.filter(task_id__in=left, status=DeadLetter.Status.PENDING).values_list("task_id", flat=True)
    )
    refused = []
    for task_id in left:
        row = rows.get(task_id)
        state = job_state(row) if row is not None else (JobState.DEAD if task_id in dead else None)
        why = f"the job is {state}, not {allowed}" if state else "no such job (finished, or never accepted)"
        refused.append((task_id, why))
    return refused


def _note(result: JobsResult) -> str:
    lines = [f"{task_id}: {why}" for task_id, why in result.refused[:50]]
    if result.stopping:
        lines.insert(0, f"asked to stop {len(result.stopping)} running")
    if result.error:
        lines.append(result.error)
    return "\n".join(lines)


def jobs_cancel(*, task_ids: Iterable[str], actor: str) -> JobsResult:
    """Cancels jobs: a scheduled, queued or retrying one never runs (its row is gone; it is kept,
    for the record, as a discarded dead letter `cancelled`: its arguments, who and when); a
    running one is asked to stop (a revoke that terminates its process: it ends as a dead letter
    `revoked`, which can be requeued). Audited."""
    from jobs.runtime import store
    from jobs.runtime.outbox import job_of_row

    ids = list(dict.fromkeys(task_ids))
    result = JobsResult()
    now = timezone.now()
    with transaction.atomic():
        cancelled, running = store.jobs_cancel(ids)
        for row in cancelled:
            job = job_of_row(row, queue=row.queue or None)
            safe_args, args_redacted = redact(list(job.args))
            safe_kwargs, kwargs_redacted = redact(dict(job.kwargs))
            letter = DeadLetter.objects.create(
                task_name=row.task_name[:200],
                task_id=row.task_id,
                queue=job.queue[:64],
                args=safe_args,
                kwargs=safe_kwargs,
                redacted=args_redacted or kwargs_redacted,
                exception_type="Cancelled",
                exception_message=f"cancelled by {actor} before it ran ({row.state})",
                retries=row.retries,
                reason=DeadLetter.Reason.CANCELLED,
                request_id=job.request_id[:128],
                status=DeadLetter.Status.DISCARDED,
                failed_at=now,
                discarded_at=now,
                discarded_by=actor[:150],
            )
            DeadLetterEvent.objects.create(
                dead_letter=letter, action=DeadLetterEvent.Action.DISCARDED, actor=actor[:150], at=now, note="cancelled"
            )
        result.done = [row.task_id for row in cancelled]
        result.stopping = running
        result.refused = _refusals(ids, set(result.done) | set(running), "scheduled, queued, retrying or running")
        if running:
            transaction.on_commit(lambda: _stop_running(running, result))
        audit = job_action_audit(
            action=JobAction.Action.CANCEL, actor=actor, task_ids=result.done + running, note=_note(result)
        )
    if result.error:
        JobAction.objects.filter(pk=audit.pk).update(note=_note(result))
    logger.warning("jobs.cancelled", extra={"count": len(result.done), "stopping": len(running), "actor": actor})
    return result


def _stop_running(task_ids: list[str], result: JobsResult) -> None:
    from celery import current_app

    try:
        current_app.control.revoke(task_ids, terminate=True, signal="SIGTERM")
    except Exception as exc:  # noqa: BLE001 - the broker is away: say so, the job runs on
        result.error = f"could not ask the running jobs to stop: {type(exc).__name__}: {exc}"[:500]


def jobs_run_now(*, task_ids: Iterable[str], actor: str) -> JobsResult:
    """Runs scheduled or retrying jobs now (the next attempt keeps its number): each is published
    at once, or by the relay when the broker does not take it now. Audited."""
    from jobs.runtime import store
    from jobs.runtime.outbox import ledger_publish_now

    ids = list(dict.fromkeys(task_ids))
    result = JobsResult()
    result.done = store.jobs_run_now(ids)
    result.refused = _refusals(ids, set(result.done), "scheduled or retrying")
    if result.done:
        _published, result.error = ledger_publish_now(result.done)
    job_action_audit(action=JobAction.Action.RUN_NOW, actor=actor, task_ids=result.done, note=_note(result))
    logger.info("jobs.run_now", extra={"count": len(result.done), "actor": actor})
    return result


def jobs_publish_again(*, task_ids: Iterable[str], actor: str) -> tuple[int, str]:
    """Publishes jobs' messages again under the same task ids (a message the broker lost); a job
    a run holds is left alone (its lease says it runs). Audited. Returns (published, the broker's
    error, when it stopped: the rest go out with the relay)."""
    from jobs.runtime import store
    from jobs.runtime.outbox import ledger_publish_now

    chosen = store.jobs_publish_again(list(task_ids))
    published, error = ledger_publish_now(chosen)
    job_action_audit(action=JobAction.Action.PUBLISH_AGAIN, actor=actor, task_ids=chosen, note=error)
    return published, error


def jobs_retry(*, task_ids: Iterable[str], actor: str) -> tuple[JobsResult, RequeueResult]:
    """Retries dead jobs (their pending dead letters, requeued: see `dead_letters_requeue`).
    Audited."""
    ids = list(dict.fromkeys(task_ids))
    letters = DeadLetter.objects.filter(task_id__in=ids, status=DeadLetter.Status.PENDING)
    chosen = dict(letters.values_list("pk", "task_id"))
    requeue = dead_letters_requeue(dead_letters=letters, actor=actor)
    result = JobsResult(done=[chosen[pk] for pk, _new in requeue.requeued], error=requeue.error)
    skipped = {chosen[pk]: why for pk, why in requeue.skipped}
    result.refused = [(task_id, skipped[task_id]) for task_id in ids if task_id in skipped]
    result.refused += _refusals([i for i in ids if i not in skipped], set(result.done), "dead")
    job_action_audit(action=JobAction.Action.RETRY, actor=actor, task_ids=result.done, note=_note(result))
    return result, requeue


def job_attempts_purge(*, older_than: timedelta) -> int:
    """Deletes the attempts of jobs that ended before `older_than` ago; returns how many."""
    from jobs.models import JobAttempt

    deleted, _ = JobAttempt.objects.filter(finished_at__lt=timezone.now() - older_than).delete()
    return deleted


class UnknownQueue(ValueError):
    """A queue the project does not declare."""


def _known_queue(queue: str) -> str:
    from jobs.selectors import queue_names

    if queue not in queue_names():
        raise UnknownQueue(f"unknown queue {queue!r}; the queues are {', '.join(queue_names())}")
    return queue


def queue_pause(*, queue: str, actor: str) -> bool:
    """Pauses a queue: no worker takes its jobs (within `JOBS_PAUSE_SYNC_SECONDS`), which wait
    in it. Audited; False when it was paused already."""
    _known_queue(queue)
    with transaction.atomic():
        _row, created = PausedQueue.objects.get_or_create(queue=queue, defaults={"paused_by": actor[:150]})
        if created:
            job_action_audit(action=JobAction.Action.PAUSE_QUEUE, actor=actor, target=queue)
    if created:
        logger.warning("queue.paused", extra={"queue": queue, "actor": actor})
    return created


def queue_resume(*, queue: str, actor: str) -> bool:
    """Resumes a paused queue. Audited; False when it was not paused."""
    _known_queue(queue)
    with transaction.atomic():
        deleted, _ = PausedQueue.objects.filter(queue=queue).delete()
        if deleted:
            job_action_audit(action=JobAction.Action.RESUME_QUEUE, actor=actor, target=queue)
    if deleted:
        logger.warning("queue.resumed", extra={"queue": queue, "actor": actor})
    return bool(deleted)


# --- schedules (django-celery-beat's) -------------------------------------------------------------


def schedules_enable(*, schedules: QuerySet[Any], enabled: bool, actor: str) -> list[str]:
    """Pauses (`enabled=False`) or resumes schedules; beat sees it at its next look at the table.
    Returns the names it changed. Audited."""
    from django_celery_beat.models import PeriodicTask, PeriodicTasks

    with transaction.atomic():
        names = list(schedules.exclude(enabled=enabled).values_list("name", flat=True))
        # As django-celery-beat's own admin: a paused schedule forgets its last run.
        extra = {} if enabled else {"last_run_at": None}
        PeriodicTask.objects.filter(name__in=names).update(enabled=enabled, **extra)
        PeriodicTasks.update_changed()
        action = JobAction.Action.RESUME_SCHEDULE if enabled else JobAction.Action.PAUSE_SCHEDULE
        for name in names:
            job_action_audit(action=action, actor=actor, target=name, count=1)
    return names


def schedules_run_now(*, schedules: QuerySet[Any], actor: str) -> list[tuple[str, str]]:
    """Runs schedules' tasks now, once, through the job table like beat's own runs (the schedule
    itself is unchanged). Returns (name, task id) of each. Audited. Raises `LookupError` naming a
    task this process does not know (nothing is sent then)."""
    from celery import current_app

    from jobs.context import get_request_id
    from jobs.runtime.outbox import ledger_add

    rows = list(schedules)
    current_app.loader.import_default_modules()
    unknown = sorted({row.task for row in rows if row.task not in current_app.tasks})
    if unknown:
        raise LookupError(f"unknown task {', '.join(unknown)}: nothing was run")
    started = []
    with transaction.atomic():
        for row in rows:
            options = {"queue": row.queue} if row.queue else {}
            headers = {"periodic_task_name": row.name, "request_id": get_request_id() or ""}
            task_id = ledger_add(
                row.task,
                args=json.loads(row.args or "[]"),
                kwargs=json.loads(row.kwargs or "{}"),
                headers={name: value for name, value in headers.items() if value},
                **options,
            )
            started.append((row.name, task_id))
            job_action_audit(action=JobAction.Action.RUN_SCHEDULE, actor=actor, target=row.name, task_ids=[task_id])
    return started
