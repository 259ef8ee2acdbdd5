"""Publishing tasks so that none is lost when the broker is down or loses them, and no request
hangs on it.

`enqueue()` writes the job to the ledger (`OutboxMessage`) inside the caller's transaction and,
once the transaction commits, publishes it with a short timeout and marks the row published.
The row stays until the job has finished (`jobs.runtime.ledger.ledger_finish`). When the broker does not
answer, the row stays unpublished and `outbox_relay()` publishes it later, with the same task id;
when the broker loses a published message, `jobs.runtime.ledger.ledger_sweep()` notices and republishes.
"""

from __future__ import annotations

import time
import uuid
from datetime import UTC, datetime, timedelta
from typing import TYPE_CHECKING, Any

import redis
from celery.exceptions import QueueNotFound
from django.db import transaction
from django.db.models import Q, QuerySet
from django.db.models.functions import Now
from django.utils import timezone
from kombu.exceptions import EncodeError
from kombu.exceptions import OperationalError as KombuOperationalError

from jobs.conf import jobs_settings
from jobs.context import get_request_id
from jobs.models import DeadLetter, OutboxMessage
from jobs.outcomes import LEDGER_HEADER
from jobs.runtime import store
from jobs.runtime.broker import producer_for

if TYPE_CHECKING:
    from jobs.outcomes import Job
from jobs.logging import get_logger

logger = get_logger("jobs.runtime.outbox")

PUBLISH_RETRY_POLICY = {"max_retries": 1, "interval_start": 0.1, "interval_step": 0.2, "interval_max": 0.3}
#: A row younger than this, never tried, belongs to the publisher of its own request.
RELAY_GRACE = timedelta(seconds=30)
#: How long a relay or sweep run owns the rows it claimed (it publishes outside any transaction).
CLAIM_TTL = timedelta(seconds=60)
ALLOWED_OPTIONS = {"queue", "countdown", "priority", "expires"}
#: Errors of one message, not of the broker: retrying cannot help (a queue this release no longer
#: declares, arguments that cannot be encoded). Anything else means the broker is not taking messages.
UNPUBLISHABLE_ERRORS = (QueueNotFound, EncodeError)
#: Errors of a broker that cannot be reached (refused, timed out, cut off): the ones that open the
#: publish breaker. kombu raises its OperationalError for a connection it could not (re)open.
UNREACHABLE_ERRORS = (OSError, KombuOperationalError, redis.ConnectionError, redis.TimeoutError)


def enqueue(
    task: Any,
    *,
    args: list[Any] | tuple[Any, ...] = (),
    kwargs: dict[str, Any] | None = None,
    request_id: str | None = None,
    unique_key: str | None = None,
    unique_for: float | None = None,
    unique_while: str | None = None,
    unique_policy: str | None = None,
    **options: Any,
) -> str:
    """Publishes `task` (a task object or its registered name) after the current transaction
    commits, durably. `request_id` defaults to the current one. Returns the task id at once.

    `unique_key`: no two unfinished jobs hold the same key (enforced by the database, see
    docs/unique-jobs.md). `unique_for`: the key is held at most that many seconds; `unique_while`:
    "unfinished" (until the job ends) or "queued" (freed when a run starts); `unique_policy`:
    "return" the existing job's id (the default), "replace" it (unless it runs), or "raise"
    `jobs.exceptions.DuplicateJob`. A task declared with `unique=UniqueJob(...)` (`jobs.limits`)
    gets its key from `args` and `kwargs`, and its options unless given here."""
    unknown = set(options) - ALLOWED_OPTIONS
    if unknown:
        raise TypeError(f"unsupported publish options: {', '.join(sorted(unknown))}")
    headers = dict(options.pop("headers", None) or {})
    request_id = request_id or get_request_id()
    if request_id:
        headers.setdefault("request_id", request_id)
    not_before = None
    countdown = options.get("countdown")
    if countdown is not None:
        try:
            countdown = float(countdown)
        except (TypeError, ValueError):
            raise TypeError(f"countdown must be a number of seconds, not {countdown!r}") from None
        if countdown != countdown or countdown < 0:  # NaN, or the past
            raise ValueError(f"countdown must be a number of seconds >= 0, not {countdown!r}")
        if countdown > float(jobs_settings.HOLD_IN_BROKER_MAX):
            # A long wait is kept in the job table, not in a worker's memory: published when due.
            not_before = timezone.now() + timedelta(seconds=countdown)
            options.pop("countdown")
    declared = _declared_unique(task)
    if declared is not None and unique_key is None:
        unique_key = declared.key_for(_task_object(task), list(args), dict(kwargs or {}))
        unique_for = declared.unique_for if unique_for is None else unique_for
        unique_while = unique_while or declared.unique_while
        unique_policy = unique_policy or declared.unique_policy
    unique = unique_options(unique_key, unique_for, unique_while or "unfinished", unique_policy or "return")
    return ledger_add(
        task if isinstance(task, str) else task.name,
        args=args,
        kwargs=kwargs,
        headers=headers,
        not_before=not_before,
        unique=unique,
        **options,
    )


def _task_object(task: Any) -> Any:
    """The task object of `task` (or of the name it is), or None when this process has no such task."""
    if not isinstance(task, str):
        return task
    from celery import current_app

    return current_app.tasks.get(task)


def _declared_unique(task: Any) -> Any:
    """The `UniqueJob` the task declares, if any (a `LimitError` becomes a ValueError here)."""
    from jobs.limits import LimitError, task_unique

    try:
        return task_unique(_task_object(task))
    except LimitError as exc:
        raise ValueError(str(exc)) from None


def unique_options(key: str | None, seconds: float | None, while_: str, policy: str) -> store.Unique | None:
    """The unique options of `enqueue`, checked (TypeError or ValueError naming the bad one)."""
    if key is None:
        if seconds is not None:
            raise TypeError("unique_for needs a unique_key")
        return None
    if not isinstance(key, str) or not 0 < len(key) <= 200 or "\x00" in key:
        raise ValueError(f"unique_key must be a string of 1 to 200 characters, not {key!r}")
    if seconds is not None and (isinstance(seconds, bool) or not isinstance(seconds, int | float) or not seconds > 0):
        raise ValueError(f"unique_for must be a number of seconds > 0, not {seconds!r}")
    if while_ not in ("unfinished", "queued"):
        raise ValueError(f'unique_while must be "unfinished" or "queued", not {while_!r}')
    try:
        chosen = store.UniquePolicy(policy)
    except ValueError:
        raise ValueError(f'unique_policy must be "return", "replace" or "raise", not {policy!r}') from None
    return store.Unique(
        key=key,
        seconds=float(seconds) if seconds is not None else None,
        while_running=while_ == "unfinished",
        policy=chosen,
    )


def ledger_add(
    task_name: str,
    *,
    args: list[Any] | tuple[Any, ...] = (),
    kwargs: dict[str, Any] | None = None,
    headers: dict[str, Any] | None = None,
    task_id: str | None = None,
    not_before: datetime | None = None,
    unique: store.Unique | None = None,
    **options: Any,
) -> str:
    """Writes one job to the ledger in the current transaction and publishes it once that commits
    (`not_before`: only from then on, by the relay: a job due far in the future waits here rather
    than in the broker). With `unique`, an unfinished job holding its key may be returned instead
    (nothing new is written or published)."""
    fields: dict[str, Any] = {
        "task_name": task_name,
        "task_id": task_id or str(uuid.uuid4()),
        "args": list(args),
        "kwargs": dict(kwargs or {}),
        "options": {**options, "headers": {**(headers or {}), LEDGER_HEADER: 1}},
        "not_before": not_before,
    }
    if unique is not None:
        state = OutboxMessage.State.AVAILABLE if not_before is None else OutboxMessage.State.SCHEDULED
        message, created = store.job_add_unique(OutboxMessage(state=state, **fields), unique)
        if not created:
            return message.task_id
    else:
        message = store.job_add(**fields)
    if not_before is None:
        transaction.on_commit(lambda: _publish_after_commit(message), robust=True)
    return message.task_id


def publish(
    message: OutboxMessage,
    *,
    producer: Any = None,
    event_dispatcher: Any = None,
    retry: bool = True,
    declare: list[Any] | None = None,
) -> None:
    """Sends the ledger row's message (same task id, its retries so far). Raises what the broker
    raised. `event_dispatcher`: where its task-sent event goes (Celery's default: one publish).
    `retry`: False inside a publish batch, which only buffers (the batch's flush meets the broker).
    `declare`: what to declare first (Celery's default: the queue it routes to)."""
    from celery import current_app

    from jobs.runtime.task import POSTPONED_HEADER

    options = dict(message.options)
    headers = dict(options.pop("headers", {}) or {})
    headers[LEDGER_HEADER] = 1
    if message.postponed:
        headers[POSTPONED_HEADER] = message.postponed
    if message.not_before is not None or message.retries:
        options.pop("countdown", None)  # a retry due now, or one whose first countdown has passed
    elif message.published_at is not None and options.get("countdown"):
        # Published before and lost: only what is left of the original countdown.
        due = message.created_at + timedelta(seconds=float(options["countdown"]))
        options["countdown"] = max((due - timezone.now()).total_seconds(), 0)
    if event_dispatcher is not None:
        options["event_dispatcher"] = event_dispatcher
    if declare is not None:
        options["declare"] = declare
    current_app.send_task(
        message.task_name,
        args=message.args,
        kwargs=message.kwargs,
        task_id=message.task_id,
        headers=headers,
        retries=message.retries,
        retry=retry,
        retry_policy=PUBLISH_RETRY_POLICY,
        producer=producer,
        **options,
    )


#: Task-sent events of a batch of publishes per message (`SentEvents`).
SENT_EVENTS_PER_MESSAGE = 500


class SentEvents:
    """Collects the task-sent events of many publishes and sends them in a few messages (Celery's
    buffered `task.multi` form, which Flower and every event receiver read), where Celery sends
    one message per event: half the broker round trips of beat's burst of sends. Only monitoring
    rides on it: an event the broker refuses is dropped, never the task's message."""

    def __init__(self, producer: Any) -> None:
        from celery import current_app

        # Not buffered while offline: a flush the broker refuses raises (and is logged) instead
        # of waiting in a buffer this short-lived dispatcher never flushes again.
        self.dispatcher = current_app.events.Dispatcher(
            channel=producer.channel,
            buffer_group=["task"],
            buffer_limit=SENT_EVENTS_PER_MESSAGE,
            buffer_while_offline=False,
        )

    def publish(self, type: str, fields: dict[str, Any], producer: Any, **_options: Any) -> None:
        """What Celery's `send_task_message` calls for the task-sent event."""
        self.dispatcher.send(type, **fields)

    def flush(self) -> None:
        try:
            self.dispatcher.flush()
        except Exception as exc:  # noqa: BLE001 - monitoring only: the tasks went out
            logger.warning("outbox.sent_events_dropped", extra={"error": _describe(exc)})
        finally:
            self.dispatcher.close()


class PublishBreaker:
    """Keeps the request path off a broker that just failed: a broker that is down refuses at
    once, but one cut off by the network costs every publish its socket timeouts, and a web
    process under load would spend its threads waiting there. After a publish on commit fails for
    the broker's sake, the publishes of the next `JOBS_PUBLISH_BREAKER_SECONDS` in this process are
    left to the relay at once (their rows marked tried, so the relay takes them without its grace);
    the first one after that tries the broker again."""

    def __init__(self) -> None:
        self.open_until = 0.0  # monotonic

    def is_open(self) -> bool:
        return time.monotonic() < self.open_until

    def trip(self) -> None:
        seconds = float(jobs_settings.PUBLISH_BREAKER_SECONDS)
        if seconds > 0:
            self.open_until = time.monotonic() + seconds
            logger.warning("outbox.breaker_open", extra={"seconds": seconds})

    def close(self) -> None:
        self.open_until = 0.0


publish_breaker = PublishBreaker()
#: The error a job's row keeps when the breaker left it to the relay.
BREAKER_OPEN = "not tried: the broker failed a publish in this process moments ago (left to the relay)"


def _publish_after_commit(message: OutboxMessage) -> None:
    """Runs on commit, on the request path: no read of its own, one UPDATE in autocommit. It never
    raises: its transaction has committed, so the caller must not undo anything (the row is the
    job's record; the relay publishes it if this did not)."""
    try:
        if publish_breaker.is_open():
            store.job_publish_failed(message.pk, attempts=message.attempts + 1, error=BREAKER_OPEN)
            logger.info(
                "outbox.publish_deferred",
                extra={"task_id": message.task_id, "outbox_task": message.task_name, "error": BREAKER_OPEN},
            )
            return
        try:
            publish(message)
        except Exception as exc:  # noqa: BLE001 - the broker is down: keep the row for the relay
            if isinstance(exc, UNREACHABLE_ERRORS):
                publish_breaker.trip()
            error = _describe(exc)
            store.job_publish_failed(message.pk, attempts=message.attempts + 1, error=error)
            logger.warning(
                "outbox.publish_deferred",
                extra={"task_id": message.task_id, "outbox_task": message.task_name, "error": error},
            )
            return
        store.job_published(message.pk)
    except Exception as exc:  # noqa: BLE001 - a database hiccup after COMMIT: the relay covers it
        logger.warning(
            "outbox.after_commit_failed",
            extra={"task_id": message.task_id, "outbox_task": message.task_name, "error": _describe(exc)},
        )


def ledger_claim(rows: QuerySet[OutboxMessage], *, limit: int) -> tuple[str, list[OutboxMessage]]:
    """Claims up to `limit` rows of the queryset `rows` for this run (`jobs.runtime.store`)."""
    return store.jobs_claim(rows, limit=limit, ttl=CLAIM_TTL)


def outbox_relay(*, limit: int = 500) -> dict[str, int]:
    """Publishes the ledger's unpublished rows: ones the broker refused, ones older than the
    grace period whose publisher died, retries whose time has come. No transaction is held while
    publishing. A broker that does not answer stops the run; a row the broker can never take (a
    queue that no longer exists) is dead-lettered instead of blocking the rows behind it."""

    now = timezone.now()
    due = (
        OutboxMessage.objects.filter(published_at__isnull=True)
        .exclude(state=OutboxMessage.State.EXECUTING)
        .filter(
            Q(not_before__isnull=True, attempts__gt=0)
            | Q(not_before__isnull=True, created_at__lt=now - RELAY_GRACE)
            | Q(not_before__lte=Now())  # the clock the worker's start checks against
        )
    )
    _claim, rows = ledger_claim(due, limit=limit)
    published, failed, unpublishable = publish_claimed(rows)
    if published or failed or unpublishable:
        logger.info(
            "outbox.relayed",
            extra={"published": published, "failed": failed, "unpublishable": unpublishable},
        )
    return {"published": published, "failed": failed, "waiting": outbox_backlog()}


def outbox_relay_due(*, limit: int = 500) -> int:
    """Publishes the jobs waiting in the table whose time has come (`scheduled`, `retryable`,
    `throttled`): one indexed query when none is due, run every `JOBS_SCHEDULE_POLL_INTERVAL` seconds."""
    due = OutboxMessage.objects.filter(
        state__in=(OutboxMessage.State.SCHEDULED, OutboxMessage.State.RETRYABLE, OutboxMessage.State.THROTTLED),
        not_before__lte=Now(),  # the clock the worker's start checks against
        published_at__isnull=True,
    )
    _claim, rows = ledger_claim(due, limit=limit)
    published, _failed, _unpublishable = publish_claimed(rows)
    return published


def drop_expired_ticks(rows: list[OutboxMessage]) -> list[OutboxMessage]:
    """Forgets the periodic ticks among `rows` whose `expires` has passed (beat's next tick runs
    instead: a worker would skip them, and a RabbitMQ queue drop them unseen, leaving the row for
    the sweeper to take as lost); returns the others. Other expired jobs are published: their
    worker records them as dead letters."""
    now = timezone.now()
    expired = [row for row in rows if _tick_expired(row, now)]
    if not expired:
        return rows
    store.jobs_forget([row.pk for row in expired])
    logger.info("outbox.expired_ticks_dropped", extra={"count": len(expired)})
    gone = {row.pk for row in expired}
    return [row for row in rows if row.pk not in gone]


def _tick_expired(message: OutboxMessage, now: datetime) -> bool:
    options = message.options or {}
    if not (options.get("headers") or {}).get("periodic_task_name") or options.get("expires") is None:
        return False
    expires = options["expires"]
    if isinstance(expires, int | float):
        deadline = message.created_at + timedelta(seconds=expires)
    else:
        try:
            deadline = datetime.fromisoformat(str(expires))
        except ValueError:
            return False
        if timezone.is_naive(deadline):
            deadline = timezone.make_aware(deadline, UTC)
    return deadline <= now


def _sent_events(producer: Any) -> SentEvents | None:
    """A collector on the producer's channel, or None (each event then goes out on its own, as
    Celery sends it) when it cannot be made."""
    try:
        return SentEvents(producer)
    except Exception as exc:  # noqa: BLE001 - the publishes below meet the same broker and say why
        logger.info("outbox.sent_events_unbatched", extra={"error": _describe(exc)})
        return None


def publish_claimed(
    rows: list[OutboxMessage], *, republish: bool = False, batch_events: bool = False
) -> tuple[int, int, int]:
    """Publishes rows this run claimed, on one producer, outside any transaction, and marks them
    published. Stops at the first error of the broker (the rest wait for the next run); a row the
    broker can never take is dead-lettered; a periodic tick past its `expires` is forgotten.
    `batch_events`: their task-sent events go out together (`SentEvents`), after the messages.
    Returns (published, failed, unpublishable)."""
    from celery import current_app

    rows = drop_expired_ticks(rows)
    if not rows:
        return 0, 0, 0
    batch_events = batch_events and bool(current_app.conf.task_send_sent_event)
    published: list[int] = []
    failed = unpublishable = 0
    flushing = False
    try:
        with producer_for(current_app, len(rows), retry_policy=PUBLISH_RETRY_POLICY) as (producer, batch):
            published, failed, unpublishable, events = _publish_each(rows, producer, batch, batch_events=batch_events)
            flushing = True
            if batch is not None:
                batch.flush()  # the messages first, then their events
            if events is not None:
                events.flush()
    except Exception as exc:
        if not flushing or not published:
            raise
        # The batch's flush failed: which of its messages arrived is unknown. None counts as
        # published, the relay sends them all again (a copy that did arrive starts once: the lease).
        failed += len(published)
        store.jobs_publish_failed(published, error=_describe(exc))
        logger.warning("outbox.batch_publish_failed", extra={"count": len(published), "error": _describe(exc)})
        published = []
    store.jobs_published(
        published, [row.pk for row in rows], claims={row.claim for row in rows if row.claim}, republish=republish
    )
    return len(published), failed, unpublishable


def _publish_each(
    rows: list[OutboxMessage], producer: Any, batch: Any, *, batch_events: bool
) -> tuple[list[int], int, int, SentEvents | None]:
    """`publish_claimed`'s sends, on `producer` (into `batch` when there is one), until the first
    broker error. Returns the ids sent (buffered, with a batch), the failed and unpublishable
    counts, and the collector of their task-sent events, not flushed yet."""
    published: list[int] = []
    failed = unpublishable = 0
    events: SentEvents | None = None
    declared: set[str] = set()  # queues this batch's connection has declared
    for message in rows:
        if batch_events and published:
            batch_events = False  # one try
            # After a first publish went through (its event on its own, as Celery sends it): the
            # channel is connected by then, and a broker that is down failed that publish inside
            # its own error handling instead of here.
            events = _sent_events(producer)
        queue = _declared_queue(message) if batch is not None else None
        try:
            publish(
                message,
                producer=producer,
                event_dispatcher=events,
                retry=batch is None,
                declare=[] if queue in declared else None,
            )
        except UNPUBLISHABLE_ERRORS as exc:
            unpublishable += 1
            _unpublishable(message, exc)
            continue
        except Exception as exc:  # noqa: BLE001 - the broker is down, full or paused: stop here
            failed += 1
            _publish_failed(message, exc)
            break
        published.append(message.pk)
        if queue:
            declared.add(queue)
    return published, failed, unpublishable, events


def _declared_queue(message: OutboxMessage) -> str | None:
    """The queue a batch's publish of `message` declares once for the batch: its own, when it names
    one and nothing can send it elsewhere (a countdown may, under native delayed delivery). kombu
    checks its own record of declarations on every publish otherwise (30 us each: it copies the
    queue to bind it), a new connection's record starting empty like `declared`."""
    options = message.options or {}
    queue = options.get("queue")
    if not isinstance(queue, str) or options.get("countdown") or options.get("eta"):
        return None
    return queue


def ledger_publish_now(task_ids: list[str]) -> tuple[int, str]:
    """Publishes the ledger rows of `task_ids` now (after their transaction committed), stopping at
    the first broker error; whatever is left waits for the relay. Returns (published, error)."""
    _claim, rows = ledger_claim(
        OutboxMessage.objects.filter(task_id__in=task_ids, published_at__isnull=True), limit=len(task_ids)
    )
    published, failed, _unpublishable = publish_claimed(rows)
    if failed:
        error = (
            OutboxMessage.objects.filter(task_id__in=task_ids)
            .exclude(last_error="")
            .values_list("last_error", flat=True)
            .first()
        )
        return published, f"publishing failed: {error or 'the broker did not answer'}"
    return published, ""


def _publish_failed(message: OutboxMessage, exc: BaseException) -> None:
    store.job_publish_failed(message.pk, attempts=message.attempts + 1, error=_describe(exc))
    logger.warning("outbox.publish_failed", extra={"task_id": message.task_id, "error": _describe(exc)})


def job_of_row(row: OutboxMessage, *, queue: str | None = None) -> Job:
    """What the failure path is told about a job of the table (`queue`: its queue when known
    better than the row's publish options)."""
    from jobs.outcomes import Job

    options = row.options or {}
    headers = dict(options.get("headers") or {})
    return Job(
        task_name=row.task_name,
        task_id=row.task_id,
        args=tuple(row.args or ()),
        kwargs=dict(row.kwargs or {}),
        retries=row.retries,
        queue=str(options.get("queue") or "") if queue is None else queue,
        request_id=str(headers.get("request_id") or ""),
        dead_letter_id=headers.get("dead_letter_id"),
    )


def _unpublishable(message: OutboxMessage, exc: BaseException) -> None:
    """A message the broker will never take: the job ends through the failure path (a dead letter,
    replayable once fixed, and its app told)."""
    from celery import current_app

    from jobs.outcomes import job_gave_up

    saved = job_gave_up(
        task=current_app.tasks.get(message.task_name),
        job=job_of_row(message),
        reason=DeadLetter.Reason.UNPUBLISHABLE,
        exc_type=type(exc).__name__,
        exc_message=f"the broker cannot take this message: {exc}",
        worker="outbox relay",
    )
    if saved is None:
        _publish_failed(message, exc)


def outbox_backlog() -> int:
    """Jobs due and waiting to be published (not the ones published and not finished yet, nor the
    ones waiting for their time)."""
    due = Q(not_before__isnull=True) | Q(not_before__lte=timezone.now())
    return OutboxMessage.objects.filter(due, published_at__isnull=True).count()


def _describe(exc: BaseException) -> str:
    from jobs.redaction import redact_text

    return redact_text(f"{type(exc).__name__}: {exc}")[:500]
