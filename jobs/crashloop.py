"""Counts how often a task started without finishing, to quarantine tasks that kill workers.

A start increments a counter in the cache (Redis); any normal end (success, retry, failure)
clears it. A worker killed mid-task never clears it, so the next delivery of the same message
sees how many attempts died before it. A cache outage never blocks a task: it then counts 1.
"""

from __future__ import annotations

import logging

from django.core.cache import cache

logger = logging.getLogger(__name__)

KEY = "jobs:starts:{}"
TTL = 7 * 24 * 3600


def note_start(task_id: str) -> int:
    """Records one more start of `task_id`; returns how many unfinished starts there are now."""
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
