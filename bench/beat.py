"""Beat at scale: thousands of interval schedules, sent on time, and what it costs beat.

    python bench/beat.py [--quick] [--counts 1000,3000,10000]

For each count N, N interval schedules (every 60 s; every 10 s with --quick) are stored with their
last runs staggered so that their next runs are spread evenly over one interval, starting a few
seconds after beat has started (it reads the schedule first). Beat then runs for that interval
plus a margin, with no worker (the messages wait in a private Redis). Measured per side:

- sends per second over the interval, and the schedules not sent within it plus 10 s;
- lag: when each schedule ran (its `last_run_at`, set as beat sends it) minus when it was due;
  p50, p99 and the maximum (a schedule not sent by the end counts with the time it had waited);
- beat's CPU over the interval, in cores (CPU seconds per second) and per send.

And a burst (`--burst-count`, 10 000 by default): as many schedules all due at the same instant.
Measured: the share sent within 10 s of due, the lag, beat's CPU over the interval the burst
recurs in (from the due instant until just before the next one: the target's measure, the one
the run-once issue's own figures use), and over the seconds it spends sending (where beat is
CPU-bound, so that figure says how much of a core it takes while it sends, not what it costs).

Sides, in the same run against the same database and Redis:
- ours:     `celery -A config beat` as shipped (`jobs.runtime.beat.LockedDatabaseScheduler`: a tick sends
            every due entry, recorded with its ledger rows in one transaction);
- baseline: django-celery-beat's own `DatabaseScheduler` with `CELERY_BEAT_SYNC_EVERY=1` (a save
            after every send), which is what the project ran before.

Target (issue 19): 10 000 schedules a minute sent on time (lag p99 under 1 s) with beat under half
a core. Target (issue 25): a burst of 10 000 all sent within 10 s of due, beat under half a core.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
from datetime import timedelta
from pathlib import Path

# Run as a script, sys.path[0] is bench/, whose modules would shadow the standard library's.
sys.path[0] = str(Path(__file__).resolve().parent.parent)

from bench.common import ROOT, Environment, emit, percentile, positive_int, stop_process, table  # noqa: E402

SIDES = {
    "ours": [],
    "baseline": ["-S", "django_celery_beat.schedulers:DatabaseScheduler"],
}
LAG_TARGET = 1.0  # seconds, p99
CPU_TARGET = 0.5  # cores
BURST_WITHIN = 10.0  # seconds: a burst's schedules all sent within this of their due time (issue 25)


def store_schedules(count: int, interval: int, first_due, *, burst: bool = False) -> list[tuple[int, float]]:
    """`count` schedules every `interval` seconds, due one after the other over the first 90 % of
    an interval from `first_due` (so that every first run comes before any second one); `burst`:
    all due at `first_due` (ten thousand tenants' "every minute", saved together)."""
    from django.db import connection
    from django_celery_beat.models import IntervalSchedule, PeriodicTask, PeriodicTasks

    # One statement: the ORM's delete sends django-celery-beat's signal per row (a savepoint and
    # an update each), which for the previous side's 10 000 schedules outlasted the lead time, so
    # the second side's burst was due before its beat started and measured nothing.
    with connection.cursor() as cursor:
        cursor.execute(f"DELETE FROM {connection.ops.quote_name(PeriodicTask._meta.db_table)}")  # noqa: S608
    every, _ = IntervalSchedule.objects.get_or_create(every=interval, period=IntervalSchedule.SECONDS)
    step = 0.0 if burst else 0.9 * interval / count  # every first run before any second one
    rows = [
        PeriodicTask(
            name=f"tenant-{i}",
            task="jobs.ping",
            interval=every,
            last_run_at=first_due + timedelta(seconds=i * step - interval),
        )
        for i in range(count)
    ]
    PeriodicTask.objects.bulk_create(rows, batch_size=2000)
    PeriodicTasks.update_changed()
    return [(i, (first_due + timedelta(seconds=i * step)).timestamp()) for i in range(count)]


def run_side(side: str, count: int, interval: int, lead: float, log_dir: Path, *, burst: bool = False) -> dict:
    import psutil
    from django.db import connection
    from django.utils import timezone
    from django_celery_beat.models import PeriodicTask

    first_due = timezone.now() + timedelta(seconds=lead)
    due = {f"tenant-{i}": at for i, at in store_schedules(count, interval, first_due, burst=burst)}
    connection.close()
    env = {**os.environ, "LOG_LEVEL": "WARNING"}
    log = (log_dir / f"beat-{side}-{count}.log").open("wb")
    args = [sys.executable, "-m", "celery", "-A", "config", "beat", "--loglevel", "WARNING", *SIDES[side]]
    if time.time() > first_due.timestamp() - 1:
        raise RuntimeError(f"the schedules were stored too late for {side} ({count}): no lead left before they are due")
    process = subprocess.Popen(args, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)
    try:
        beat = psutil.Process(process.pid)
        # CPU from the first due time on: reading the schedule at start is not the steady cost.
        while time.time() < first_due.timestamp():
            if process.poll() is not None:
                raise RuntimeError(f"beat exited: {Path(log.name).read_text(errors='replace')[-2000:]}")
            time.sleep(0.05)
        cpu_start, wall_start = sum(beat.cpu_times()[:2]), time.monotonic()
        deadline = first_due.timestamp() + interval + 10
        # A burst: beat keeps running until just before it recurs (the minute the target is
        # about); the spread cases stop once every schedule has gone out.
        until = first_due.timestamp() + interval - 0.5 if burst else deadline
        sending: tuple[float, float] | None = None  # CPU and wall time when the last one went out
        waiting = PeriodicTask.objects.filter(name__startswith="tenant-", total_run_count=0)
        while time.time() < deadline:
            time.sleep(0.5)
            if sending is None and not waiting.exists():
                sending = (sum(beat.cpu_times()[:2]) - cpu_start, time.monotonic() - wall_start)
                if not burst:
                    break
            if (sending is not None or burst) and time.time() >= until:
                break  # a burst: the same interval for both sides, whether all went out or not
        cpu = sum(beat.cpu_times()[:2]) - cpu_start
        wall = time.monotonic() - wall_start
        sending = sending or (cpu, wall)
    finally:
        stop_process(process)
        log.close()
    ran = dict(
        PeriodicTask.objects.filter(name__startswith="tenant-", total_run_count__gte=1).values_list(
            "name", "last_run_at"
        )
    )
    now = time.time()
    lags = [(ran[name].timestamp() if name in ran else now) - at for name, at in due.items()]
    sent = len(ran)
    return {
        "sent": sent,
        "missing": count - sent,
        "rate": sent / wall,
        "lag_p50": percentile(lags, 50),
        "lag_p99": percentile(lags, 99),
        "lag_max": max(lags),
        "cores": cpu / wall,
        "cores_sending": sending[0] / sending[1],
        "cpu_ms_per_send": sending[0] * 1000 / max(sent, 1),
        "within_10s": sum(lag <= BURST_WITHIN for lag in lags) / count,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="300 schedules every 10 s, ours only")
    parser.add_argument(
        "--counts",
        type=lambda text: [positive_int(part) for part in text.split(",")],
        help="comma-separated schedule counts (default 1000,3000,10000)",
    )
    parser.add_argument(
        "--burst-count", type=positive_int, help="schedules of the burst case, all due at once (default 10000)"
    )
    options = parser.parse_args(argv)
    counts = options.counts if options.counts else ([300] if options.quick else
                                                                                 [1000, 3000, 10000])  # fmt: skip
    burst_count = options.burst_count or (300 if options.quick else 10_000)
    interval, lead = (10, 5.0) if options.quick else (60, 15.0)
    sides = ["ours"] if options.quick else ["ours", "baseline"]
    results: dict[tuple[str, int], dict] = {}
    bursts: dict[str, dict] = {}
    with Environment() as environment:
        environment.django()
        for count in counts:
            for side in sides:
                results[side, count] = run_side(side, count, interval, lead, environment.tmp)
                print(f"{side} {count}: {results[side, count]}", flush=True)
        for side in sides:
            bursts[side] = run_side(side, burst_count, interval, lead, environment.tmp, burst=True)
            print(f"{side} burst {burst_count}: {bursts[side]}", flush=True)
    header = ["schedules", "side", "sent", "not sent", "sends/s", "lag p50 (s)", "lag p99 (s)", "lag max (s)",
              "beat cores", "CPU ms/send"]  # fmt: skip
    rows = [header]
    for (side, count), r in results.items():
        rows.append([str(count), side, str(r["sent"]), str(r["missing"]), f"{r['rate']:.0f}", f"{r['lag_p50']:.2f}",
                     f"{r['lag_p99']:.2f}", f"{r['lag_max']:.2f}", f"{r['cores']:.2f}",
                     f"{r['cpu_ms_per_send']:.2f}"])  # fmt: skip
    print(f"\nBeat, interval schedules every {interval} s, due times spread over one interval, "
          f"{environment.database}" + (" (quick)" if options.quick else ""))  # fmt: skip
    print(table(rows))
    rows = [["side", "sent", "within 10 s of due", "lag p50 (s)", "lag p99 (s)", "lag max (s)",
             "beat cores over the interval", "while sending", "CPU ms/send"]]  # fmt: skip
    for side, r in bursts.items():
        rows.append([side, str(r["sent"]), f"{r['within_10s']:.0%}", f"{r['lag_p50']:.2f}", f"{r['lag_p99']:.2f}",
                     f"{r['lag_max']:.2f}", f"{r['cores']:.2f}", f"{r['cores_sending']:.2f}",
                     f"{r['cpu_ms_per_send']:.2f}"])  # fmt: skip
    print(f"\nBeat, a burst: {burst_count} interval schedules every {interval} s, all due at the same instant")
    print(table(rows))
    ours, base = bursts["ours"], bursts.get("baseline")
    met = ours["within_10s"] == 1 and ours["cores"] < CPU_TARGET
    emit("beat", f"burst of {burst_count}: share sent within 10 s of due", ours["within_10s"],
         base and base["within_10s"], "share", "100 %, < 0.5 core" + ("" if met else " (missed)"))  # fmt: skip
    emit("beat", f"burst of {burst_count}: beat cores over the interval", ours["cores"], base and base["cores"],
         "cores", better="lower")  # fmt: skip
    emit("beat", f"burst of {burst_count}: beat CPU per send", ours["cpu_ms_per_send"],
         base and base["cpu_ms_per_send"], "ms", better="lower")  # fmt: skip
    for count in counts:
        ours = results["ours", count]
        base = results.get(("baseline", count))
        met = ours["lag_p99"] < LAG_TARGET and ours["cores"] < CPU_TARGET and not ours["missing"]
        target = f"p99 < {LAG_TARGET:.0f} s, < {CPU_TARGET} core" + ("" if met else " (missed)")
        emit("beat", f"lag p99, {count} schedules", ours["lag_p99"], base and base["lag_p99"], "s", target,
             better="lower")  # fmt: skip
        emit("beat", f"beat cores, {count} schedules", ours["cores"], base and base["cores"], "cores", better="lower")
    return 0


if __name__ == "__main__":
    sys.exit(main())
