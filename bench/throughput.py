"""Task throughput and latency: the project's JobTask against a bare Celery task, same worker.

    python bench/throughput.py [--quick]

- enqueue rate from one producer (tasks published per second);
- drain rate: tasks per second one worker with 2 processes works through a full queue;
- enqueue-to-start latency p50/p99 of single tasks on an idle worker.
Target (issue 10): the base task's overhead at most 5 %.
"""

from __future__ import annotations

import argparse
import sys
import time
import uuid
from pathlib import Path

# Run as a script, sys.path[0] is bench/, whose modules would shadow the standard library's.
sys.path[0] = str(Path(__file__).resolve().parent.parent)

from bench.common import Environment, Worker, emit, percentile, table  # noqa: E402


def enqueue(task, key: str, count: int) -> float:
    from config.celery import app

    started = time.perf_counter()
    with app.producer_or_acquire() as producer:
        for _ in range(count):
            task.apply_async((key,), producer=producer)
    return count / (time.perf_counter() - started)


def drain(client, key: str, count: int, timeout: float = 600) -> float:
    worker = Worker(concurrency=2).start()
    try:
        started = time.perf_counter()
        deadline = started + timeout
        while int(client.get(key) or 0) < count:
            if time.perf_counter() > deadline:
                raise RuntimeError(f"drained {client.get(key)} of {count}")
            time.sleep(0.01)
        return count / (time.perf_counter() - started)
    finally:
        worker.stop()


def latency(client, task, samples: int) -> list[float]:
    worker = Worker(concurrency=2).start()
    key = f"lat-{uuid.uuid4().hex}"
    try:
        for i in range(samples):
            task.delay(key, time.time())
            deadline = time.perf_counter() + 10
            while int(client.get(key) or 0) <= i and time.perf_counter() < deadline:
                time.sleep(0.001)
        return [float(v) * 1000 for v in client.lrange(f"{key}:latency", 0, -1)]
    finally:
        worker.stop()


def run(quick: bool) -> None:
    count = 1000 if quick else 10000
    samples = 50 if quick else 300
    with Environment() as env:
        env.django()
        import redis

        from bench.tasks import noop_bare, noop_job

        client = redis.Redis.from_url(env.redis.url)
        results = {}
        for label, task in (("bare", noop_bare), ("job", noop_job)):
            key = f"{label}-{uuid.uuid4().hex}"
            results[label] = {
                "enqueue": enqueue(task, key, count),
                "drain": drain(client, key, count),
                "latency": latency(client, task, samples),
            }
        bare, job = results["bare"], results["job"]
        rows = [["measure", "bare Celery", "JobTask", "JobTask/bare"]]
        for name, unit in (("enqueue", "tasks/s"), ("drain", "tasks/s")):
            rows.append([f"{name} ({unit})", f"{bare[name]:.0f}", f"{job[name]:.0f}", f"{job[name] / bare[name]:.2f}"])
            emit("throughput", f"{name} rate", job[name], bare[name], unit, "overhead <= 5 %")
        for q in (50, 99):
            b, j = percentile(bare["latency"], q), percentile(job["latency"], q)
            rows.append([f"enqueue-to-start p{q} (ms)", f"{b:.2f}", f"{j:.2f}", f"{j / b:.2f}"])
            emit("throughput", f"latency p{q}", j, b, "ms", "", better="lower")
        print(f"Task throughput, {count} no-op tasks, one worker with 2 processes" + (" (quick)" if quick else ""))
        print(table(rows))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="a short run for CI")
    run(parser.parse_args().quick)
    return 0


if __name__ == "__main__":
    sys.exit(main())
