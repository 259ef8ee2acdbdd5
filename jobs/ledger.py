"""The database as the ledger of every accepted job; the broker as the fast path.

A job published through `jobs.outbox.enqueue` keeps its `OutboxMessage` row until it has
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
- On other brokers (RabbitMQ keeps durable queues and cannot be read without consuming), a job
  absent from every worker's reserved set is republished once it was published more than
  `CELERY_VISIBILITY_TIMEOUT` plus a minute ago.

Cost per job: the INSERT in the caller's transaction, one UPDATE when published, one DELETE at
the end. A sweep reads the broker only when some row is old enough to be a candidate.
Republishing is idempotent by design: the apps' tasks are (an email is claimed before it is
handed off, thumbnails are named by content), so a job republished while it was in fact still
somewhere does its work once.
"""

from __future__ import annotations

import contextlib
import json
import logging
import re
import socket
import threading
import uuid
from collections.abc import Iterable
from datetime import timedelta
from typing import Any

from django.conf import settings
from django.db import connection
from django.db.models import Min
from django.utils import timezone

from jobs.db import with_fresh_connection
from jobs.models import OutboxMessage
from jobs.outbox import LEDGER_HEADER, ledger_claim, outbox_relay, publish_claimed

logger = logging.getLogger("jobs.ledger")

RESERVED_KEY = "jobs:reserved:{}"
SWEEP_LOCK_KEY = "jobs:ledger:sweep"
#: At most this many messages are read from the broker's queues in one sweep; beyond it the
#: sweep does not judge (a backlog that large is drained first) and says so.
SCAN_LIMIT = 200_000
_TASK_ID = re.compile(rb'"id": ?"([^"]{1,64})"')


# --- the end of a job ---------------------------------------------------------------------------


def ledger_finish(task_id: str) -> bool:
    """Forgets a job that has finished (succeeded, or dead-lettered). One DELETE, in autocommit,
    reconnecting once when the connection died. False when the row could not be deleted: the
    sweeper may then run the job once more, which the apps' tasks tolerate."""
    if not task_id:
        return False
    table = connection.ops.quote_name(OutboxMessage._meta.db_table)

    def delete() -> None:
        with connection.cursor() as cursor:
            cursor.execute(f"DELETE FROM {table} WHERE task_id = %s", [task_id])  # noqa: S608 - our own table

    try:
        with_fresh_connection(delete, what="ledger_finish", attempts=2, pause=0.2)
    except Exception as exc:  # noqa: BLE001 - never fail a task's end on its bookkeeping
        logger.warning(
            "ledger.finish_failed", extra={"task_id": task_id, "error": f"{type(exc).__name__}: {exc}"[:300]}
        )
        return False
    return True


def ledger_defer_retry(
    *, task_name: str, task_id: str, args: Any, kwargs: Any, headers: dict, queue: str, retries: int, delay: float
) -> bool:
    """The broker refused a retry's message: the ledger keeps the job and the relay publishes the
    retry when it is due. Creates the row when the job was not in the ledger yet (a task sent by
    beat or by `.delay()`). False when the database could not be written either."""
    not_before = timezone.now() + timedelta(seconds=delay)
    options = {"queue": queue} if queue else {}
    headers = {k: v for k, v in (headers or {}).items() if isinstance(k, str)}
    headers[LEDGER_HEADER] = 1

    def write() -> None:
        updated = OutboxMessage.objects.filter(task_id=task_id).update(
            published_at=None, not_before=not_before, retries=retries, missing_since=None, claim="", claimed_until=None
        )
        if not updated:
            OutboxMessage.objects.create(
                task_name=task_name,
                task_id=task_id,
                args=list(args or ()),
                kwargs=dict(kwargs or {}),
                options={**options, "headers": headers},
                not_before=not_before,
                retries=retries,
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


def broker_task_ids(*, limit: int = SCAN_LIMIT) -> set[str] | None:
    """Task ids of every message the Redis broker holds (queued or delivered and unacknowledged);
    None when the broker is not Redis or holds more than `limit` messages (not judged)."""
    from celery import current_app

    if not settings.BROKER_IS_REDIS:
        return None
    found: set[str] = set()
    with current_app.connection_for_write() as conn:
        channel = conn.default_channel
        client = channel.client
        keys = [
            channel._q_for_pri(queue.name, priority)
            for queue in current_app.amqp.queues.values()
            for priority in channel.priority_steps
        ]
        lengths = {key: client.llen(key) for key in keys}
        if sum(lengths.values()) > limit:
            logger.warning(
                "ledger.sweep_skipped", extra={"reason": "backlog too large", "messages": sum(lengths.values())}
            )
            return None
        for key, length in lengths.items():
            for start in range(0, length, 1000):
                found.update(_ids(client.lrange(key, start, start + 999)))
        found.update(_ids(client.hvals(channel.unacked_key)))
    return found


def _ids(raw_messages: Iterable[bytes]) -> set[str]:
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


def _redis_client():
    import redis

    return redis.Redis.from_url(settings.REDIS_URL, socket_connect_timeout=1, socket_timeout=1)


def worker_reserved_publish(hostname: str, task_ids: Iterable[str], *, client: Any = None) -> None:
    """Records which tasks this worker holds (running, prefetched, waiting for their ETA), for
    the sweeper; expires by itself when the worker is gone."""
    ttl = max(int(settings.JOBS_LIVENESS_INTERVAL * 4), 10)
    (client or _redis_client()).set(RESERVED_KEY.format(hostname), json.dumps(sorted(task_ids)), ex=ttl)


def workers_reserved_ids(*, client: Any = None) -> set[str]:
    client = client or _redis_client()
    ids: set[str] = set()
    for key in client.scan_iter(match=RESERVED_KEY.format("*"), count=100):
        raw = client.get(key)
        if raw:
            ids.update(str(item) for item in json.loads(raw))
    return ids


# --- the sweep ----------------------------------------------------------------------------------


def ledger_sweep(*, limit: int = 1000) -> dict[str, int]:
    """Republishes the published jobs whose message the broker no longer holds (see the module's
    docstring). Returns counts: candidates, missing (seen gone once), republished."""
    now = timezone.now()
    lost_after = timedelta(seconds=settings.JOBS_LEDGER_LOST_AFTER)
    grace = timedelta(seconds=settings.JOBS_LEDGER_MISSING_GRACE)
    candidates = list(
        OutboxMessage.objects.filter(published_at__lt=now - lost_after)
        .order_by("published_at")
        .values_list("pk", "task_id", "missing_since", "published_at")[:limit]
    )
    result = {"candidates": len(candidates), "missing": 0, "republished": 0}
    if not candidates:
        return result
    in_workers = workers_reserved_ids()
    in_broker = broker_task_ids()
    if in_broker is None:
        # Not readable: only the time-based rule, past the longest a broker may hold a message.
        cutoff = now - timedelta(seconds=settings.CELERY_VISIBILITY_TIMEOUT + 60)
        gone = [pk for pk, task_id, _m, published in candidates if published < cutoff and task_id not in in_workers]
        present: list[int] = []
        first_seen: list[int] = []
    else:
        held = in_broker | in_workers
        present = [pk for pk, task_id, missing, _p in candidates if task_id in held and missing is not None]
        absent = [(pk, missing) for pk, task_id, missing, _p in candidates if task_id not in held]
        first_seen = [pk for pk, missing in absent if missing is None]
        gone = [pk for pk, missing in absent if missing is not None and missing <= now - grace]
    if present:
        OutboxMessage.objects.filter(pk__in=present).update(missing_since=None)
    if first_seen:
        OutboxMessage.objects.filter(pk__in=first_seen, missing_since__isnull=True).update(missing_since=now)
    result["missing"] = len(first_seen)
    if gone:
        result["republished"] = _republish(gone)
    return result


def _republish(ids: list[int]) -> int:
    from django.db.models import F

    from jobs import metrics

    rows = OutboxMessage.objects.filter(pk__in=ids, published_at__isnull=False)
    _claim, claimed = ledger_claim(rows, limit=len(ids))
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
    OutboxMessage.objects.filter(pk__in=[row.pk for row in claimed]).update(republished=F("republished") + 1)
    published, _failed, _unpublishable = publish_claimed(claimed)
    return published


def ledger_run() -> dict[str, Any]:
    """One round of the ledger's upkeep: the relay, then the sweep."""
    return {"relay": outbox_relay(), "sweep": ledger_sweep()}


def ledger_oldest_age() -> float:
    """Seconds since the oldest unfinished job in the ledger was accepted (0: none)."""
    oldest = OutboxMessage.objects.aggregate(oldest=Min("created_at"))["oldest"]
    return max((timezone.now() - oldest).total_seconds(), 0.0) if oldest else 0.0


def ledger_counts() -> dict[str, int]:
    """Unfinished jobs by state: `unpublished` (waiting for the broker or their time),
    `published`, `missing` (a sweep found the broker without them)."""
    rows = OutboxMessage.objects
    return {
        "unpublished": rows.filter(published_at__isnull=True).count(),
        "published": rows.filter(published_at__isnull=False, missing_since__isnull=True).count(),
        "missing": rows.filter(missing_since__isnull=False).count(),
    }


# --- the sweeper in the worker -----------------------------------------------------------------


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
        self.stopped.set()

    def _loop(self) -> None:
        from django.db import close_old_connections

        while not self.stopped.wait(self.interval):
            try:
                if self._lead():
                    close_old_connections()
                    with_fresh_connection(ledger_run, what="ledger_sweep", attempts=2)
            except Exception as exc:  # noqa: BLE001 - the next round tries again
                logger.warning("ledger.sweep_failed", extra={"error": f"{type(exc).__name__}: {exc}"[:300]})
            finally:
                with contextlib.suppress(Exception):  # this thread's own connection: never left to go stale
                    connection.close()

    def _lead(self) -> bool:
        ttl = max(int(self.interval * 2000), 2000)
        client = _redis_client()
        if client.set(SWEEP_LOCK_KEY, self.token, nx=True, px=ttl):
            return True
        if (client.get(SWEEP_LOCK_KEY) or b"").decode() == self.token:
            client.pexpire(SWEEP_LOCK_KEY, ttl)
            return True
        return False
