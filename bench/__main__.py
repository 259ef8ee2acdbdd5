"""`python -m bench [--quick] [names...]`: run every benchmark and print one summary table.

Each benchmark compares the project with its baseline in the same run (ratios, not absolute
times, are what carries over between machines). `make bench` runs the full set; `make test` runs
`--quick` once so the scripts cannot rot.
"""

from __future__ import annotations

import argparse
import json
import platform
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
BENCHMARKS = [
    "throughput",
    "beat",
    "upload",
    "dead_letters",
    "jobs_page",
    "limits",
    "thumbnails",
    "mail",
    "worker_memory",
]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="short runs (what CI affords)")
    parser.add_argument("names", nargs="*", help=f"a subset of: {', '.join(BENCHMARKS)}")
    options = parser.parse_args(argv)
    names = options.names or [n for n in BENCHMARKS if (ROOT / "bench" / f"{n}.py").exists()]
    rows: list[dict] = []
    failed: list[str] = []
    for name in names:
        print(f"\n=== {name} ===", flush=True)
        started = time.perf_counter()
        args = [sys.executable, str(ROOT / "bench" / f"{name}.py"), *(["--quick"] if options.quick else [])]
        process = subprocess.run(args, cwd=ROOT, capture_output=True, text=True)
        for line in process.stdout.splitlines():
            if line.startswith("BENCH "):
                rows.append(json.loads(line[6:]))
            else:
                print(line)
        if process.returncode != 0:
            failed.append(name)
            print(process.stderr[-3000:])
        print(f"({name}: {time.perf_counter() - started:.1f} s)")
    machine = f"{platform.node()}, {platform.machine()}, Python {platform.python_version()}"
    print(f"\nSummary ({machine})")
    header = ["bench", "metric", "ours", "baseline", "ratio", "unit", "target"]
    table = [header] + [[str(r.get(k) if r.get(k) is not None else "-") for k in header] for r in rows]
    widths = [max(len(row[i]) for row in table) for i in range(len(header))]
    for row in table:
        print("  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=True)))
    if failed:
        print(f"\nFAILED: {', '.join(failed)}")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
