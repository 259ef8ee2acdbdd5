"""Task throughput and latency: the project's worker as shipped against stock Celery, side by side.

    python bench/throughput.py [--quick] [--tasks N] [--rounds N] [--split]

Every side runs the same no-op body (`bench.noop.record`: one Redis INCR) on the same Redis with
the same worker flags (`-Q normal -c 2`, no gossip, mingle or heartbeat), all logging at INFO,
the production default, so Celery's per-task "received" and "succeeded" lines are paid for:

- plain:    `celery -A bench.plain_app worker`, a Celery app with the project's delivery settings
            and nothing else (no Django, no signal handlers, no task events, Celery's text logs);
- stock -E: the same with task events on (`-E`), what a Flower user runs: the baseline of the
            target;
- shipped:  the project's worker (`celery -A config worker`) running `bench.noop_shipped`, a
            JobTask declared with nothing but its name: every default on (task history in the
            database, task events for Flower, metrics, dead letters, request ids, JSON logs,
            time limits, pool recycling);
- ledger:   the same task enqueued into the job table (`jobs.publish.enqueue`, one transaction
            per job): a row per job, its start lease taken before the body, the row ended after.

Measured per side, in rounds whose order rotates so that drift on a shared machine hits every
side alike:
- enqueue rate from one producer process (`python -m bench.noop SIDE enqueue`), no worker running;
- drain rate: a fresh worker with 2 processes works through the full queue; timed from the moment
  the first 2 % have run (start-up excluded, the same way for every side) to the last one;
- enqueue-to-start latency p50/p99 of single tasks sent one at a time to the now idle worker;
- memory of the worker after the drain (PSS of the main and pool processes: shared pages counted
  once), and the log bytes it wrote per task.
`--split` adds sides that tell the costs apart: a bare `celery.Task` and a JobTask with
`ignore_result=True` in the project's worker, plain Celery at WARNING and with the Celery settings
the project turns on (task events, time limits, pool recycling).

Target (issue 19): the shipped worker drains at least 0.9x as many tasks per second as stock
Celery with events, and its enqueue-to-start p50 is at most 1.5x stock's. Missing it is said on
the line; the run does not fail.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path

# Run as a script, sys.path[0] is bench/, whose modules would shadow the standard library's.
sys.path[0] = str(Path(__file__).resolve().parent.parent)

from bench import noop  # noqa: E402
from bench.common import ROOT, Environment, Worker, emit, percentile, positive_int, table  # noqa: E402

DRAIN_TARGET = 0.9  # shipped drain rate / stock -E drain rate, at least
LEDGER_DRAIN_TARGET = 0.8  # ledger jobs (enqueue(), the start lease) / stock -E, at least (issue 25)
LATENCY_TARGET = 1.5  # shipped p50 / stock -E p50, at most
PROJECT_INFO = {"LOG_LEVEL": "INFO", "LOG_FORMAT": "json"}


@dataclass
class Side:
    label: str
    producer: str  # which task and app publish: a key of bench.noop.TASK_NAMES
    app: str
    env: dict = field(default_factory=dict)
    args: list[str] = field(default_factory=list)
    loglevel: str | None = None
    enqueue: list[float] = field(default_factory=list)
    drained: int = 0
    drain_seconds: float = 0.0
    drain_rounds: list[float] = field(default_factory=list)
    latency: list[float] = field(default_factory=list)
    memory: list[float] = field(default_factory=list)
    log_bytes: int = 0

    @property
    def enqueue_rate(self) -> float:
        return sum(self.enqueue) / len(self.enqueue)

    @property
    def drain_rate(self) -> float:
        return self.drained / self.drain_seconds

    @property
    def memory_mb(self) -> float:
        return sum(self.memory) / len(self.memory)


def sides(split: bool) -> dict[str, Side]:
    found = {
        "plain": Side("plain Celery", "plain", "bench.plain_app", loglevel="INFO"),
        "stock": Side("stock Celery -E", "plain", "bench.plain_app", loglevel="INFO", args=["-E"]),
        "shipped": Side("project, as shipped", "shipped", "config", PROJECT_INFO),
        "ledger": Side("ledger jobs (enqueue, lease)", "ledger", "config", PROJECT_INFO),
    }
    if split:
        found["bare"] = Side("bare task, project worker", "bare", "config", PROJECT_INFO)
        found["job"] = Side("JobTask, ignore_result", "job", "config", PROJECT_INFO)
        found["plain_warning"] = Side("plain Celery, WARNING", "plain", "bench.plain_app", loglevel="WARNING")
        found["plain_settings"] = Side(
            "plain + project's Celery settings",
            "plain",
            "bench.plain_app",
            {"BENCH_PLAIN_PROJECT_SETTINGS": "1"},
            loglevel="INFO",
        )
        found["shipped_warning"] = Side(
            "shipped, WARNING", "shipped", "config", {**PROJECT_INFO, "LOG_LEVEL": "WARNING"}
        )
    return found


def produce(side: Side, mode: str, key: str, count: int) -> str:
    """Runs the producer of `side` in a process of its own; returns what it printed."""
    args = [sys.executable, "-m", "bench.noop", side.producer, mode, key, str(count)]
    process = subprocess.run(args, cwd=ROOT, env={**os.environ, **side.env}, capture_output=True, text=True,
                             check=False)  # fmt: skip
    if process.returncode != 0:
        raise RuntimeError(f"producer {side.producer} {mode} failed:\n{process.stderr[-2000:]}")
    return process.stdout


def measure(side: Side, count: int, samples: int) -> None:
    """One round of `side`: enqueue `count`, drain them with a fresh worker, then latency."""
    key = f"{side.producer}-{uuid.uuid4().hex}"
    side.enqueue.append(json.loads(produce(side, "enqueue", key, count))["rate"])
    warm = max(20, count // 50)
    env = dict(side.env)
    if side.app == "config":  # the project's worker serves its metrics, as it does in production
        from devtools.localredis import free_port

        env["WORKER_METRICS_PORT"] = str(free_port())
    worker = Worker(app=side.app, concurrency=2, extra_env=env, loglevel=side.loglevel, extra_args=side.args)
    try:
        worker.start(ready=lambda: noop.done(key) >= warm)
        started, first, log_start = time.perf_counter(), noop.done(key), worker.log_bytes()
        noop.wait_done(key, count, timeout=600, poll=0.01)
        elapsed = time.perf_counter() - started
        side.drained += count - first
        side.drain_seconds += elapsed
        side.drain_rounds.append((count - first) / elapsed)
        logged = worker.log_bytes() - log_start
        side.log_bytes += logged
        check_log(side, worker, logged / (count - first))
        side.memory.append(worker.pss_mb())
        latency_key = f"lat-{key}"
        produce(side, "latency", latency_key, samples)
        side.latency += noop.latencies_ms(latency_key)
    finally:
        worker.stop()


def check_log(side: Side, worker: Worker, per_task: float) -> None:
    """The sides are what they claim: per-task log lines at INFO (none at WARNING), and no project
    (no JSON line from `config.logging`) in the plain worker."""
    info = (side.loglevel or side.env.get("LOG_LEVEL")) == "INFO"
    if (info and per_task < 50) or (not info and per_task > 50):
        raise RuntimeError(f"{side.label}: {per_task:.0f} log bytes per task, at {'INFO' if info else 'WARNING'}")
    if side.app != "config" and '"logger": ' in Path(worker.log.name).read_text(errors="replace"):
        raise RuntimeError(f"{side.label}: the project's JSON logging is active in the plain worker")


def report(found: dict[str, Side], *, count: int, rounds: int, quick: bool, database: str) -> None:
    plain, stock, shipped = found["plain"], found["stock"], found["shipped"]
    columns = list(found.values())

    def row(measure: str, get, digits: int = 0, *, ratios: bool = True) -> list[str]:
        cells = [f"{get(s):.{digits}f}" for s in columns]
        if not ratios:
            return [measure, *cells, "", ""]
        return [measure, *cells, *(f"{get(shipped) / get(base):.2f}" for base in (stock, plain))]

    rows = [
        ["measure", *(s.label for s in columns), "shipped/stock -E", "shipped/plain"],
        row("enqueue (tasks/s)", lambda s: s.enqueue_rate),
        row("drain (tasks/s)", lambda s: s.drain_rate),
        row("enqueue-to-start p50 (ms)", lambda s: percentile(s.latency, 50), 2),
        row("enqueue-to-start p99 (ms)", lambda s: percentile(s.latency, 99), 2),
        row("worker memory after drain (MB, PSS)", lambda s: s.memory_mb),
        row("log written per task (bytes)", lambda s: s.log_bytes / s.drained, ratios=False),
    ]
    print(
        f"Task throughput, {rounds} x {count} no-op tasks per side, one worker with 2 processes, logs at INFO, "
        f"{database}" + (" (quick)" if quick else "")
    )
    print(table(rows))
    rounds_text = "; ".join(f"{s.label} " + " ".join(f"{r:.0f}" for r in s.drain_rounds) for s in columns)
    print(f"drain tasks/s per round: {rounds_text}")

    drain = shipped.drain_rate / stock.drain_rate
    p50 = percentile(shipped.latency, 50) / percentile(stock.latency, 50)
    print(
        f"target: drain >= {DRAIN_TARGET}x stock -E: {drain:.2f}x ({'met' if drain >= DRAIN_TARGET else 'MISSED'}); "
        f"p50 <= {LATENCY_TARGET}x stock -E: {p50:.2f}x ({'met' if p50 <= LATENCY_TARGET else 'MISSED'})"
    )
    ledger = found["ledger"]
    ledger_drain = ledger.drain_rate / stock.drain_rate
    met = "met" if ledger_drain >= LEDGER_DRAIN_TARGET else "MISSED"
    print(f"target: ledger jobs drain >= {LEDGER_DRAIN_TARGET}x stock -E: {ledger_drain:.2f}x ({met})")
    emit("throughput", "drain rate, ledger jobs vs stock Celery -E", ledger.drain_rate, stock.drain_rate, "tasks/s",
         f">= {LEDGER_DRAIN_TARGET}x stock -E" + ("" if met == "met" else " (missed)"))  # fmt: skip
    drain_target = f">= {DRAIN_TARGET}x stock -E" + ("" if drain >= DRAIN_TARGET else " (missed)")
    emit("throughput", "drain rate, shipped vs stock Celery -E", shipped.drain_rate, stock.drain_rate, "tasks/s",
         drain_target)  # fmt: skip
    latency_target = f"<= {LATENCY_TARGET}x stock -E" + ("" if p50 <= LATENCY_TARGET else " (missed)")
    emit("throughput", "latency p50, shipped vs stock Celery -E", percentile(shipped.latency, 50),
         percentile(stock.latency, 50), "ms", latency_target, better="lower")  # fmt: skip
    emit("throughput", "latency p99, shipped vs stock Celery -E", percentile(shipped.latency, 99),
         percentile(stock.latency, 99), "ms", better="lower")  # fmt: skip
    emit("throughput", "drain rate, shipped vs plain Celery", shipped.drain_rate, plain.drain_rate, "tasks/s")
    emit("throughput", "enqueue rate, shipped vs stock Celery", shipped.enqueue_rate, stock.enqueue_rate, "tasks/s")
    emit("throughput", "worker memory (PSS) after drain", shipped.memory_mb, stock.memory_mb, "MB", better="lower")


def run(*, count: int, samples: int, rounds: int, split: bool, quick: bool) -> dict[str, Side]:
    found = sides(split)
    order = list(found.values())
    with Environment() as environment:
        for round_ in range(rounds):
            for side in order[round_ % len(order) :] + order[: round_ % len(order)]:
                measure(side, count, samples)
        report(found, count=count, rounds=rounds, quick=quick, database=environment.database)
    return found


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="a short run for CI")
    parser.add_argument("--tasks", type=positive_int, help="tasks per side and round (default 5000, quick 1000)")
    parser.add_argument(
        "--rounds", type=positive_int, help="rounds, the order of the sides rotating (default 3, quick 1)"
    )
    parser.add_argument("--split", action="store_true", help="also: WARNING sides, plain + project's Celery settings")
    options = parser.parse_args(argv)
    if options.tasks is not None and options.tasks < 100:
        parser.error("--tasks: at least 100 (the first 2 %, at least 20, run before the drain is timed)")
    run(count=options.tasks or (1000 if options.quick else 5000), samples=50 if options.quick else 100,
        rounds=options.rounds or (1 if options.quick else 3), split=options.split, quick=options.quick)  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
