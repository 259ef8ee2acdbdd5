"""A cluster of hosts for one test: a broker host with its own Redis, the database behind a
forwarder the test owns, and worker hosts, each a network namespace (tests/cluster/net.py).

`make cluster` runs these (`-m cluster`); `make test` leaves them out. They need root and
PostgreSQL; elsewhere they skip with one line saying why.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import redis
import requests
from django.db import connection
from django.test import override_settings

from config.env import BASE_DIR
from tests.cluster.net import Host, Network, NoNamespaces
from tests.cluster.proxy import Forwarder
from tests.integration.conftest import process_env

#: Recovery in seconds, as the one-host fault suite has it.
FAST = {
    "JOBS_LEDGER_SWEEP_INTERVAL": "1",
    "JOBS_LEDGER_LOST_AFTER": "2",
    "JOBS_LEDGER_MISSING_GRACE": "1",
    "JOBS_LEASE_SECONDS": "2",
    "JOBS_SCHEDULE_POLL_INTERVAL": "0.3",
    "CELERY_SHUTDOWN_TIMEOUT": "1",
    "WORKER_METRICS_PORT": "0",
    "DEAD_LETTER_ALERT_EMAILS": "",
}


def pytest_collection_modifyitems(items):
    for item in items:
        if "tests/cluster/" in str(item.fspath):
            item.add_marker(pytest.mark.cluster)


@dataclass
class Cluster:
    network: Network
    tmp: Path
    broker: Host
    redis_url: str
    database_url: str
    forwarder: Forwarder
    redis_hosts: list[Host] = field(default_factory=list)
    broker_url: str = ""  # the broker when it is not `redis_url` (RabbitMQ)
    kind: str = "redis"  # redis, sentinel or rabbitmq
    workers: dict[str, Host] = field(default_factory=dict)
    beats: dict[str, Host] = field(default_factory=dict)

    def env(self, host: Host, **extra: str) -> dict[str, str]:
        return process_env(
            DATABASE_URL=self.database_url,
            REDIS_URL=self.redis_url,
            CELERY_BROKER_URL=self.broker_url or self.redis_url,
            JOBS_REDIS_URL=self.redis_url,
            LIVENESS_DIR=str(self.tmp / f"run-{host.name}"),
            CLUSTER_HOST=host.name,
            **{**FAST, **extra},
        )

    def worker(
        self, name: str, *, queues: str = "high,normal,low", concurrency: int = 2, skew: float = 0.0, **extra: str
    ) -> Host:
        """A worker host; `skew`: its clock that many seconds off (tests/cluster/skew)."""
        host = self.network.host(name)
        if skew:
            extra = {**extra, "PYTHONPATH": str(Path(__file__).parent / "skew"), "CLOCK_SKEW_SECONDS": str(skew)}
        self.workers[name] = host
        args = [sys.executable, "-m", "celery", "-A", "config", "worker", "-Q", queues, "-c", str(concurrency)]
        args += ["-n", f"{name}@%h", "--without-gossip", "--without-mingle", "-I", "tests.integration.tasks"]
        host.popen(args, env=self.env(host, **extra), log=self.log(name), cwd=BASE_DIR)
        deadline = time.monotonic() + 60
        while " ready." not in self.log(name).read_text(errors="replace"):
            if time.monotonic() > deadline or host.processes[-1].poll() is not None:
                raise RuntimeError(f"worker {name} did not start:\n{self.log(name).read_text()[-3000:]}")
            time.sleep(0.2)
        return host

    def beat(self, name: str, **extra: str) -> Host:
        """A beat host (django-celery-beat's database scheduler behind the beat lock)."""
        host = self.network.host(name)
        args = [sys.executable, "-m", "celery", "-A", "config", "beat", "--loglevel", "INFO"]
        host.popen(args, env=self.env(host, **extra), log=self.log(name), cwd=BASE_DIR)
        self.beats[name] = host
        return host

    def web(self, name: str, *, workers: int = 2, **extra: str) -> tuple[Host, str]:
        """A web host: gunicorn as the image runs it (config/gunicorn.py, 4 threads, 60 s
        timeout); returns the host and its base URL, once `/healthz` answers."""
        host = self.network.host(name)
        args = [sys.executable, "-m", "gunicorn", "config.wsgi", "--config", str(BASE_DIR / "config" / "gunicorn.py")]
        args += ["--bind", f"{host.address}:8000", "--workers", str(workers), "--threads", "4", "--timeout", "60"]
        args += ["--no-control-socket"]
        env = self.env(host, DJANGO_ALLOWED_HOSTS=host.address, **extra)
        process = host.popen(args, env=env, log=self.log(name), cwd=BASE_DIR)
        base = f"http://{host.address}:8000"
        deadline = time.monotonic() + 60
        while True:
            try:
                if requests.get(f"{base}/healthz", timeout=2).status_code == 200:
                    return host, base
            except requests.RequestException:
                pass
            if time.monotonic() > deadline or process.poll() is not None:
                raise RuntimeError(f"web {name} did not start:\n{self.log(name).read_text()[-3000:]}")
            time.sleep(0.3)

    def log(self, name: str) -> Path:
        return self.tmp / f"{name}.log"


#: What each cluster test measured, one JSON line per test (`make cluster` prints them at the end).
FIGURES = BASE_DIR / "var" / "cluster-figures.jsonl"


def report(test: str, cluster: Cluster | None = None, **figures: object) -> None:
    if cluster is not None and cluster.kind != "redis":
        test = f"{test} [{cluster.kind}]"
    FIGURES.parent.mkdir(parents=True, exist_ok=True)
    with FIGURES.open("a") as out:
        out.write(json.dumps({"test": test, **figures}) + "\n")


def runs(path: Path) -> dict[str, Counter[str]]:
    """What the bodies recorded (tests.record_run): per label, `start` and `end` counts."""
    counted: dict[str, Counter[str]] = defaultdict(Counter)
    if path.exists():
        for line in path.read_text().splitlines():
            what, label, *_ = line.split()
            counted[label][what] += 1
    return counted


def _wait(condition, what: str, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while True:
        try:
            if condition():
                return
        except (redis.RedisError, OSError):
            pass
        if time.monotonic() > deadline:
            raise RuntimeError(f"waited {timeout} s for {what}")
        time.sleep(0.1)


def _redis_server(host: Host, tmp: Path, *args: str) -> None:
    host.popen(
        ["redis-server", "--bind", host.address, "--port", "6379", "--save", "", "--appendonly", "no",
         "--protected-mode", "no", "--dir", str(tmp), "--repl-diskless-sync-delay", "0", *args],
        env=dict(os.environ),
        log=tmp / f"redis-{host.name}.log",
    )  # fmt: skip


#: The master's name the sentinels watch.
MASTER = "jobs"


def _sentinels(network: Network, tmp: Path) -> tuple[list[Host], str]:
    """A master (r1), its replica (r2) and three sentinels (on r1, r2, r3): returns the Redis
    hosts and the one `sentinel://` URL every process is given."""
    r1, r2, r3 = (network.host(name) for name in ("r1", "r2", "r3"))
    _redis_server(r1, tmp)
    _redis_server(r2, tmp, "--replicaof", r1.address, "6379")
    replica = redis.Redis(host=r2.address, socket_timeout=1)
    _wait(lambda: replica.info("replication").get("master_link_status") == "up", "the replica to sync")
    for host in (r1, r2, r3):
        directory = tmp / f"sentinel-{host.name}"
        directory.mkdir()
        conf = directory / "sentinel.conf"  # sentinel rewrites it: a file of its own
        conf.write_text(
            f"port 26379\nbind {host.address}\nprotected-mode no\ndir {directory}\n"
            f"sentinel monitor {MASTER} {r1.address} 6379 2\n"
            f"sentinel down-after-milliseconds {MASTER} 3000\n"
            f"sentinel failover-timeout {MASTER} 10000\n"
        )
        host.popen(["redis-server", str(conf), "--sentinel"], env=dict(os.environ), log=directory / "sentinel.log")
    for host in (r1, r2, r3):
        watcher = redis.Redis(host=host.address, port=26379, socket_timeout=1)
        _wait(
            lambda w=watcher: w.sentinel_slaves(MASTER) and len(w.sentinel_sentinels(MASTER)) == 2,
            f"the sentinel on {host.name} to see the replica and the other two",
        )
    hosts = ",".join(f"{host.address}:26379" for host in (r1, r2, r3))
    return [r1, r2, r3], f"sentinel://{hosts}/{MASTER}/0"


def _rabbitmq(host: Host, tmp: Path) -> str:
    """A RabbitMQ node of the test's own on `host` (guest may log in from other hosts); its URL.
    Its files live in `tmp` (a directory the `rabbitmq` user can reach: rabbitmq-server drops
    root for that user, and pytest's temporary directories are root's alone)."""
    base = tmp
    for directory in (base, base / "mnesia", base / "log"):
        directory.mkdir(exist_ok=True)
        shutil.chown(directory, "rabbitmq")
    (base / "rabbitmq.conf").write_text(f"listeners.tcp.default = {host.address}:5672\nloopback_users = none\n")
    (base / "enabled_plugins").write_text("[].\n")
    env = {
        **os.environ,
        "HOME": str(base),
        "RABBITMQ_NODENAME": "cluster@localhost",
        "RABBITMQ_CONFIG_FILE": str(base / "rabbitmq"),
        "RABBITMQ_ENABLED_PLUGINS_FILE": str(base / "enabled_plugins"),
        "RABBITMQ_MNESIA_BASE": str(base / "mnesia"),
        "RABBITMQ_LOG_BASE": str(base / "log"),
        "RABBITMQ_FEATURE_FLAGS_FILE": str(base / "feature_flags"),
        "RABBITMQ_PLUGINS_EXPAND_DIR": str(base / "plugins"),
        "RABBITMQ_PID_FILE": str(base / "pid"),
    }
    host.popen(["rabbitmq-server"], env=env, log=base / "log" / "out.log")
    url = f"amqp://guest:guest@{host.address}:5672//"

    def answers() -> bool:
        with socket.create_connection((host.address, 5672), timeout=1):
            return True

    _wait(answers, "the RabbitMQ node", timeout=90)
    return url


@contextlib.contextmanager
def _made(tmp_path: Path, *, sentinel: bool = False, rabbitmq: bool = False):
    if shutil.which("redis-server") is None:
        pytest.skip("no redis-server for the broker host")
    if connection.vendor != "postgresql":
        pytest.skip("the cluster runs on PostgreSQL (DATABASE_URL): hosts reach it over the network")
    try:
        network = Network().__enter__()
    except NoNamespaces as exc:
        pytest.skip(f"cannot make hosts here: {exc}")
    rabbit_dir = Path(tempfile.mkdtemp(prefix="jobs-cluster-rabbitmq-"))
    try:
        redis_hosts: list[Host] = []
        if sentinel:
            redis_hosts, redis_url = _sentinels(network, tmp_path)
        else:
            redis_hosts = [network.host("broker")]
            _redis_server(redis_hosts[0], tmp_path)
            redis_url = f"redis://{redis_hosts[0].address}:6379/0"
            _wait(lambda: redis.Redis.from_url(redis_url, socket_timeout=1).ping(), "the broker's Redis")
        amqp_url = _rabbitmq(redis_hosts[0], rabbit_dir) if rabbitmq else ""
        db = connection.settings_dict
        forwarder = Forwarder((network.gateway, 0), (db.get("HOST") or "127.0.0.1", int(db.get("PORT") or 5432)))
        port = forwarder.address[1]
        user = db.get("USER") or "postgres"
        database_url = f"postgres://{user}@{network.gateway}:{port}/{db['NAME']}"
        from config.celery import app
        from jobs.redis_client import kombu_sentinel
        from tests.conftest import reset_broker_pools

        broker_url, options = kombu_sentinel(redis_url) if sentinel else (amqp_url or redis_url, {})
        previous = app.conf.broker_url, app.conf.broker_transport_options
        app.conf.broker_url = broker_url
        app.conf.broker_transport_options = {**previous[1], **options}
        reset_broker_pools()
        with override_settings(REDIS_URL=redis_url, JOBS_REDIS_URL=redis_url, CELERY_BROKER_URL=broker_url):
            kind = "sentinel" if sentinel else "rabbitmq" if rabbitmq else "redis"
            yield Cluster(
                network, tmp_path, redis_hosts[0], redis_url, database_url, forwarder, redis_hosts, amqp_url, kind
            )
        app.conf.broker_url, app.conf.broker_transport_options = previous
        reset_broker_pools()
        forwarder.close()
    finally:
        network.remove()
        if rabbitmq and (rabbit_dir / "log").exists():  # kept beside the test's other logs
            shutil.copytree(rabbit_dir / "log", tmp_path / "rabbitmq-log", dirs_exist_ok=True)
        shutil.rmtree(rabbit_dir, ignore_errors=True)
        subprocess.run(["sync"], check=False)


@pytest.fixture
def cluster(tmp_path, django_db_blocker):
    """A broker host with one Redis."""
    with _made(tmp_path) as made:
        yield made


@pytest.fixture
def sentinel_cluster(tmp_path, django_db_blocker):
    """Redis behind Sentinel: a master (`broker`, r1), a replica (r2), three sentinels (r1-r3)."""
    with _made(tmp_path, sentinel=True) as made:
        yield made


@pytest.fixture
def rabbitmq_cluster(tmp_path, django_db_blocker):
    """The broker host runs a RabbitMQ node of its own (the broker) beside its Redis (beat's lock,
    the ledger's bookkeeping, the cache)."""
    if shutil.which("rabbitmq-server") is None:
        pytest.skip("no rabbitmq-server for the broker host")
    with _made(tmp_path, rabbitmq=True) as made:
        yield made
