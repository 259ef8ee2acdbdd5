"""Counts how often a task's worker died under it, to quarantine tasks that kill workers.

A message comes back marked `redelivered` only when its previous delivery never finished: the
worker was killed, crashed or cut it off at shutdown (Redis restores it, RabbitMQ requeues it).
So nothing is counted on a first delivery (no cost for the normal case); each redelivery adds one
to a counter in the cache (Redis), and a normal end of a counted attempt clears it. A cache
outage never blocks a task: it then counts 1.
"""

from __future__ import annotations

import logging

from django.core.cache import cache

logger = logging.getLogger(__name__)

KEY = "jobs:starts:{}"
TTL = 7 * 24 * 3600


def note_redelivery(task_id: str) -> int:
    """Records one more redelivery of `task_id`; returns how many deliveries died before this one."""
    key = KEY.format(task_id)
    try:
        cache.add(key, 0, timeout=TTL)
        return int(cache.incr(key))
    except Exception:
        logger.warning("crashloop.count_unavailable", exc_info=True)
        return 1


def clear(task_id: str) -> None:
    try:
        cache.delete(KEY.format(task_id))
    except Exception:
        logger.warning("crashloop.clear_failed", exc_info=True)
