"""Paused queues, applied by every worker (`jobs.models.PausedQueue`, written by
`jobs.services.queue_pause`/`queue_resume`).

A worker's main process reads the paused queues when it starts, before it takes anything, then
every `JOBS_PAUSE_SYNC_SECONDS` in a thread of its own (a database that hangs never stalls the
event loop), and its event loop stops consuming a paused queue of its own and starts again once it
is resumed (Celery's `cancel_task_queue`/`add_task_queue`; a queue the worker was not started on
is never added). Messages it had already taken from the queue before it stopped (prefetched, or
waiting for their countdown) do not start either: a job of the table whose queue is paused is
given back to the broker when it would start (`paused`), where it waits with the rest.
"""

from __future__ import annotations

import threading
import time
from typing import Any

from jobs.conf import jobs_settings
from jobs.logging import get_logger

logger = get_logger("jobs.runtime.pause")


def read_paused() -> set[str]:
    """The paused queues, from the database (raises when it does not answer)."""
    from jobs.models import PausedQueue

    return set(PausedQueue.objects.values_list("queue", flat=True))


_cache: dict[str, Any] = {"at": float("-inf"), "queues": frozenset()}
_cache_lock = threading.Lock()


def is_paused(queue: str) -> bool:
    """Is `queue` paused? Read at most every `JOBS_PAUSE_SYNC_SECONDS` per process; a database
    that does not answer leaves the last answer (the start that follows needs it anyway)."""
    if not queue:
        return False
    now = time.monotonic()
    with _cache_lock:
        fresh = now - _cache["at"] < float(jobs_settings.PAUSE_SYNC_SECONDS)
        if not fresh:
            _cache["at"] = now
    if not fresh:
        try:
            _cache["queues"] = frozenset(read_paused())
        except Exception as exc:  # noqa: BLE001 - the database is away: the lease's start fails closed
            logger.warning("pause.unknown", extra={"error": f"{type(exc).__name__}: {exc}"[:200]})
    return queue in _cache["queues"]


def forget_cache() -> None:
    _cache["at"] = float("-inf")


class PauseSync:
    """A worker's side: `wanted` (the paused queues, refreshed by a thread) applied to its consumer
    by `apply`, called from the event loop."""

    def __init__(self, consumer: Any) -> None:
        self.consumer = consumer
        # Kept on the consumer, which outlives its restarts (a lost broker connection): a queue
        # paused before one is still this worker's own to resume after it.
        if getattr(consumer, "jobs_own_queues", None) is None:
            consumer.jobs_own_queues = {queue.name for queue in consumer.task_consumer.queues}
            consumer.jobs_paused_queues = set()
        self.own: set[str] = consumer.jobs_own_queues
        self.paused: set[str] = consumer.jobs_paused_queues  # own queues this worker stopped consuming
        self.wanted: set[str] | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def refresh(self) -> None:
        from django.db import close_old_connections

        try:
            close_old_connections()
            self.wanted = read_paused()
        except Exception as exc:  # noqa: BLE001 - keep what it has; try again next round
            logger.warning("pause.read_failed", extra={"error": f"{type(exc).__name__}: {exc}"[:200]})

    def start(self) -> None:
        self._thread = threading.Thread(target=self._loop, name="jobs-pause-sync", daemon=True)
        self._thread.start()

    def _loop(self) -> None:
        interval = float(jobs_settings.PAUSE_SYNC_SECONDS)
        while not self._stop.wait(interval):
            self.refresh()

    def stop(self) -> None:
        self._stop.set()

    def apply(self) -> None:
        """Stops consuming the own queues now paused, starts again on those resumed."""
        wanted = self.wanted
        if wanted is None:
            return
        consumer = self.consumer
        for queue in sorted((self.own & wanted) - self.paused):
            consumer.cancel_task_queue(queue)
            self.paused.add(queue)
            logger.warning("pause.queue_paused", extra={"queue": queue, "hostname": consumer.hostname})
        for queue in sorted(self.paused - wanted):
            consumer.add_task_queue(queue)
            self.paused.discard(queue)
            logger.warning("pause.queue_resumed", extra={"queue": queue, "hostname": consumer.hostname})
