"""The throughput benchmark's no-op task body and its producer, shared by every side.

The body (one Redis INCR, plus an RPUSH of the enqueue-to-start time when the message carries
one) is the same function on the plain Celery app (bench/plain_app.py) and on the project's tasks
(bench/tasks.py). The producer runs in a process of its own for each side, so the plain app
publishes without Django or any of the project's signal handlers in the process:

    python -m bench.noop {plain|bare|job|shipped} enqueue KEY COUNT    # prints {"rate": tasks/s}
    python -m bench.noop {plain|bare|job|shipped} latency KEY SAMPLES  # one task at a time, each once
                                                               # the previous one ran

Nothing here imports Django or the project at module level.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

import redis

TASK_NAMES = {
    "plain": "bench.noop_plain",
    "bare": "bench.noop_bare",
    "job": "bench.noop_job",
    "shipped": "bench.noop_shipped",
    # The same task, enqueued into the job table (`jobs.publish.enqueue`, one transaction per job
    # as a view would): a row per job, the start lease, the row's end.
    "ledger": "bench.noop_shipped",
}

_client = None


def _redis() -> redis.Redis:
    global _client
    if _client is None:
        _client = redis.Redis.from_url(os.environ["REDIS_URL"])
    return _client


def record(key: str, sent_at: float | None) -> None:
    """The task body: count one run of `key`, and how long after `sent_at` it started."""
    client = _redis()
    if sent_at is not None:
        client.rpush(f"{key}:latency", time.time() - sent_at)
    client.incr(key)


def done(key: str) -> int:
    """How many tasks of `key` have run."""
    return int(_redis().get(key) or 0)


def latencies_ms(key: str) -> list[float]:
    """The enqueue-to-start times the tasks of `key` recorded, in milliseconds."""
    return [float(v) * 1000 for v in _redis().lrange(f"{key}:latency", 0, -1)]


def wait_done(key: str, count: int, timeout: float, poll: float = 0.001) -> None:
    """Returns once `count` tasks of `key` have run; raises after `timeout` seconds."""
    deadline = time.perf_counter() + timeout
    while done(key) < count:
        if time.perf_counter() > deadline:
            raise RuntimeError(f"{done(key)} of {count} tasks of {key} ran within {timeout} s")
        time.sleep(poll)


def task_for(side: str):
    """The concrete task object of `side`, from its own app (never a proxy to the current app)."""
    if side == "plain":
        from bench.plain_app import app
    else:
        import django

        django.setup()
        import bench.tasks  # noqa: F401  (registers the bench tasks on the project's app)
        from config.celery import app
    return app.tasks[TASK_NAMES[side]]


def _enqueue_ledger(task, key: str, count: int) -> float:
    from django.db import transaction

    from jobs.publish import enqueue as ledger_enqueue

    with transaction.atomic():
        ledger_enqueue(task, args=[f"{key}:warmup"])
    started = time.perf_counter()
    for _ in range(count):
        with transaction.atomic():
            ledger_enqueue(task, args=[key])
    return count / (time.perf_counter() - started)


def enqueue(task, key: str, count: int, *, ledger: bool = False) -> float:
    """Publishes `count` tasks through one producer connection (`ledger`: each into the job
    table, in a transaction of its own); returns tasks per second."""
    if ledger:
        return _enqueue_ledger(task, key, count)
    with task.app.producer_or_acquire() as producer:
        producer.connection.ensure_connection(max_retries=3)
        task.apply_async((f"{key}:warmup",), producer=producer)  # first publish sets up routing
        started = time.perf_counter()
        for _ in range(count):
            task.apply_async((key,), producer=producer)
        return count / (time.perf_counter() - started)


def latency(task, key: str, samples: int, timeout: float = 10, *, ledger: bool = False) -> None:
    """Sends `samples` tasks one at a time to an idle worker; each records its own latency."""

    def send(*args) -> None:
        if not ledger:
            task.delay(*args)
            return
        from django.db import transaction

        from jobs.publish import enqueue as ledger_enqueue

        with transaction.atomic():
            ledger_enqueue(task, args=list(args))

    send(f"{key}:warmup")
    wait_done(f"{key}:warmup", 1, timeout)
    for i in range(samples):
        send(key, time.time())
        wait_done(key, i + 1, timeout)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="producer of the throughput benchmark")
    parser.add_argument("side", choices=sorted(TASK_NAMES))
    parser.add_argument("mode", choices=["enqueue", "latency"])
    parser.add_argument("key")
    parser.add_argument("count", type=int)
    options = parser.parse_args(argv)
    task = task_for(options.side)
    ledger = options.side == "ledger"
    if options.mode == "enqueue":
        print(json.dumps({"rate": enqueue(task, options.key, options.count, ledger=ledger)}), flush=True)
    else:
        latency(task, options.key, options.count, ledger=ledger)
    return 0


if __name__ == "__main__":
    sys.exit(main())
