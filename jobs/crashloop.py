"""Counts how often a task's worker died under it, to quarantine tasks that kill workers.

Two places see a death:

- the worker's main process, when a pool process dies under a task (`WorkerLostError`: a
  segfault, the OOM killer): it counts the loss at once (`note_loss`), and before it hands a
  redelivered task to the pool it checks the count (`losses`), so a task that kills its process
  even before its body starts is still stopped;
- the pool process, at a delivery marked `redelivered` whose previous death nobody counted (the
  whole worker was killed): it counts it there (`note_redelivery`).

Nothing is counted on a first delivery (no cost for the normal case); a normal end of a counted
attempt clears the count. A cache outage never blocks a task: it then counts 1.
"""

from __future__ import annotations

from django.core.cache import cache

from jobs.logging import get_logger

logger = get_logger(__name__)

KEY = "jobs:starts:{}"
COUNTED = "jobs:lost-counted:{}"
TTL = 7 * 24 * 3600


def _incr(task_id: str) -> int:
    key = KEY.format(task_id)
    cache.add(key, 0, timeout=TTL)
    return int(cache.incr(key))


def note_loss(task_id: str) -> int:
    """The main process saw the pool process die under `task_id`; returns the deaths so far."""
    try:
        deaths = _incr(task_id)
        cache.set(COUNTED.format(task_id), 1, timeout=TTL)
        return deaths
    except Exception:
        logger.warning("crashloop.count_unavailable", exc_info=True)
        return 0


def losses(task_id: str) -> int:
    """Deaths counted so far for `task_id` (0 when none, or when the cache does not answer)."""
    try:
        return int(cache.get(KEY.format(task_id)) or 0)
    except Exception:
        logger.warning("crashloop.count_unavailable", exc_info=True)
        return 0


def note_redelivery(task_id: str) -> int:
    """At a redelivered attempt: counts the previous delivery's death unless the main process
    already did; returns how many deliveries died before this one."""
    try:
        if cache.delete(COUNTED.format(task_id)):
            return losses(task_id)
        return _incr(task_id)
    except Exception:
        logger.warning("crashloop.count_unavailable", exc_info=True)
        return 1


def clear(task_id: str) -> None:
    try:
        cache.delete_many([KEY.format(task_id), COUNTED.format(task_id)])
    except Exception:
        logger.warning("crashloop.clear_failed", exc_info=True)
