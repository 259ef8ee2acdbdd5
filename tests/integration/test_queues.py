"""Queue routing as a worker sees it: `high` first, and nothing stuck behind a long task."""

from __future__ import annotations

import uuid

import pytest

from tests.integration import tasks
from tests.integration.conftest import wait_for

pytestmark = [pytest.mark.django_db(transaction=True), pytest.mark.integration]


def test_a_worker_on_all_queues_serves_high_before_normal_before_low(start_worker, redis_client):
    key = f"order-{uuid.uuid4().hex}"
    # Published while no worker runs, low first, so arrival order would put high last.
    for n in range(3):
        tasks.record_order.apply_async((key, f"low-{n}"), queue="low")
    tasks.record_order.apply_async((key, "normal"), queue="normal")
    tasks.record_order.apply_async((key, "high"), queue="high")

    start_worker(concurrency=1)  # -Q high,normal,low, as the Procfile and compose start it
    wait_for(lambda: redis_client.llen(key) == 5)
    order = [item.decode() for item in redis_client.lrange(key, 0, -1)]
    assert order[:2] == ["high", "normal"]
    assert sorted(order[2:]) == ["low-0", "low-1", "low-2"]


def test_short_tasks_do_not_wait_behind_a_long_one_on_a_busy_worker(start_worker, redis_client):
    """Prefetch multiplier 1 with late acks: a worker busy with a long task holds no other
    message, so a second worker runs the short ones at once (celery#1933)."""
    key = f"k-{uuid.uuid4().hex}"
    busy = start_worker(concurrency=1)
    tasks.slow_mark.delay(key, 0, 10.0)
    wait_for(lambda: redis_client.sismember(f"{key}:started", 0))
    for n in range(1, 4):
        tasks.slow_mark.delay(key, n, 0.05)
    start_worker(concurrency=1)
    wait_for(lambda: {int(m) for m in redis_client.smembers(f"{key}:done")} >= {1, 2, 3}, timeout=15)
    assert not redis_client.sismember(f"{key}:done", 0)  # the long task is still running on the first
    assert busy.process.poll() is None
