"""What a limit per key costs a job's start, beside the same start without a limit, in one run;
and what a unique enqueue costs beside a plain one.

    BENCH_DATABASE_URL=postgres://... python bench/limits.py [--quick] [--jobs N]

A worker's start and end of a job, as its pool process makes them (`jobs.runtime.store`), for N
jobs each (2 100; 300 with --quick), in interleaved rounds (the median of each): without a limit;
under a concurrency limit (one key per customer, room for all); under a rate limit (one key, room
for all). Per job: the CPU time of the worker's thread (`time.thread_time`), the wall time, and
the statements sent. Enqueue: a plain `enqueue` beside one with a `unique_key`, statements per
job. Targets (issue "Unique jobs and limits per key"): a limit check costs at most 1 ms of CPU per
job; a unique enqueue at most one extra statement.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
import uuid
from pathlib import Path

sys.path[0] = str(Path(__file__).resolve().parent.parent)

from bench.common import Environment, emit, table  # noqa: E402


class Statements:
    """Counts the statements this process sends (`connection.execute_wrapper`)."""

    def __init__(self) -> None:
        self.count = 0

    def __call__(self, execute, sql, params, many, context):  # type: ignore[no-untyped-def]
        self.count += 1
        return execute(sql, params, many, context)


def _rows(count: int, tag: str) -> list[str]:
    from jobs.models import OutboxMessage
    from jobs.runtime.store import jobs_add

    ids = [f"{tag}-{n}-{uuid.uuid4().hex[:8]}" for n in range(count)]
    jobs_add(
        [
            OutboxMessage(task_name="bench.limited", task_id=task_id, args=[n], options={"queue": "normal"})
            for n, task_id in enumerate(ids)
        ]
    )
    return ids


def starts(count: int, keys_of) -> tuple[float, float, float]:  # type: ignore[no-untyped-def]
    """(CPU µs, wall µs, statements) per job for a start and an end of `count` jobs."""
    from django.db import connection

    from jobs.runtime import store
    from jobs.runtime.limits import job_start_limited, run_ended

    ids = _rows(count, "bench")
    counter = Statements()
    with connection.execute_wrapper(counter):
        cpu, wall = time.thread_time(), time.perf_counter()
        for n, task_id in enumerate(ids):
            keys = keys_of(n)
            if keys:
                run = job_start_limited(task_id, retries=0, hostname="bench", keys=keys)
            else:
                run = store.job_start(task_id, retries=0, hostname="bench")
            if not isinstance(run, store.Run):
                raise RuntimeError(f"{task_id} did not start: {run}")
            store.job_finish(task_id, owner=run.owner)
            store.run_ended(task_id, run.owner)
            run_ended(run)
        cpu, wall = time.thread_time() - cpu, time.perf_counter() - wall
    return cpu / count * 1e6, wall / count * 1e6, counter.count / count


def enqueues(count: int, unique: bool) -> float:
    """Statements per job for `count` enqueues, each in a transaction of its own."""
    from django.db import connection, transaction

    from jobs.publish import enqueue

    counter = Statements()
    with connection.execute_wrapper(counter):
        for n in range(count):
            with transaction.atomic():
                extra = {"unique_key": f"bench:{uuid.uuid4().hex}"} if unique else {}
                enqueue("jobs.ping", args=[n], countdown=3600, **extra)  # waits in the table: no broker needed
    return counter.count / count


def run(quick: bool, jobs: int | None) -> None:
    count = jobs or (300 if quick else 2_100)
    with Environment() as env:
        env.django()
        from jobs.limits import LimitKey

        def plain(n: int) -> list[LimitKey]:
            return []

        def concurrency(n: int) -> list[LimitKey]:
            return [LimitKey("bench-sync", f"customer-{n % 50}", "concurrency", 1_000_000, 1.0)]

        def rate(n: int) -> list[LimitKey]:
            return [LimitKey("bench-api", "", "rate", 1_000_000, 1.0)]

        starts(50, plain)  # warm-up: connections, statement caches
        starts(50, concurrency)
        variants = {"no limit": plain, "concurrency limit": concurrency, "rate limit": rate}
        rounds = 3 if quick else 7
        # Interleaved rounds, the median of each: a shared machine's drift hits every variant alike.
        figures: dict[str, list[tuple[float, float, float]]] = {name: [] for name in variants}
        for _ in range(rounds):
            for name, keys_of in variants.items():
                figures[name].append(starts(max(count // rounds, 20), keys_of))
        median = {
            name: tuple(statistics.median(values[i] for values in runs) for i in range(3))
            for name, runs in figures.items()
        }
        base_cpu, base_wall, base_statements = median["no limit"]
        lines = [["start and end of a job", "CPU µs/job", "wall µs/job", "statements/job", "limit's own CPU"]]
        lines.append(["no limit", f"{base_cpu:.0f}", f"{base_wall:.0f}", f"{base_statements:.1f}", "-"])
        for name in ("concurrency limit", "rate limit"):
            cpu, wall, statements = median[name]
            lines.append([name, f"{cpu:.0f}", f"{wall:.0f}", f"{statements:.1f}", f"{(cpu - base_cpu) / 1000:.2f} ms"])
            emit("limits", f"{name}: CPU per job, start and end", cpu, base_cpu, "µs", "+≤ 1000 µs", better="lower")
            emit("limits", f"{name}: wall per job, start and end", wall, base_wall, "µs", "", better="lower")
        print(f"Limits per key, {count:,} jobs each ({env.database})")
        print(table(lines))

        plain_statements = enqueues(count // 3, unique=False)
        unique_statements = enqueues(count // 3, unique=True)
        print(
            table(
                [
                    ["enqueue", "statements/job"],
                    ["plain", f"{plain_statements:.1f}"],
                    ["unique key (free)", f"{unique_statements:.1f}"],
                ]
            )
        )
        emit("limits", "unique enqueue: statements per job", unique_statements, plain_statements, "", "+≤ 1", "lower")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--jobs", type=int, default=None, help="jobs per variant")
    options = parser.parse_args()
    run(options.quick, options.jobs)
    return 0


if __name__ == "__main__":
    sys.exit(main())
