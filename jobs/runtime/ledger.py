"""The database as the ledger of every accepted job; the broker as the fast path.

A job published through `jobs.runtime.outbox.enqueue` keeps its `OutboxMessage` row until it has
finished: the worker deletes the row when the task succeeds, or once its dead letter is written
(`ledger_finish`). So a row that stays long after it was published is a job whose message the
broker may have lost: Redis restarted without persistence, a failover to a replica that had not
caught up, a message dropped under memory pressure. `ledger_sweep` finds them and publishes them
again, with the same task id:

- On Redis, a job counts as present while its message is in a queue, in the transport's
  `unacked` hash (delivered, not acknowledged: running, prefetched or held for its ETA), or in a
  live worker's reserved set (`worker_reserved_publish`, refreshed every few seconds by each
  worker). A job published more than `JOBS_LEDGER_LOST_AFTER` seconds ago and found in none of
  them on two sweeps at least `JOBS_LEDGER_MISSING_GRACE` seconds apart is republished.
- On other brokers (RabbitMQ keeps durable queues and cannot be read without consuming), only
  queues with no message ready are judged: a job of such a queue that no live worker holds, seen
  so on two sweeps at least `JOBS_LEDGER_MISSING_GRACE` (and two of the workers' refreshes)
  apart, is republished. A deleted vhost or a node that lost its disk costs about a minute, not
  the visibility timeout; a queue with a backlog is judged once it is drained.

Cost per job: the INSERT in the caller's transaction, one UPDATE when published, one DELETE at
the end. A sweep reads the broker only when some row is old enough to be a candidate.
Republishing is idempotent by design: the apps' tasks are (an email is claimed before it is
handed off, thumbnails are named by content), so a job republished while it was in fact still
somewhere does its work once.
"""

from __future__ import annotations

import json
import re
import socket
import threading
import time
import uuid
from collections.abc import Iterable
from datetime import timedelta
from typing import TYPE_CHECKING, Any, cast

import redis
from django.db.models import Count, Min, Q
from django.db.models.functions import Coalesce
from django.utils import timezone

from jobs.conf import jobs_settings
from jobs.db import with_fresh_connection
from jobs.models import DeadLetter, OutboxMessage
from jobs.outcomes import LEDGER_HEADER
from jobs.runtime import store
from jobs.runtime.outbox import (
    CLAIM_TTL,
    drop_expired_ticks,
    ledger_claim,
    outbox_relay,
    outbox_relay_due,
    publish_claimed,
)

if TYPE_CHECKING:
    from kombu.transport.redis import Channel as RedisChannel
from jobs.logging import get_logger

logger = get_logger("jobs.runtime.ledger")

RESERVED_KEY = "jobs:reserved"
SWEEP_LOCK_KEY = "jobs:ledger:sweep"
#: At most this many messages are read from the broker's queues in one sweep; beyond it the
#: sweep does not judge (a backlog that large is drained first) and says so.
SCAN_LIMIT = 200_000
_TASK_ID = re.compile(rb'"id": ?"([^"]{1,64})"')


# --- the end of a job ---------------------------------------------------------------------------


def ledger_finish(task_id: str) -> bool:
    """Forgets a job that has finished (succeeded, or dead-lettered): its row is deleted, only
    while this process's run of it (if it holds one) still owns it (`jobs.runtime.store`). A
    delete the database does not take now is kept and retried in the background."""
    from jobs.runtime.store import job_finish

    return job_finish(task_id)


def ledger_defer_retry(
    *,
    task_name: str,
    task_id: str,
    args: Any,
    kwargs: Any,
    headers: dict[str, Any],
    queue: str,
    retries: int,
    delay: float,
    owner: str | None = None,
) -> bool:
    """The broker refused a retry's message: the ledger keeps the job and the relay publishes the
    retry when it is due. Creates the row when the job was not in the ledger yet (a task sent by
    beat or by `.delay()`). False when the database could not be written either."""
    not_before = timezone.now() + timedelta(seconds=delay)
    options = {"queue": queue} if queue else {}
    headers = {k: v for k, v in (headers or {}).items() if isinstance(k, str)}
    headers[LEDGER_HEADER] = 1

    from jobs.runtime.task import POSTPONED_HEADER

    postponed = int(headers.pop(POSTPONED_HEADER, 0) or 0)

    def write() -> None:
        from jobs.runtime.store import job_defer_retry

        job_defer_retry(
            task_name=task_name,
            task_id=task_id,
            args=args,
            kwargs=kwargs,
            options=options,
            headers=headers,
            not_before=not_before,
            retries=retries,
            postponed=postponed,
            owner=owner,
        )

    try:
        with_fresh_connection(write, what="ledger_defer_retry")
    except Exception as exc:  # noqa: BLE001
        logger.error("ledger.defer_failed", extra={"task_id": task_id, "error": f"{type(exc).__name__}: {exc}"[:300]})
        return False
    logger.warning(
        "ledger.retry_deferred",
        extra={"task_id": task_id, "ledger_task": task_name, "retries": retries, "delay_seconds": round(delay, 3)},
    )
    return True


# --- what the broker and the workers hold -----------------------------------------------------


class BrokerView:
    """What a sweep could learn from the broker: the task ids it holds (Redis), or only how many
    messages wait ready in each queue (RabbitMQ), or nothing (`skipped`: not judged this round).
    `unjudged` names queues too long to read this round: their jobs are not judged."""

    def __init__(
        self,
        *,
        ids: set[str] | None = None,
        depths: dict[str, int] | None = None,
        unjudged: set[str] | None = None,
        queued: set[str] | None = None,
    ) -> None:
        self.ids = ids  # queued or delivered and not acknowledged
        self.queued = queued if queued is not None else (ids or set())  # in a queue
        self.depths = depths
        self.unjudged = unjudged or set()

    @property
    def skipped(self) -> bool:
        return self.ids is None and self.depths is None


def _prefixed(client: Any, command: str, key: str) -> str:
    """`key` as kombu's Redis transport stores it: with the broker's `global_keyprefix`, which
    kombu's client adds itself only for the commands it knows (not LRANGE or HVALS)."""
    if command in getattr(type(client), "PREFIXED_SIMPLE_COMMANDS", ()):
        return key
    return str(getattr(client, "global_keyprefix", "") or "") + key


def read_list(client: Any, key: str, *, limit: int, page: int = 1000) -> list[bytes] | None:
    """Every message of one of kombu's lists, read from its tail (the oldest end: kombu pushes at
    the head and takes from the tail, so pages counted from the tail do not shift as producers
    push), page after page until a page comes back empty: the list is re-measured as it is read.
    None past `limit` messages (not judged)."""
    key = _prefixed(client, "LRANGE", key)
    found: list[bytes] = []
    start = 0
    while True:
        chunk = client.lrange(key, -(start + page), -(start + 1))
        if not chunk:
            return found
        found.extend(chunk)
        if len(found) > limit:
            return None
        start += page


def broker_view(*, limit: int | None = None) -> BrokerView:
    """On Redis, the task ids of every message the broker holds (queued, or delivered and not
    acknowledged); a queue with more than `limit` messages is left unjudged (its backlog is
    drained first), the others are judged as usual. On other brokers, the ready depth of each
    queue (a passive declare)."""
    from celery import current_app

    limit = SCAN_LIMIT if limit is None else limit
    queues = list(current_app.amqp.queues.values())
    with current_app.connection_for_write() as conn:
        channel = conn.default_channel
        if not jobs_settings.broker_is_redis:
            depths = {}
            for queue in queues:
                try:
                    # Every kombu channel has queue_declare; the stubs (celery-types) leave it out of StdChannel.
                    depths[queue.name] = int(channel.queue_declare(queue.name, passive=True)[1])  # type: ignore[attr-defined]
                except conn.channel_errors:  # no such queue: nothing waits in it
                    depths[queue.name] = 0
                    channel = conn.channel()  # AMQP closes a channel on an error
            return BrokerView(depths=depths)
        channel = cast("RedisChannel", channel)  # broker_is_redis: kombu's Redis transport
        client = channel.client
        found: set[str] = set()
        unjudged: set[str] = set()
        for queue in queues:
            # _q_for_pri (the key of a queue's priority level) is private: not in kombu's stubs.
            for priority in channel.priority_steps:
                messages = read_list(client, channel._q_for_pri(queue.name, priority), limit=limit)  # type: ignore[attr-defined]
                if messages is None:
                    unjudged.add(queue.name)
                    break
                found.update(message_ids(messages))
        if unjudged:
            logger.warning("ledger.sweep_skipped", extra={"reason": "backlog too large", "queues": sorted(unjudged)})
        queued = set(found)
        found.update(message_ids(client.hvals(_prefixed(client, "HVALS", channel.unacked_key))))
    return BrokerView(ids=found, unjudged=unjudged, queued=queued)


def message_ids(raw_messages: Iterable[bytes]) -> set[str]:
    """The task ids of messages as kombu's Redis transport stores them (JSON, Celery's headers
    inside; in the unacked hash wrapped in a list)."""
    ids = set()
    for raw in raw_messages:
        try:
            payload = json.loads(raw)
            if isinstance(payload, list):  # the unacked hash holds [message, exchange, routing_key]
                payload = payload[0]
            task_id = (payload.get("headers") or {}).get("id")
        except (ValueError, AttributeError, IndexError, TypeError):
            match = _TASK_ID.search(raw if isinstance(raw, bytes) else str(raw).encode())
            task_id = match.group(1).decode(errors="replace") if match else None
        if task_id:
            ids.add(str(task_id))
    return ids


def _redis_client() -> redis.Redis:
    from jobs.redis_client import redis_client

    return redis_client(timeout=1)


def worker_reserved_publish(hostname: str, task_ids: Iterable[str], *, client: redis.Redis | None = None) -> None:
    """Records which tasks this worker holds (running, prefetched, waiting for their ETA), for
    the sweeper: one field of one hash, read as stale when the worker stops refreshing it."""
    value = json.dumps({"at": time.time(), "ids": sorted(task_ids)})
    (client or _redis_client()).hset(RESERVED_KEY, hostname, value)


def workers_reserved_ids(*, client: redis.Redis | None = None) -> set[str]:
    """Task ids held by the live workers; entries of workers gone silent are dropped."""
    client = client or _redis_client()
    stale_after = max(jobs_settings.LIVENESS_INTERVAL * 4, 10)
    ids: set[str] = set()
    for hostname, raw in client.hgetall(RESERVED_KEY).items():
        try:
            entry = json.loads(raw)
            fresh = time.time() - float(entry["at"]) < stale_after
        except (ValueError, KeyError, TypeError):
            fresh = False
        if fresh:
            ids.update(str(item) for item in entry["ids"])
        else:
            client.hdel(RESERVED_KEY, hostname)
    return ids


# --- the sweep ----------------------------------------------------------------------------------


def _queue_of(task_name: str, options: dict[str, Any]) -> str:
    from celery import current_app

    queue = (options or {}).get("queue") or current_app.amqp.router.route({}, task_name).get("queue")
    return str(getattr(queue, "name", queue) or jobs_settings.default_queue)


def ledger_sweep(*, limit: int = 1000, reclaim: bool = True) -> dict[str, int]:
    """Brings back the jobs that would otherwise wait for ever (see the module's docstring): runs
    whose lease lapsed (their process or worker died), then published jobs whose message the
    broker no longer holds. Returns counts: reclaimed, candidates, missing (seen gone once),
    republished, given_up."""
    now = timezone.now()
    lost_after = timedelta(seconds=jobs_settings.LEDGER_LOST_AFTER)
    grace = timedelta(seconds=jobs_settings.LEDGER_MISSING_GRACE)
    result = {
        "reclaimed": ledger_reclaim(limit=limit) if reclaim else 0,
        "candidates": 0,
        "missing": 0,
        "republished": 0,
    }
    # Only jobs no run has started: a started one is the lease's business.
    candidates = list(
        OutboxMessage.objects.filter(state=OutboxMessage.State.AVAILABLE, published_at__lt=now - lost_after)
        .order_by("published_at")
        .values_list("pk", "task_id", "task_name", "options", "missing_since", "published_at")[:limit]
    )
    result["candidates"] = len(candidates)
    if not candidates:
        return result
    view = broker_view()
    if view.skipped:
        return result
    candidates = [row for row in candidates if _queue_of(row[2], row[3]) not in view.unjudged]
    in_workers = workers_reserved_ids()
    if view.ids is None:
        # Queues that cannot be read (RabbitMQ): a queue with messages ready may hold any of its
        # jobs and is not judged; in an empty one, a job no live worker holds (running,
        # prefetched, waiting for its ETA) is nowhere. A message on its way to a worker that has
        # not said so yet is covered by the two looks, at least two of the workers' refreshes
        # apart. A message wrongly judged lost (held by a connection RabbitMQ has not yet found
        # dead) costs a copy, which the start lease skips.
        depths = view.depths or {}
        empty, unseen = [], []
        for row in candidates:
            if depths.get(_queue_of(row[2], row[3]), 1) == 0:
                empty.append(row)
            elif row[4] is not None:
                # A job of a queue with a backlog may be in it: a look that found it missing
                # before no longer counts (two looks in a row, with its queue empty, judge it).
                unseen.append(row[0])
        if unseen:
            store.jobs_seen(unseen)
        held = in_workers
        grace = max(grace, timedelta(seconds=2 * jobs_settings.LIVENESS_INTERVAL))
    else:
        # A message in the `unacked` hash alone is no sign of life: its worker may be dead (SIGKILL
        # between delivery and start), and Redis keeps it there for the visibility timeout. Only
        # the queues and what live workers say they hold count; a copy sent by mistake is skipped
        # by the start lease.
        empty = candidates
        held = (view.queued or set()) | in_workers
    present = [pk for pk, task_id, _n, _o, missing, _p in empty if task_id in held and missing is not None]
    absent = [(pk, missing) for pk, task_id, _n, _o, missing, _p in empty if task_id not in held]
    first_seen = [pk for pk, missing in absent if missing is None]
    gone = [pk for pk, missing in absent if missing is not None and missing <= now - grace]
    judged = {"missing_since__lte": now - grace}
    if present:
        store.jobs_seen(present)
    if first_seen:
        store.jobs_missing(first_seen, since=now)
    result["missing"] = len(first_seen)
    if gone:
        result["republished"] = _republish(gone, judged)
    return result


def ledger_reclaim(*, limit: int = 500) -> int:
    """Runs whose lease lapsed (`jobs.runtime.store`: their process or worker died): the job is
    published again, once per crash; one whose runs died `JOBS_WORKER_LOST_LIMIT` times is given
    up (dead letter `worker_lost`). Returns how many were published."""
    from jobs import metrics

    lapsed = store.jobs_lapsed(limit=limit, running=workers_reserved_ids)
    if not lapsed:
        return 0
    limit_crashes = int(jobs_settings.WORKER_LOST_LIMIT)
    doomed = [row for row in lapsed if row.crashes + 1 >= limit_crashes]
    for row in doomed:
        _give_up(
            row,
            reason=DeadLetter.Reason.WORKER_LOST,
            exc_type="WorkerLost",
            message=f"the process running this job died {row.crashes + 1} times; quarantined",
        )
    claim = uuid.uuid4().hex
    alive = [row.pk for row in lapsed if row not in doomed]
    if not alive:
        return 0
    store.jobs_reclaim(alive, claim=claim, claimed_until=timezone.now() + CLAIM_TTL)
    rows = list(OutboxMessage.objects.filter(claim=claim, pk__in=alive).order_by("pk"))
    for row in rows:
        logger.warning(
            "ledger.lease_lapsed",
            extra={"task_id": row.task_id, "ledger_task": row.task_name, "crashes": row.crashes},
        )
        metrics.ledger_republished(task_name=row.task_name)
    published, _failed, _unpublishable = publish_claimed(rows)
    return published


def _give_up(row: OutboxMessage, *, reason: str, exc_type: str, message: str) -> None:
    """A job the sweeper stops bringing back: it ends through the failure path (dead letter)."""
    from celery import current_app

    from jobs.outcomes import job_gave_up
    from jobs.runtime.outbox import job_of_row

    job_gave_up(
        task=current_app.tasks.get(row.task_name),
        job=job_of_row(row, queue=_queue_of(row.task_name, row.options)),
        reason=reason,
        exc_type=exc_type,
        exc_message=message,
        worker="ledger sweeper",
    )


def _republish(ids: list[int], judged: dict[str, Any]) -> int:
    """Claims and publishes the rows judged lost, only while they still are as judged: a sweep
    running beside this one (another worker, beat's) that republished one first has changed it.
    A job lost `JOBS_LEDGER_REPUBLISH_LIMIT` times is given up instead (dead letter)."""
    from jobs import metrics

    rows = OutboxMessage.objects.filter(
        pk__in=ids, state=OutboxMessage.State.AVAILABLE, published_at__isnull=False, **judged
    )
    _claim, claimed = ledger_claim(rows, limit=len(ids))
    claimed = drop_expired_ticks(claimed)
    cap = int(jobs_settings.LEDGER_REPUBLISH_LIMIT)
    over = [row for row in claimed if row.republished >= cap]
    for row in over:
        _give_up(
            row,
            reason=DeadLetter.Reason.LOST_REPEATEDLY,
            exc_type="LostRepeatedly",
            message=f"the broker lost this job's message {row.republished + 1} times",
        )
    claimed = [row for row in claimed if row not in over]
    for row in claimed:
        logger.warning(
            "ledger.republishing",
            extra={
                "task_id": row.task_id,
                "ledger_task": row.task_name,
                "published_at": row.published_at.isoformat() if row.published_at else None,
                "missing_since": row.missing_since.isoformat() if row.missing_since else None,
                "republished": row.republished + 1,
            },
        )
        metrics.ledger_republished(task_name=row.task_name)
    published, _failed, _unpublishable = publish_claimed(claimed, republish=True)
    return published


def sweep_lock(token: str, *, ttl: float) -> bool:
    """Whether `token` may sweep now: takes or renews a Redis lock with expiry. One sweep at a
    time saves reading the broker twice; correctness does not depend on it (rows are claimed as
    judged). When Redis does not answer the lock, the sweep goes ahead."""
    try:
        client = _redis_client()
        ttl_ms = max(int(ttl * 1000), 2000)
        if client.set(SWEEP_LOCK_KEY, token, nx=True, px=ttl_ms):
            return True
        # Without decode_responses Redis answers bytes (redis-py types it bytes | str).
        if (cast("bytes | None", client.get(SWEEP_LOCK_KEY)) or b"").decode() == token:
            client.pexpire(SWEEP_LOCK_KEY, ttl_ms)
            return True
        return False
    except Exception:  # noqa: BLE001
        return True


def ledger_run(*, token: str | None = None, ttl: float = 60.0) -> dict[str, Any]:
    """One round of the upkeep: lapsed leases reclaimed (by every sweeper: its UPDATE is
    conditional, and a dead sweeper's lock must not hold crashed jobs back), then, by the one
    process holding the sweep lock, the relay and the sweep (`{"reclaimed": n}` alone otherwise)."""
    reclaimed = ledger_reclaim()
    if not sweep_lock(token or uuid.uuid4().hex, ttl=ttl):
        return {"reclaimed": reclaimed}
    from jobs.runtime.limits import holds_purge

    return {
        "reclaimed": reclaimed,
        "relay": outbox_relay(),
        "sweep": ledger_sweep(reclaim=False),
        "limit_holds_purged": holds_purge(),
    }


def ledger_oldest_age() -> float:
    """Seconds since the oldest unfinished job in the ledger was due: accepted, or, for one that
    waits for its time (a retry, a job of Django's Tasks API with a far `run_after`), that time
    (0: none). A job not due yet does not count."""
    now = timezone.now()
    due = OutboxMessage.objects.filter(Q(not_before__isnull=True) | Q(not_before__lte=now))
    oldest = due.aggregate(oldest=Min(Coalesce("not_before", "created_at")))["oldest"]
    return max((now - oldest).total_seconds(), 0.0) if oldest else 0.0


def ledger_counts() -> dict[str, int]:
    """Unfinished jobs by state: `unpublished` (waiting for the broker or their time),
    `published`, `missing` (a sweep found the broker without them)."""
    return OutboxMessage.objects.aggregate(
        unpublished=Count("pk", filter=Q(published_at__isnull=True)),
        published=Count("pk", filter=Q(published_at__isnull=False, missing_since__isnull=True)),
        missing=Count("pk", filter=Q(missing_since__isnull=False)),
    )


# --- the sweeper in the worker -----------------------------------------------------------------


def _fleet_publish() -> None:
    """This worker's settings for `manage.py check` to compare across hosts (jobs.fleet)."""
    from jobs.fleet import fleet_publish

    try:
        fleet_publish("worker", _redis_client())
    except Exception as exc:  # noqa: BLE001 - never at the cost of the sweep that follows
        logger.info("fleet.publish_failed", extra={"error": f"{type(exc).__name__}: {exc}"[:200]})


class Sweeper:
    """A daemon thread of the worker's main process that runs `ledger_run()` every
    `JOBS_LEDGER_SWEEP_INTERVAL` seconds. Among several workers one sweeps at a time (a Redis lock
    with expiry). Nothing it meets (broker, cache or database down) stops it: it logs and waits
    for the next round."""

    def __init__(self, interval: float) -> None:
        self.interval = interval
        self.token = f"{socket.gethostname()}:{uuid.uuid4().hex[:8]}"
        self.stopped = threading.Event()
        self.thread = threading.Thread(target=self._loop, name="jobs-ledger-sweeper", daemon=True)

    def start(self) -> Sweeper:
        self.thread.start()
        return self

    def stop(self) -> None:
        # No Redis call here: a worker's shutdown must not wait on Redis. Its fleet record goes
        # stale (jobs.fleet.STALE_AFTER) instead.
        self.stopped.set()

    def _loop(self) -> None:
        from jobs.db import close_connection, drop_stale_connection

        poll = max(float(jobs_settings.SCHEDULE_POLL_INTERVAL), 0.1)
        next_sweep = time.monotonic() + self.interval
        while not self.stopped.wait(min(poll, self.interval)):
            sweep = time.monotonic() >= next_sweep
            try:
                drop_stale_connection()
                if sweep:
                    next_sweep = time.monotonic() + self.interval
                    _fleet_publish()
                    with_fresh_connection(
                        lambda: ledger_run(token=self.token, ttl=self.interval * 2 + 30),
                        what="ledger_sweep",
                        attempts=2,
                    )
                else:
                    # Jobs waiting in the table for their time: published within a poll of it.
                    outbox_relay_due()
            except Exception as exc:  # noqa: BLE001 - the next round tries again
                logger.warning("ledger.sweep_failed", extra={"error": f"{type(exc).__name__}: {exc}"[:300]})
                close_connection()
            finally:
                if sweep:
                    close_connection()  # this thread's own connection: never left to go stale
