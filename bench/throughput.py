"""Task throughput, latency and worker memory: JobTask against plain Celery, side by side.

    python bench/throughput.py [--quick] [--tasks N] [--rounds N] [--split]

Three sides run the same no-op body (`bench.noop.record`: one Redis INCR) on the same Redis with
the same worker flags (`-Q normal -c 2`, no gossip, mingle or heartbeat), all logging at INFO,
the production default, so Celery's per-task "received" and "succeeded" lines are paid for:

- plain:  `celery -A bench.plain_app worker`, a Celery app with the project's reliability settings
          and nothing else (no Django, no signal handlers, no task events, Celery's text logs);
- bare:   a bare `celery.Task` in the project's worker (`celery -A config worker`): pays for
          everything worker-wide (Django, the project's Celery settings: task events, time
          limits, pool recycling; request-id and metrics signal handlers, the liveness step,
          JSON log lines through `jobs.logging`) but not for JobTask;
- job:    the project's JobTask (retry policy, dead letters, crash-loop check, `JobRequest`).

Measured per side, in rounds whose order rotates so that drift on a shared machine hits every
side alike:
- enqueue rate from one producer process (`python -m bench.noop SIDE enqueue`), no worker running;
- drain rate: a fresh worker with 2 processes works through the full queue; timed from the moment
  the first 2 % have run (start-up excluded, the same way for every side) to the last one;
- enqueue-to-start latency p50/p99 of single tasks sent one at a time to the now idle worker;
- memory of the worker after the drain (PSS of the main and pool processes: shared pages counted
  once), and the log bytes it wrote per task.
`--split` adds plain Celery and JobTask at WARNING (no per-task log lines: the cost of logging),
and plain Celery with the Celery settings the project turns on (task events, time limits, pool
recycling: their cost, apart from the project's own code).

Target (issue 10): JobTask's overhead over plain Celery at most 5 % (overhead: the extra time per
task, plain rate / JobTask rate - 1). Above it the line says so; the run does not fail.
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

TARGET = "overhead <= 5 %"
TOLERANCE = 0.05
PROJECT_INFO = {"LOG_LEVEL": "INFO", "LOG_FORMAT": "json"}


@dataclass
class Side:
    label: str
    producer: str  # which task and app publish: a key of bench.noop.TASK_NAMES
    app: str
    env: dict = field(default_factory=dict)
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
        "bare": Side("bare task, project worker", "bare", "config", PROJECT_INFO),
        "job": Side("JobTask", "job", "config", PROJECT_INFO),
    }
    if split:
        found["plain_warning"] = Side("plain Celery, WARNING", "plain", "bench.plain_app", loglevel="WARNING")
        found["plain_settings"] = Side("plain + project's Celery settings", "plain", "bench.plain_app",
                                       {"BENCH_PLAIN_PROJECT_SETTINGS": "1"}, loglevel="INFO")  # fmt: skip
        found["job_warning"] = Side("JobTask, WARNING", "job", "config", {**PROJECT_INFO, "LOG_LEVEL": "WARNING"})
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
    worker = Worker(app=side.app, concurrency=2, extra_env=side.env, loglevel=side.loglevel)
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
    (no JSON line from `jobs.logging`) in the plain worker."""
    info = (side.loglevel or side.env.get("LOG_LEVEL")) == "INFO"
    if (info and per_task < 50) or (not info and per_task > 50):
        raise RuntimeError(f"{side.label}: {per_task:.0f} log bytes per task, at {'INFO' if info else 'WARNING'}")
    if side.app != "config" and '"logger": ' in Path(worker.log.name).read_text(errors="replace"):
        raise RuntimeError(f"{side.label}: the project's JSON logging is active in the plain worker")


def ratio_cell(ours: float, baseline: float, *, rate: bool) -> str:
    """`ours/baseline`, and for a rate the overhead against the target, marked when above it."""
    ratio = ours / baseline
    if not rate:
        return f"{ratio:.2f}"
    overhead = baseline / ours - 1
    return f"{ratio:.2f} (overhead {overhead * 100:.0f} %{', above target' if overhead > TOLERANCE else ''})"


def report(found: dict[str, Side], *, count: int, rounds: int, quick: bool) -> None:
    plain, bare, job = found["plain"], found["bare"], found["job"]
    columns = list(found.values())

    def row(measure: str, get, digits: int = 0, *, rate: bool = False, ratios: bool = True) -> list[str]:
        cells = [f"{get(s):.{digits}f}" for s in columns]
        if not ratios:
            return [measure, *cells, "", ""]
        return [measure, *cells, *(ratio_cell(get(job), get(base), rate=rate) for base in (plain, bare))]

    rows = [
        ["measure", *(s.label for s in columns), "JobTask/plain", "JobTask/bare"],
        row("enqueue (tasks/s)", lambda s: s.enqueue_rate, rate=True),
        row("drain (tasks/s)", lambda s: s.drain_rate, rate=True),
        row("enqueue-to-start p50 (ms)", lambda s: percentile(s.latency, 50), 2),
        row("enqueue-to-start p99 (ms)", lambda s: percentile(s.latency, 99), 2),
        row("worker memory after drain (MB, PSS)", lambda s: s.memory_mb),
        row("log written per task (bytes)", lambda s: s.log_bytes / s.drained, ratios=False),
    ]
    print(f"Task throughput, {rounds} x {count} no-op tasks per side, one worker with 2 processes, logs at INFO"
          + (" (quick)" if quick else ""))  # fmt: skip
    print(table(rows))
    rounds_text = "; ".join(f"{s.label} " + " ".join(f"{r:.0f}" for r in s.drain_rounds) for s in columns)
    print(f"drain tasks/s per round: {rounds_text}")

    for name, ours, base in (("enqueue rate", job.enqueue_rate, plain.enqueue_rate),
                             ("drain rate", job.drain_rate, plain.drain_rate)):  # fmt: skip
        above = base / ours - 1 > TOLERANCE
        emit("throughput", name, ours, base, "tasks/s", TARGET + (" (above target)" if above else ""))
    emit("throughput", "drain rate vs bare task in project worker", job.drain_rate, bare.drain_rate, "tasks/s")
    for q in (50, 99):
        emit("throughput", f"latency p{q}", percentile(job.latency, q), percentile(plain.latency, q), "ms", "",
             better="lower")  # fmt: skip
    emit("throughput", "worker memory (PSS) after drain", job.memory_mb, plain.memory_mb, "MB", "", better="lower")


def run(*, count: int, samples: int, rounds: int, split: bool, quick: bool) -> dict[str, Side]:
    found = sides(split)
    order = list(found.values())
    with Environment():
        for round_ in range(rounds):
            for side in order[round_ % len(order) :] + order[: round_ % len(order)]:
                measure(side, count, samples)
        report(found, count=count, rounds=rounds, quick=quick)
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
