"""Shared plumbing of the benchmarks: a private Redis, a scratch database, a worker, a summary line.

Every script prints its own table, and one `BENCH {json}` line per figure, which
`python -m bench` gathers into a single table.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))


def emit(bench: str, metric: str, ours: float, baseline: float | None = None, unit: str = "",
         target: str = "", better: str = "higher") -> None:  # fmt: skip
    """Prints one machine-readable figure. `ratio` is ours/baseline (>1 better when `higher`)."""
    ratio = None
    if baseline:
        ratio = ours / baseline if better == "higher" else baseline / ours if ours else None
    row = {"bench": bench, "metric": metric, "ours": round(ours, 4), "baseline": None if baseline is None
           else round(baseline, 4), "ratio": None if ratio is None else round(ratio, 3), "unit": unit,
           "target": target}  # fmt: skip
    print("BENCH " + json.dumps(row), flush=True)


class Environment:
    """A private Redis and a migrated scratch database, exported to this process and its children.

    The database is a fresh one on the PostgreSQL server `BENCH_DATABASE_URL` or `DATABASE_URL`
    names (dropped afterwards), what the project runs on; without one, SQLite in a temporary
    directory. `database` says which, for the tables."""

    def __init__(self) -> None:
        self.tmp = Path(tempfile.mkdtemp(prefix="bench-"))
        self.redis = None
        self.env: dict[str, str] = {}
        self.database = "SQLite"
        self._drop: Callable[[], None] | None = None

    def __enter__(self) -> Environment:
        from devtools.localredis import LocalRedis

        self.redis = LocalRedis().start()
        database_url = self._database()
        self.env = {
            "DJANGO_SETTINGS_MODULE": "config.settings.test",
            "REDIS_URL": self.redis.url,
            "CELERY_BROKER_URL": self.redis.url,
            "DATABASE_URL": database_url,
            "MEDIA_ROOT": str(self.tmp / "media"),
            "LOG_LEVEL": "WARNING",
            "WORKER_METRICS_PORT": "0",
        }
        os.environ.update(self.env)
        subprocess.run(
            [sys.executable, "manage.py", "migrate", "--noinput", "-v0"], cwd=ROOT, env={**os.environ}, check=True
        )
        return self

    def _database(self) -> str:
        server = os.environ.get("BENCH_DATABASE_URL") or os.environ.get("DATABASE_URL") or ""
        if not server.startswith(("postgres://", "postgresql://")):
            return f"sqlite:///{self.tmp / 'bench.sqlite3'}"
        import psycopg
        from psycopg import sql

        parts = urlsplit(server)
        name = f"bench_{os.getpid()}_{time.monotonic_ns() % 10**9}"
        admin = urlunsplit(parts._replace(path="/postgres"))
        try:
            with psycopg.connect(admin, autocommit=True, connect_timeout=5) as connection:
                connection.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
        except psycopg.Error as exc:  # no server, or a role that may not create databases
            print(f"bench: no scratch database on {parts.hostname} ({type(exc).__name__}); using SQLite")
            return f"sqlite:///{self.tmp / 'bench.sqlite3'}"

        def drop() -> None:
            with psycopg.connect(admin, autocommit=True) as connection:
                connection.execute(sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name)))

        self._drop = drop
        self.database = "PostgreSQL"
        return urlunsplit(parts._replace(path=f"/{name}"))

    def __exit__(self, *exc) -> None:
        if self.redis:
            self.redis.stop()
        if self._drop:
            self._drop()

    def django(self) -> None:
        import django

        django.setup()


class Worker:
    """`celery -A config worker` with the given queues and processes, loading bench tasks.

    `app="bench.plain_app"` runs the plain Celery baseline instead (no project, so no liveness
    file: give `start` a `ready` check). `loglevel` adds `-l LEVEL` (Celery's own logging; the
    project's worker takes its level from `LOG_LEVEL`)."""

    def __init__(self, *, queues: str = "normal", concurrency: int = 2, extra_env: dict | None = None,
                 extra_args: list[str] | None = None, app: str = "config",
                 loglevel: str | None = None) -> None:  # fmt: skip
        include = ["-I", "bench.tasks"] if app == "config" else []
        self.args = [sys.executable, "-m", "celery", "-A", app, "worker", "-Q", queues, "-c", str(concurrency),
                     "--without-gossip", "--without-mingle", "--without-heartbeat", *include,
                     "-n", f"bench-{os.getpid()}-{time.monotonic_ns()}@%h", *(["-l", loglevel] if loglevel else []),
                     *(extra_args or [])]  # fmt: skip
        self.live = Path(tempfile.mkdtemp(prefix="bench-live-"))
        self.env = {**os.environ, "LIVENESS_DIR": str(self.live), "JOBS_LIVENESS_INTERVAL": "0.2", **(extra_env or {})}
        self.log = tempfile.NamedTemporaryFile(prefix="bench-worker-", suffix=".log", delete=False)  # noqa: SIM115
        self.process: subprocess.Popen | None = None

    def start(self, timeout: float = 60, ready: Callable[[], bool] | None = None) -> Worker:
        """Starts the worker and returns once it consumes: its liveness file exists, or `ready()`
        (e.g. "a task sent to it has run") is true."""
        self.process = subprocess.Popen(self.args, cwd=ROOT, env=self.env, stdout=self.log, stderr=subprocess.STDOUT)
        ready = ready or (self.live / "worker.alive").exists  # written once the consumer consumes
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if ready():
                return self
            if self.process.poll() is not None:
                raise RuntimeError(Path(self.log.name).read_text(errors="replace")[-2000:])
            time.sleep(0.005)
        raise RuntimeError("worker not ready")

    def log_bytes(self) -> int:
        """Bytes the worker has written to its stdout and stderr so far."""
        return os.path.getsize(self.log.name)

    def pss_mb(self) -> float:
        """Proportional memory of the worker and its pool processes, in MB: pages the forked
        processes share are split between them, so the sum is what the worker really occupies
        (a sum of RSS counts every shared page once per process)."""
        import psutil

        parent = psutil.Process(self.process.pid)
        return sum(p.memory_full_info().pss for p in [parent, *parent.children(recursive=True)]) / 2**20

    def stop(self) -> None:
        stop_process(self.process, timeout=60)
        os.unlink(self.log.name)
        shutil.rmtree(self.live, ignore_errors=True)


def stop_process(process: subprocess.Popen | None, timeout: float = 30) -> None:
    """SIGTERM, then SIGKILL if it has not exited within `timeout` seconds."""
    if process and process.poll() is None:
        process.terminate()
        try:
            process.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            process.kill()


def positive_int(text: str) -> int:
    """argparse type: a whole number of at least 1 (a count of clients, requests, images)."""
    import argparse

    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a whole number: {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, not {value}")
    return value


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    if not ordered:
        return float("nan")
    index = min(len(ordered) - 1, max(0, round(q / 100 * (len(ordered) - 1))))
    return ordered[index]


def table(rows: list[list[str]]) -> str:
    widths = [max(len(str(row[i])) for row in rows) for i in range(len(rows[0]))]
    return "\n".join("  ".join(str(c).ljust(w) for c, w in zip(row, widths, strict=True)) for row in rows)
