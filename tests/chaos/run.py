"""The kill-chaos run: many jobs through real workers while their processes are SIGKILLed.

    .venv/bin/python -m tests.chaos.run --jobs 20000 --kills 36 --worker-kills 4

It makes everything it needs and removes it at the end (also on Ctrl-C, SIGTERM or a failure): a
PostgreSQL database of its own (migrated with `manage.py migrate`), a broker Redis and a recorder
Redis on free ports, and two workers (`celery -A config worker -Q high,normal,low -c 2`) with a
short start lease and a fast sweeper, but the visibility timeout as shipped (3600 s: nothing may
depend on Redis giving a message back). A producer enqueues the jobs (`jobs.publish.enqueue`, in
transactions of a batch each), at the pace the workers drain them but once in a burst that grows
a backlog. As the jobs get done it injects its faults, spread over the run:

- SIGKILL of a pool process running a job (`--kills` in all, whole workers included);
- SIGKILL of a whole worker (its process group: the main process and its pool), then a new one;
- the broker Redis stopped and started again, empty, on the same port (once); with
  `--broker rabbitmq` (a vhost of its own on the local node, the site's Redis still a private
  one) the vhost deleted and made again, which drops every message and closes every connection;
- the database refusing every connection for `--refuse-seconds` (once): `ALTER DATABASE ...
  ALLOW_CONNECTIONS false` and `pg_terminate_backend` of its sessions, then back.

Every start and end of a job's body is written to the recorder (tests/chaos/tasks.py); a trigger
on the job table records when each job's end was written (its row deleted) and by which process
(the pid in the lease owner); every process death the harness sees is noted (its own kills, and
pool processes a worker ended itself, as Celery does to running tasks when the broker connection
drops). At the end it waits for every job (at most `--settle` seconds after the last fault), then
prints the table: jobs, kills, lost (never done), started twice without a kill (a start no kill or
process death explains: a start in pid P is killed when P died after it and before the job's end
was written by it), re-runs per kill, slowest reclaim. The exit status is 1 when a job was lost
or a start is unexplained, 2 when the run could not be made; the worker logs are then kept (the
path is printed).
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import json
import os
import random
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import psutil
import redis

from devtools.localrabbitmq import RABBITMQ_URL, RabbitVhost, rabbitmq_answers
from devtools.localredis import free_port, redis_server_binary
from tests.chaos import keys

BASE_DIR = Path(__file__).resolve().parents[2]
SETTINGS = "tests.chaos.settings"
QUEUES = ("high", "normal", "low")
DEFAULT_POSTGRES = "postgres://postgres@127.0.0.1:5432/postgres"
END_TABLE = "chaos_job_end"
END_TRIGGER = """
CREATE TABLE chaos_job_end (task_id text, lease_owner text, at timestamptz NOT NULL DEFAULT clock_timestamp());
CREATE FUNCTION chaos_job_end() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    INSERT INTO chaos_job_end (task_id, lease_owner) VALUES (OLD.task_id, OLD.lease_owner);
    RETURN OLD;
END $$;
CREATE TRIGGER chaos_job_end AFTER DELETE ON jobs_outboxmessage FOR EACH ROW EXECUTE FUNCTION chaos_job_end();
"""
#: Log events of `jobs` counted in the report (the worker logs are JSON lines).
EVENTS = (
    "job.copy_skipped",
    "ledger.lease_lapsed",
    "ledger.republishing",
    "store.write_kept",
    "store.kept_write_done",
    "store.finish_not_owned",
    "job.lease_unavailable",
)


def code_version() -> str:
    """The commit the processes run, and whether `jobs` or `config` differ from it."""
    try:
        head = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], cwd=BASE_DIR, capture_output=True, text=True, check=True
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--", "jobs", "config"], cwd=BASE_DIR, capture_output=True, text=True
        ).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown (no git)"
    return f"{head} with uncommitted changes in jobs/ or config/" if dirty else head


def say(text: str) -> None:
    print(text, flush=True)  # noqa: T201 - the harness reports on stdout


# --- processes that die with the harness ----------------------------------------------------------

try:
    _prctl = ctypes.CDLL(None, use_errno=True).prctl
except (OSError, AttributeError):  # pragma: no cover - not Linux
    _prctl = None


def _die_with_parent() -> None:
    """In a child before exec: SIGKILL when the harness's main thread ends, however it ends
    (every process is started from the main thread)."""
    if _prctl is not None:
        _prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG


def spawn(args: list[str], *, env: dict[str, str] | None = None, log: Path | None = None) -> subprocess.Popen:
    """A child in a process group of its own (Ctrl-C reaches the harness only, which stops it)."""
    out = log.open("ab") if log else subprocess.DEVNULL
    try:
        return subprocess.Popen(
            args,
            cwd=BASE_DIR,
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
            preexec_fn=_die_with_parent,  # started from the main thread only
        )
    finally:
        if log:
            out.close()


def stop_group(process: subprocess.Popen | None, *, grace: float = 10.0) -> None:
    """SIGTERM, then SIGKILL to the child's whole process group."""
    if process is None:
        return
    if process.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            process.send_signal(signal.SIGTERM)
        with contextlib.suppress(subprocess.TimeoutExpired):
            process.wait(timeout=grace)
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(process.pid, signal.SIGKILL)
    with contextlib.suppress(subprocess.TimeoutExpired):
        process.wait(timeout=5)


def children_of(pid: int) -> list[int]:
    """The child processes of `pid`: from /proc (cheap enough to ask every 50 ms), else psutil."""
    found: list[int] = []
    try:
        for thread in os.listdir(f"/proc/{pid}/task"):
            with open(f"/proc/{pid}/task/{thread}/children") as listing:
                found.extend(int(child) for child in listing.read().split())
    except FileNotFoundError:
        if not os.path.exists(f"/proc/{pid}"):
            return []
        try:
            return [child.pid for child in psutil.Process(pid).children()]
        except psutil.Error:
            return []
    except (OSError, ValueError):
        return []
    return found


# --- Redis ------------------------------------------------------------------------------------


class RedisServer:
    """A `redis-server` on a free port that keeps nothing on disk."""

    def __init__(self, name: str, directory: Path, port: int | None = None) -> None:
        self.name = name
        self.port = port or free_port()
        self.dir = directory / f"redis-{name}"
        self.dir.mkdir(parents=True, exist_ok=True)
        self.process: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def client(self, timeout: float = 5.0) -> redis.Redis:
        return redis.Redis.from_url(self.url, socket_timeout=timeout, socket_connect_timeout=timeout)

    def start(self, timeout: float = 10.0) -> RedisServer:
        self.dir.mkdir(parents=True, exist_ok=True)  # its own directory, even if something cleaned /tmp
        args = [redis_server_binary(), "--port", str(self.port), "--bind", "127.0.0.1", "--save", ""]
        args += ["--appendonly", "no", "--dir", str(self.dir), "--loglevel", "warning"]
        self.process = spawn(args, log=self.dir / "redis.log")
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"redis-server ({self.name}) exited at start on port {self.port}")
            with contextlib.suppress(redis.RedisError, OSError):
                if self.client(0.5).info("server").get("process_id") == self.process.pid:
                    return self
            time.sleep(0.05)
        raise RuntimeError(f"redis-server ({self.name}) did not answer on port {self.port}")

    def stop(self) -> None:
        stop_group(self.process, grace=5)
        self.process = None

    def restart_empty(self) -> None:
        """Stopped, and a new server on the same port: everything it held is gone."""
        self.stop()
        for attempt in range(20):
            try:
                self.start()
                return
            except RuntimeError:
                if attempt == 19:
                    raise
                time.sleep(0.2)


# --- RabbitMQ ---------------------------------------------------------------------------------

# --- PostgreSQL -------------------------------------------------------------------------------


def postgres_admin_url() -> str:
    """Where the harness creates its database: CHAOS_POSTGRES_URL, else the server of a
    PostgreSQL DATABASE_URL, else the local one."""
    if os.environ.get("CHAOS_POSTGRES_URL"):
        return os.environ["CHAOS_POSTGRES_URL"]
    url = os.environ.get("DATABASE_URL", "")
    if urlsplit(url).scheme in {"postgres", "postgresql", "pgsql"}:
        return urlunsplit(urlsplit(url)._replace(path="/postgres", query=""))
    return DEFAULT_POSTGRES


def _conninfo(url: str) -> str:
    parts = urlsplit(url)
    scheme = "postgresql" if parts.scheme in {"postgres", "pgsql"} else parts.scheme
    return urlunsplit(parts._replace(scheme=scheme))


def postgres_answers(url: str | None = None, timeout: float = 3.0) -> bool:
    import psycopg

    try:
        with psycopg.connect(_conninfo(url or postgres_admin_url()), connect_timeout=timeout, autocommit=True) as conn:
            conn.execute("SELECT 1")
        return True
    except psycopg.Error:
        return False


class Database:
    """The run's own database on the PostgreSQL server, and the refusal fault."""

    def __init__(self, admin_url: str) -> None:
        self.admin_url = admin_url
        self.name = f"chaos_{os.getpid()}_{uuid.uuid4().hex[:6]}"
        self.created = False

    @property
    def url(self) -> str:
        return urlunsplit(urlsplit(self.admin_url)._replace(path=f"/{self.name}"))

    def _admin(self, *statements: str) -> list[Any]:
        import psycopg

        results = []
        with psycopg.connect(_conninfo(self.admin_url), connect_timeout=5, autocommit=True) as conn:
            for statement in statements:
                cursor = conn.execute(statement)
                results.append(cursor.fetchall() if cursor.description else None)
        return results

    def create(self) -> Database:
        self._admin(f'CREATE DATABASE "{self.name}"')
        self.created = True
        return self

    def record_job_ends(self) -> None:
        """A trigger on the job table: each row deleted (a job's end written, committed with it) is
        recorded with its lease owner (the pid of the run that wrote it) and the time."""
        import psycopg

        with psycopg.connect(_conninfo(self.url), connect_timeout=5, autocommit=True) as conn:
            conn.execute(END_TRIGGER)

    def refuse(self, seconds: float) -> int:
        """No new connection for `seconds`, and every open one cut at the start. Returns how
        many sessions were cut."""
        try:
            _, cut = self._admin(
                f'ALTER DATABASE "{self.name}" ALLOW_CONNECTIONS false',
                "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity "  # noqa: S608 - our own name
                f"WHERE datname = '{self.name}'",
            )
            time.sleep(seconds)
        finally:
            self._admin(f'ALTER DATABASE "{self.name}" ALLOW_CONNECTIONS true')
        return int(cut[0][0])

    def drop(self) -> None:
        if self.created:
            self._admin(f'ALTER DATABASE "{self.name}" ALLOW_CONNECTIONS true')
            self._admin(f'DROP DATABASE IF EXISTS "{self.name}" WITH (FORCE)')
            self.created = False


# --- workers ----------------------------------------------------------------------------------


class Worker:
    """`celery -A config worker -Q high,normal,low -c 2 -I tests.chaos.tasks`, its log in a file."""

    def __init__(self, number: int, env: dict[str, str], directory: Path, concurrency: int) -> None:
        self.number = number
        self.name = f"chaos{number}-{uuid.uuid4().hex[:6]}@%h"
        self.env = env
        self.log_path = directory / f"worker-{number}.log"
        self.concurrency = concurrency
        self.process: subprocess.Popen | None = None
        self.killed = False

    @property
    def label(self) -> str:
        return f"worker {self.number}"

    @property
    def pid(self) -> int:
        assert self.process is not None
        return self.process.pid

    def start(self, timeout: float = 90.0) -> Worker:
        args = [sys.executable, "-m", "celery", "-A", "config", "worker", "-Q", ",".join(QUEUES)]
        args += ["-c", str(self.concurrency), "-n", self.name, "-I", "tests.chaos.tasks"]
        args += ["--without-gossip", "--without-mingle"]
        self.process = spawn(args, env=self.env, log=self.log_path)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"{self.label} exited at start:\n{self.log()[-3000:]}")
            if " ready." in self.log() and len(self.children()) >= self.concurrency:
                return self
            time.sleep(0.1)
        raise RuntimeError(f"{self.label} not ready within {timeout} s:\n{self.log()[-3000:]}")

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def alive(self) -> bool:
        return self.process is not None and self.process.poll() is None and not self.killed

    def children(self) -> list[int]:
        return children_of(self.pid)

    def stop(self) -> None:
        stop_group(self.process, grace=15)


# --- what happened ------------------------------------------------------------------------------


@dataclass
class Kill:
    """One fault of the harness that SIGKILLed processes."""

    number: int
    kind: str  # "pool process" or "whole worker"
    worker: str
    pids: list[int]
    before: float
    after: float
    running: dict[int, str]  # pid -> task id its body was running, as the recorder said

    def describe(self, t0: float) -> str:
        jobs = ", ".join(f"{pid}:{task_id}" for pid, task_id in self.running.items()) or "none recorded"
        return (
            f"kill #{self.number} at +{self.before - t0:.3f} s: {self.kind} of {self.worker}, "
            f"SIGKILL pids {self.pids} (running {jobs})"
        )


@dataclass
class Death:
    """A process seen to die: by a kill of the harness, or on its own (ended by its worker)."""

    pid: int
    lo: float  # it was alive until at least here
    hi: float  # and dead by here
    cause: str
    kill: Kill | None = None


@dataclass
class Start:
    task_id: str
    pid: int
    at: float
    over: float | None = None  # when its run ended (the job's end written), None: never seen to end
    death: Death | None = None  # the death that stopped it
    stopped: float | None = None  # when it stopped: the kill, or the end of an interrupted body's run


@dataclass
class Outcome:
    """The figures of a run."""

    jobs: int = 0
    kills: int = 0
    pool_kills: int = 0
    worker_kills: int = 0
    other_deaths: int = 0
    lost: list[str] = field(default_factory=list)
    unexplained: list[str] = field(default_factory=list)
    reruns: int = 0
    reruns_after_other_deaths: int = 0
    max_reruns_per_kill: int = 0
    jobs_rerun_by_kill: Counter[int] = field(default_factory=Counter)  # kill number -> jobs it re-ran
    reclaims_pool: list[float] = field(default_factory=list)
    reclaims_worker: list[float] = field(default_factory=list)
    dead_letters: int = 0
    rows_left: int = 0
    events: dict[str, int] = field(default_factory=dict)
    seconds: float = 0.0
    peak_backlog: int = 0
    broker_restart_at: float | None = None
    refusal: tuple[float, float, int] | None = None
    not_accepted: int = 0
    broker: str = "redis"

    @property
    def ok(self) -> bool:
        return not self.lost and not self.unexplained and self.max_reruns_per_kill <= 1

    def as_dict(self) -> dict[str, Any]:
        return {
            "jobs": self.jobs,
            "kills": self.kills,
            "pool_kills": self.pool_kills,
            "worker_kills": self.worker_kills,
            "other_deaths": self.other_deaths,
            "lost": len(self.lost),
            "lost_ids": self.lost[:50],
            "unexplained_duplicates": len(self.unexplained),
            "unexplained_ids": self.unexplained[:50],
            "reruns": self.reruns,
            "reruns_after_other_deaths": self.reruns_after_other_deaths,
            "max_reruns_per_kill": self.max_reruns_per_kill,
            "most_jobs_rerun_by_one_kill": max(self.jobs_rerun_by_kill.values(), default=0),
            "slowest_reclaim_pool": max(self.reclaims_pool, default=None),
            "slowest_reclaim_worker": max(self.reclaims_worker, default=None),
            "dead_letters": self.dead_letters,
            "rows_left": self.rows_left,
            "events": self.events,
            "seconds": round(self.seconds, 1),
            "peak_backlog": self.peak_backlog,
            "not_accepted": self.not_accepted,
            "broker": self.broker,
            "ok": self.ok,
        }


# --- the run ------------------------------------------------------------------------------------


class ChaosRun:
    def __init__(self, options: argparse.Namespace) -> None:
        self.options = options
        self.rng = random.Random(options.seed)  # noqa: S311 - chaos, not cryptography
        self.dir = Path(tempfile.mkdtemp(prefix="chaos-", dir=options.log_dir))
        self.database: Database | None = None
        self.broker: RedisServer | None = None  # the broker on Redis; the site's Redis on RabbitMQ
        self.rabbit: RabbitVhost | None = None
        self.recorder_server: RedisServer | None = None
        self.workers: list[Worker] = []
        self.workers_lock = threading.Lock()
        self.stopping = threading.Event()
        self.threads: list[threading.Thread] = []
        self.kills: list[Kill] = []
        self.deaths: list[Death] = []
        self.killed_pids: set[int] = set()
        self.accepted: list[str] = []
        self.ambiguous: list[str] = []  # transactions whose COMMIT failed: accepted or not
        self.produced = 0
        self.producer_done = threading.Event()
        self.producer_error: BaseException | None = None
        self.peak_backlog = 0
        self.t0 = time.time()
        self.last_fault = time.time()
        self.broker_restart_at: float | None = None
        self.refusal: tuple[float, float, int] | None = None
        self.closed = False
        self.code = code_version()

    # -- setup and teardown --

    def env(self) -> dict[str, str]:
        assert self.database is not None
        assert self.broker is not None
        assert self.recorder_server is not None
        options = self.options
        return {
            **os.environ,
            "DJANGO_SETTINGS_MODULE": SETTINGS,
            "DATABASE_URL": self.database.url,
            "REDIS_URL": self.broker.url,
            "CELERY_BROKER_URL": self.rabbit.url if self.rabbit else self.broker.url,
            keys.RECORD_URL: self.recorder_server.url,
            "LOG_FORMAT": "json",
            "LOG_LEVEL": "INFO",
            "JOBS_LEASE_SECONDS": str(options.lease),
            "JOBS_LEDGER_SWEEP_INTERVAL": "1",
            "JOBS_LEDGER_LOST_AFTER": "3",
            "JOBS_LEDGER_MISSING_GRACE": "2",
            "CELERY_VISIBILITY_TIMEOUT": "3600",
            "CELERY_SHUTDOWN_TIMEOUT": "1",
            "WORKER_METRICS_PORT": "0",
            "LIVENESS_DIR": str(self.dir / "run"),
            "DEAD_LETTER_ALERT_EMAILS": "",
        }

    def setup(self) -> None:
        say(f"chaos: logs in {self.dir}")
        self.database = Database(postgres_admin_url()).create()
        say(f"chaos: database {self.database.name}")
        self.broker = RedisServer("broker" if self.options.broker == "redis" else "site", self.dir).start()
        if self.options.broker == "rabbitmq":
            self.rabbit = RabbitVhost("jobs-chaos").start()
            say(f"chaos: broker RabbitMQ, vhost {self.rabbit.name}")
        self.recorder_server = RedisServer("recorder", self.dir).start()
        self.recorder = self.recorder_server.client(timeout=10)
        env = self.env()
        migrate = subprocess.run(
            [sys.executable, "manage.py", "migrate", "--noinput", "-v", "0"],
            cwd=BASE_DIR,
            env=env,
            capture_output=True,
            text=True,
            timeout=600,
            preexec_fn=_die_with_parent,
            check=False,
        )
        if migrate.returncode != 0:
            raise RuntimeError(f"manage.py migrate failed:\n{migrate.stdout[-2000:]}\n{migrate.stderr[-3000:]}")
        self.database.record_job_ends()
        # This process enqueues through the same settings (django.setup after the environment is set).
        for name in ("DJANGO_SETTINGS_MODULE", "DATABASE_URL", "REDIS_URL", "CELERY_BROKER_URL", "LOG_FORMAT"):
            os.environ[name] = env[name]
        os.environ["JOBS_LEASE_SECONDS"] = env["JOBS_LEASE_SECONDS"]
        import django

        django.setup()
        import logging

        # The harness's own log lines (a publish deferred while the broker restarts) go to a file.
        root = logging.getLogger()
        for handler in list(root.handlers):
            root.removeHandler(handler)
        handler = logging.FileHandler(self.dir / "harness.log")
        root.addHandler(handler)
        from config.celery import app  # noqa: F401 - the app enqueue publishes with

        for number in range(self.options.workers):
            self.start_worker(number + 1)

    def start_worker(self, number: int) -> Worker:
        worker = Worker(number, self.env(), self.dir, self.options.concurrency)
        with self.workers_lock:
            self.workers.append(worker)
        worker.start()
        say(f"chaos: {worker.label} ready, pid {worker.pid}, pool {worker.children()}")
        return worker

    def close(self) -> None:
        """Stops and removes everything the run started; safe to call more than once."""
        if self.closed:
            return
        self.closed = True
        self.stopping.set()
        for thread in self.threads:
            thread.join(timeout=15)
        with contextlib.suppress(Exception):
            from django.db import connections

            connections.close_all()
        for worker in self.workers:
            with contextlib.suppress(Exception):
                worker.stop()
        for server in (self.broker, self.recorder_server, self.rabbit):
            if server is not None:
                with contextlib.suppress(Exception):
                    server.stop()
        if self.database is not None:
            try:
                self.database.drop()
            except Exception as exc:  # noqa: BLE001
                say(f"chaos: could not drop database {self.database.name}: {exc}")

    # -- the producer --

    def live_workers(self) -> list[Worker]:
        with self.workers_lock:
            return [worker for worker in self.workers if worker.alive()]

    def done_count(self) -> int:
        return int(self.recorder.scard(keys.DONE_KEY))

    def produce(self) -> None:
        from django.db import DatabaseError, InterfaceError, connection, transaction

        from jobs.publish import enqueue

        total = self.options.jobs
        burst_from = int(total * 0.15)
        burst_size = int(total * self.options.burst)
        job = 0
        try:
            while job < total and not self.stopping.is_set():
                in_burst = burst_from <= job < burst_from + burst_size
                if not in_burst:
                    # Paced: as fast as the workers drain, a small backlog kept.
                    while len(self.accepted) - self.done_count() > self.options.backlog:
                        if self.stopping.wait(0.05):
                            return
                size = min(200 if in_burst else 25, total - job)
                batch = [(number, self.job_seconds(), self.job_queue()) for number in range(job, job + size)]
                ids: list[str] = []
                body_done = False
                try:
                    with transaction.atomic():
                        for number, seconds, queue in batch:
                            ids.append(enqueue(keys.TASK, args=[number, seconds], queue=queue))
                        body_done = True
                except (DatabaseError, InterfaceError):
                    if body_done:
                        self.ambiguous.extend(ids)  # COMMIT itself failed: committed or not
                        job += size
                    with contextlib.suppress(Exception):
                        connection.close()
                    self.stopping.wait(0.5)
                    continue
                self.accepted.extend(ids)
                job += size
                self.produced = job
        except BaseException as exc:
            self.producer_error = exc
            raise
        finally:
            with contextlib.suppress(Exception):
                connection.close()
            self.producer_done.set()

    def job_seconds(self) -> float:
        if self.rng.random() < self.options.long_share:
            return round(self.rng.uniform(1.0, 3.0), 3)
        return round(self.rng.uniform(0.005, 0.2), 3)

    def job_queue(self) -> str:
        roll = self.rng.random()
        return "high" if roll < 0.1 else "low" if roll > 0.9 else "normal"

    # -- the watch on processes --

    def monitor(self) -> None:
        """Notes every process of a worker that dies (within 50 ms); the harness's own kills are
        noted by the harness, the others (a pool process its worker ended) here."""
        last_seen: dict[int, tuple[float, str]] = {}
        while not self.stopping.wait(0.05):
            now = time.time()
            seen: set[int] = set()
            for worker in self.live_workers():
                for pid in [worker.pid, *worker.children()]:
                    seen.add(pid)
                    last_seen[pid] = (now, worker.label)
            for pid in list(last_seen):
                if pid in seen:
                    continue
                at, label = last_seen.pop(pid)
                if pid in self.killed_pids:
                    continue
                if psutil.pid_exists(pid):
                    with contextlib.suppress(psutil.Error):
                        if psutil.Process(pid).status() != psutil.STATUS_ZOMBIE:
                            continue  # a worker being stopped at the end
                self.deaths.append(Death(pid=pid, lo=at, hi=time.time(), cause=f"pool process of {label} ended"))

    def watch_backlog(self) -> None:
        while not self.stopping.wait(0.5):
            with contextlib.suppress(redis.RedisError):
                self.peak_backlog = max(self.peak_backlog, len(self.accepted) - self.done_count())

    # -- faults --

    def kill_pool_process(self) -> Kill | None:
        running = {int(pid): task_id.decode() for pid, task_id in self.recorder.hgetall(keys.RUNNING_KEY).items()}
        candidates = [(worker, pid) for worker in self.live_workers() for pid in worker.children()]
        if not candidates:
            return None
        busy = [(worker, pid) for worker, pid in candidates if pid in running]
        worker, pid = self.rng.choice(busy or candidates)
        self.killed_pids.add(pid)
        before = time.time()
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            return None
        kill = Kill(
            number=len(self.kills) + 1,
            kind="pool process",
            worker=worker.label,
            pids=[pid],
            before=before,
            after=time.time(),
            running={pid: running[pid]} if pid in running else {},
        )
        self.recorder.hdel(keys.RUNNING_KEY, str(pid))
        return self.noted(kill)

    def kill_worker(self) -> Kill | None:
        workers = self.live_workers()
        if not workers:
            return None
        worker = self.rng.choice(workers)
        running = {int(pid): task_id.decode() for pid, task_id in self.recorder.hgetall(keys.RUNNING_KEY).items()}
        pids = [worker.pid, *worker.children()]
        self.killed_pids.update(pids)
        before = time.time()
        os.killpg(worker.pid, signal.SIGKILL)
        after = time.time()
        worker.killed = True
        with contextlib.suppress(subprocess.TimeoutExpired):
            worker.process.wait(timeout=5)
        kill = Kill(
            number=len(self.kills) + 1,
            kind="whole worker",
            worker=worker.label,
            pids=pids,
            before=before,
            after=after,
            running={pid: running[pid] for pid in pids if pid in running},
        )
        for pid in pids:
            self.recorder.hdel(keys.RUNNING_KEY, str(pid))
        self.noted(kill)
        self.start_worker(max(w.number for w in self.workers) + 1)
        return kill

    def noted(self, kill: Kill) -> Kill:
        self.kills.append(kill)
        for pid in kill.pids:
            self.deaths.append(Death(pid=pid, lo=kill.before, hi=kill.after, cause=f"kill #{kill.number}", kill=kill))
        self.last_fault = time.time()
        say("chaos: " + kill.describe(self.t0))
        return kill

    def restart_broker(self) -> None:
        assert self.broker is not None
        queued = self.queued()
        started = time.time()
        (self.rabbit or self.broker).restart_empty()
        self.broker_restart_at = started
        self.last_fault = time.time()
        say(
            f"chaos: broker restarted empty at +{started - self.t0:.3f} s "
            f"({queued} messages queued were dropped), back in {time.time() - started:.2f} s"
        )

    def refuse_database(self) -> None:
        assert self.database is not None
        started = time.time()
        say(f"chaos: database refuses connections from +{started - self.t0:.3f} s for {self.options.refuse_seconds} s")
        cut = self.database.refuse(self.options.refuse_seconds)
        self.refusal = (started, time.time(), cut)
        self.last_fault = time.time()
        say(f"chaos: database answers again at +{time.time() - self.t0:.3f} s ({cut} sessions were cut)")

    def queued(self) -> int:
        assert self.broker is not None
        if self.rabbit is not None:
            return self.rabbit.queued(QUEUES)
        client = self.broker.client(timeout=2)
        total = 0
        with contextlib.suppress(redis.RedisError):
            for key in client.scan_iter(count=1000):
                if key.decode(errors="replace").split("\x06", 1)[0] in QUEUES and client.type(key) == b"list":
                    total += client.llen(key)
        return total

    def plan(self) -> list[tuple[float, str]]:
        """(share of the jobs done, fault), in order."""
        options = self.options
        kinds = ["pool"] * options.kills
        for j in range(min(options.worker_kills, options.kills)):
            kinds[min(int((j + 0.5) * options.kills / max(options.worker_kills, 1)), options.kills - 1)] = "worker"
        plan = [(0.04 + 0.86 * (i + 0.5) / max(options.kills, 1), kind) for i, kind in enumerate(kinds)]
        plan.append((0.37, "broker"))
        plan.append((0.63, "database"))
        return sorted(plan)

    # -- the main loop --

    def run(self) -> Outcome:
        self.setup()
        self.t0 = time.time()
        for target in (self.produce, self.monitor, self.watch_backlog):
            thread = threading.Thread(target=target, name=target.__name__, daemon=True)
            thread.start()
            self.threads.append(thread)
        total = self.options.jobs
        last_status = 0.0
        for share, fault in self.plan():
            while self.done_count() < share * total:
                if self.producer_error is not None:
                    raise RuntimeError(f"the producer failed: {self.producer_error!r}")
                if time.time() - self.last_fault > self.options.settle:
                    raise RuntimeError(f"no progress for {self.options.settle} s before a fault ({fault})")
                last_status = self.status(last_status)
                time.sleep(0.02)
            {
                "pool": self.kill_pool_process,
                "worker": self.kill_worker,
                "broker": self.restart_broker,
                "database": self.refuse_database,
            }[fault]()
            time.sleep(self.options.fault_gap)
        say(f"chaos: last fault at +{self.last_fault - self.t0:.1f} s; waiting for every job")
        while True:
            done = self.done_count()
            if self.producer_done.is_set() and done >= len(self.accepted) + len(self.ambiguous):
                break
            if time.time() - self.last_fault > self.options.settle:
                say(f"chaos: {self.options.settle} s after the last fault, {len(self.accepted) - done} jobs not done")
                break
            last_status = self.status(last_status)
            time.sleep(0.2)
        self.quiesce()
        seconds = time.time() - self.t0
        self.stopping.set()
        return self.analyse(seconds)

    def status(self, last: float) -> float:
        now = time.time()
        if now - last < 10:
            return last
        done = self.done_count()
        say(
            f"chaos: +{now - self.t0:5.0f} s  accepted {len(self.accepted)}  done {done}  "
            f"backlog {len(self.accepted) - done}  kills {len(self.kills)}"
        )
        return now

    def quiesce(self) -> None:
        """Until the job table and the queues are empty, then two leases more: a copy or a
        re-run that would still come has come."""
        from django.db import connection

        from jobs.models import OutboxMessage

        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            try:
                rows = OutboxMessage.objects.count()
            except Exception:  # noqa: BLE001
                connection.close()
                rows = -1
            if rows == 0 and self.queued() == 0:
                break
            time.sleep(0.5)
        time.sleep(2 * self.options.lease + 2)

    # -- the figures --

    def analyse(self, seconds: float) -> Outcome:
        from django.db import connection

        from jobs.models import DeadLetter, OutboxMessage

        connection.close()  # whatever the refusal left of it

        outcome = Outcome(seconds=seconds, peak_backlog=self.peak_backlog, broker=self.options.broker)
        outcome.broker_restart_at = self.broker_restart_at
        outcome.refusal = self.refusal
        done = {member.decode() for member in self.recorder.smembers(keys.DONE_KEY)}
        rows = {row.task_id: row for row in OutboxMessage.objects.all()}
        letters = {letter.task_id for letter in DeadLetter.objects.all()}
        records = self.read_records([*self.accepted, *self.ambiguous])
        accepted = list(self.accepted)
        for task_id in self.ambiguous:  # a COMMIT that failed: accepted if anything of it exists
            if records[task_id]["starts"] or task_id in rows or task_id in done:
                accepted.append(task_id)
            else:
                outcome.not_accepted += 1
        outcome.jobs = len(accepted)
        outcome.kills = len(self.kills)
        outcome.pool_kills = sum(1 for kill in self.kills if kill.kind == "pool process")
        outcome.worker_kills = outcome.kills - outcome.pool_kills
        outcome.other_deaths = sum(1 for death in self.deaths if death.kill is None)
        outcome.dead_letters = len(letters)
        outcome.rows_left = len(rows)
        ended = self.job_ends()
        deaths_by_pid: dict[int, list[Death]] = defaultdict(list)
        for death in self.deaths:
            deaths_by_pid[death.pid].append(death)
        for task_id in accepted:
            if task_id not in done:
                outcome.lost.append(task_id)
            starts = self.starts_of(task_id, records[task_id], ended.get(task_id), deaths_by_pid)
            self.judge(task_id, starts, outcome)
        outcome.events = self.count_events()
        self.outcome = outcome
        return outcome

    def read_records(self, ids: list[str]) -> dict[str, dict[str, list[list[str]]]]:
        records: dict[str, dict[str, list[list[str]]]] = {}
        for start in range(0, len(ids), 500):
            chunk = ids[start : start + 500]
            pipe = self.recorder.pipeline(transaction=False)
            for task_id in chunk:
                pipe.lrange(keys.starts_key(task_id), 0, -1)
                pipe.lrange(keys.ends_key(task_id), 0, -1)
            values = pipe.execute()
            for i, task_id in enumerate(chunk):
                starts, ends = values[2 * i : 2 * i + 2]
                records[task_id] = {
                    "starts": [item.decode().split() for item in starts],
                    "ends": [item.decode().split() for item in ends],
                }
        return records

    def worker_log_lines(self) -> list[str]:
        lines: list[str] = []
        for worker in self.workers:
            lines.extend(worker.log().splitlines())
        return lines

    def job_ends(self) -> dict[str, tuple[int, float]]:
        """When each job's end was written (its row deleted, committed) and by which pool process
        (the pid in the lease owner), from the trigger's records."""
        from django.db import connection

        with connection.cursor() as cursor:
            cursor.execute(f"SELECT task_id, lease_owner, extract(epoch FROM at) FROM {END_TABLE}")  # noqa: S608
            rows = cursor.fetchall()
        ends: dict[str, tuple[int, float]] = {}
        for task_id, owner, at in rows:
            parts = (owner or "").rsplit(":", 2)
            pid = int(parts[1]) if len(parts) == 3 and parts[1].isdigit() else 0
            ends[task_id] = (pid, float(at))
        return ends

    def count_events(self) -> dict[str, int]:
        counts: Counter[str] = Counter()
        for line in self.worker_log_lines():
            for event in EVENTS:
                if f'"{event}"' in line:
                    counts[event] += 1
        return {event: counts[event] for event in EVENTS}

    @staticmethod
    def starts_of(
        task_id: str,
        record: dict[str, list[list[str]]],
        end: tuple[int, float] | None,
        deaths_by_pid: dict[int, list[Death]],
    ) -> list[Start]:
        starts = sorted(
            (Start(task_id=task_id, pid=int(pid), at=float(at)) for pid, at in record["starts"]), key=lambda s: s.at
        )
        if end is not None:  # the end was written by the last start in its process before it
            pid, at = end
            mine = [start for start in starts if start.pid == pid and start.at <= at]
            if mine:
                mine[-1].over = at
        for start in starts:
            # Killed: its process died after it began and before its run wrote the job's end (a run
            # that never wrote it was stopped, by its process's death or by nothing: the latter is
            # what `judge` reports).
            for death in deaths_by_pid.get(start.pid, []):
                if start.at < death.hi and (start.over is None or start.over > death.lo):
                    start.death, start.stopped = death, death.lo
                    break
        return starts

    def judge(self, task_id: str, starts: list[Start], outcome: Outcome) -> None:
        """Each start after the first must be the re-run of an earlier start that was killed
        before it began, one re-run per killed start; what is left is a duplicate no kill explains."""
        unmatched: list[Start] = []
        for index, start in enumerate(starts):
            if index > 0:
                earlier = [killed for killed in unmatched if killed.stopped is not None and killed.stopped <= start.at]
                if earlier:
                    killed = earlier[0]
                    unmatched.remove(killed)
                    assert killed.death is not None
                    if killed.death.kill is None:
                        outcome.reruns_after_other_deaths += 1
                    else:
                        outcome.reruns += 1
                        outcome.jobs_rerun_by_kill[killed.death.kill.number] += 1
                        reclaim = start.at - killed.death.kill.before
                        if killed.death.kill.kind == "pool process":
                            outcome.reclaims_pool.append(reclaim)
                        else:
                            outcome.reclaims_worker.append(reclaim)
                elif task_id not in outcome.unexplained:
                    outcome.unexplained.append(task_id)
            if start.death is not None:
                unmatched.append(start)
        # Re-runs per kill: the starts of the job after a killed start, until the next killed one.
        for index, start in enumerate(starts):
            if start.death is None:
                continue
            following = 0
            for later in starts[index + 1 :]:
                following += 1
                if later.death is not None:
                    break
            outcome.max_reruns_per_kill = max(outcome.max_reruns_per_kill, following)

    # -- the report --

    def report(self, outcome: Outcome) -> str:
        def seconds(values: list[float]) -> str:
            return f"{max(values):.1f} s" if values else "-"

        slowest = max([*outcome.reclaims_pool, *outcome.reclaims_worker], default=None)
        reclaim = "-" if slowest is None else f"{slowest:.1f} s"
        kills = (
            f"{outcome.kills} ({outcome.pool_kills} pool process{'es' if outcome.pool_kills != 1 else ''}, "
            f"{outcome.worker_kills} whole worker{'s' if outcome.worker_kills != 1 else ''})"
        )
        reruns_per_kill = (
            f"max {outcome.max_reruns_per_kill} ({outcome.reruns} re-runs after {outcome.kills} kills)"
            if outcome.kills
            else "-"
        )
        lines = [
            "",
            f"Kill-chaos run: {outcome.jobs} jobs, {self.options.workers} workers x {self.options.concurrency} "
            f"pool processes, broker {'RabbitMQ' if self.rabbit else 'Redis'}, lease {self.options.lease:g} s, "
            f"visibility timeout 3600 s, seed {self.options.seed}",
            f"code: {self.code}",
            "",
            "| jobs | kills | lost | started twice without a kill | re-runs per kill | slowest reclaim |",
            "|---:|---|---:|---:|---|---:|",
            f"| {outcome.jobs} | {kills} | {len(outcome.lost)} | {len(outcome.unexplained)} | {reruns_per_kill} "
            f"| {reclaim} |",
            "",
            f"- slowest reclaim after a pool process kill {seconds(outcome.reclaims_pool)}"
            + (f" (median {statistics.median(outcome.reclaims_pool):.2f} s)" if outcome.reclaims_pool else "")
            + f", after a whole worker kill {seconds(outcome.reclaims_worker)}",
        ]
        if outcome.jobs_rerun_by_kill:
            number, most = outcome.jobs_rerun_by_kill.most_common(1)[0]
            lines.append(
                f"- jobs re-run after one kill: at most {most} (kill #{number}); a kill re-runs the job its "
                "process ran and any whose end that process had not written yet"
            )
        if outcome.broker_restart_at is not None:
            what = (
                "broker RabbitMQ's vhost deleted and made again (every message dropped, every connection closed)"
                if self.rabbit
                else "broker Redis restarted empty"
            )
            lines.append(f"- {what} once, at +{outcome.broker_restart_at - self.t0:.1f} s")
        if outcome.refusal is not None:
            start, end, cut = outcome.refusal
            lines.append(
                f"- database refused connections once for {end - start:.1f} s from +{start - self.t0:.1f} s "
                f"({cut} sessions cut)"
            )
        lines += [
            f"- pool processes that died without a kill of the harness (ended by their worker): "
            f"{outcome.other_deaths}; re-runs after them: {outcome.reruns_after_other_deaths}",
            f"- peak backlog {outcome.peak_backlog} jobs; {outcome.seconds:.0f} s in all "
            f"({outcome.jobs / max(outcome.seconds, 1):.0f} jobs/s)",
            f"- dead letters {outcome.dead_letters}; rows left in the job table {outcome.rows_left}; "
            f"batches whose COMMIT failed and were not accepted: {outcome.not_accepted} jobs",
            "- worker log events: " + ", ".join(f"{name} {count}" for name, count in outcome.events.items()),
        ]
        return "\n".join(lines)

    def evidence(self, outcome: Outcome, limit: int = 10) -> str:
        """For each lost job and each unexplained duplicate: its starts, its row, its log lines."""
        from jobs.models import OutboxMessage

        out: list[str] = []
        records = self.read_records([*outcome.lost[:limit], *outcome.unexplained[:limit]])
        ends = self.job_ends()
        lines = self.worker_log_lines()
        cases = (("lost", outcome.lost[:limit]), ("started twice without a kill", outcome.unexplained[:limit]))
        for kind, ids in cases:
            for task_id in ids:
                out.append(f"--- {kind}: {task_id}")
                for name in ("starts", "ends"):
                    items = [f"pid {pid} at +{float(at) - self.t0:.3f}" for pid, at in records[task_id][name]]
                    out.append(f"  body {name}: {items}")
                end = ends.get(task_id)
                out.append(
                    f"  job's end written by pid {end[0]} at +{end[1] - self.t0:.3f}"
                    if end
                    else "  job's end never written"
                )
                pids = {int(item[0]) for item in records[task_id]["starts"]}
                for death in self.deaths:
                    if death.pid in pids:
                        out.append(
                            f"  pid {death.pid} died between +{death.lo - self.t0:.3f} and +{death.hi - self.t0:.3f}: "
                            f"{death.cause}"
                        )
                row = OutboxMessage.objects.filter(task_id=task_id).values().first()
                out.append(f"  job table row: {row}")
                out.append(f"  where the broker holds it: {self.held_by_broker(task_id)}")
                out.extend("  " + line[:600] for line in lines if task_id in line)
        return "\n".join(out)

    def held_by_broker(self, task_id: str) -> list[str]:
        assert self.broker is not None
        if self.rabbit is not None:
            return ["(RabbitMQ: a queue cannot be read without taking its messages)"]
        client = self.broker.client(timeout=2)
        where = []
        with contextlib.suppress(redis.RedisError):
            for key in client.scan_iter(count=1000):
                name = key.decode(errors="replace")
                kind = client.type(key)
                values = client.lrange(key, 0, -1) if kind == b"list" else client.hvals(key) if kind == b"hash" else []
                if any(task_id.encode() in value for value in values):
                    where.append(name)
        return where


# --- the command ------------------------------------------------------------------------------


def parse(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m tests.chaos.run", description=__doc__.split("\n\n")[0])
    parser.add_argument("--jobs", type=int, default=1500)
    parser.add_argument("--kills", type=int, default=8, help="SIGKILLs in all, whole workers included")
    parser.add_argument("--worker-kills", type=int, default=1, help="of those, whole workers (then replaced)")
    parser.add_argument(
        "--broker",
        choices=("redis", "rabbitmq"),
        default="redis",
        help="the broker (RabbitMQ: a vhost of its own on the local node, 127.0.0.1:5672 guest/guest)",
    )
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--concurrency", type=int, default=2)
    parser.add_argument("--lease", type=float, default=3.0, help="JOBS_LEASE_SECONDS")
    parser.add_argument("--refuse-seconds", type=float, default=6.0)
    parser.add_argument("--burst", type=float, default=0.25, help="share of the jobs enqueued in one burst")
    parser.add_argument("--backlog", type=int, default=40, help="jobs waiting, at most, outside the burst")
    parser.add_argument("--long-share", type=float, default=0.01, help="share of jobs of 1-3 s (others 5-200 ms)")
    parser.add_argument("--fault-gap", type=float, default=0.3, help="seconds at least between two faults")
    parser.add_argument("--settle", type=float, default=300.0, help="seconds to wait for the jobs after the last fault")
    parser.add_argument("--seed", type=int, default=None)
    parser.add_argument("--log-dir", default=None, help="where the run's directory is made (a temporary one)")
    parser.add_argument("--json", default=None, help="also write the figures to this file")
    parser.add_argument("--keep-logs", action="store_true", help="keep the worker logs also when the run passes")
    options = parser.parse_args(argv)
    if options.seed is None:
        options.seed = random.SystemRandom().randrange(1_000_000)
    return options


def _terminate(signum: int, frame: Any) -> None:
    raise SystemExit(128 + signum)


def main(argv: list[str] | None = None) -> int:
    options = parse(argv)
    if not postgres_answers():
        say(f"chaos: no PostgreSQL answers at {postgres_admin_url()} (the run refuses its database: it needs one)")
        return 2
    if options.broker == "rabbitmq" and not rabbitmq_answers():
        say(f"chaos: no RabbitMQ answers at {RABBITMQ_URL} or rabbitmqctl is missing (--broker rabbitmq needs both)")
        return 2
    chaos = ChaosRun(options)
    signal.signal(signal.SIGTERM, _terminate)
    signal.signal(signal.SIGHUP, _terminate)
    import atexit

    atexit.register(chaos.close)
    status = 2
    try:
        outcome = chaos.run()
        say(chaos.report(outcome))
        if not outcome.ok:
            say("\nchaos: FAILED; evidence:\n" + chaos.evidence(outcome))
        if options.json:
            Path(options.json).write_text(json.dumps(outcome.as_dict(), indent=2))
        status = 0 if outcome.ok else 1
    except KeyboardInterrupt:
        say("chaos: interrupted")
        status = 130
    except Exception as exc:  # noqa: BLE001 - reported, and everything is still removed
        import traceback

        traceback.print_exc()
        say(f"chaos: the run could not be made: {exc}")
    finally:
        chaos.close()
        if status == 0 and not options.keep_logs:
            shutil.rmtree(chaos.dir, ignore_errors=True)
        else:
            say(f"chaos: logs kept in {chaos.dir}")
    return status


if __name__ == "__main__":
    sys.exit(main())
