"""A real Celery worker in a child process, against the suite's Redis and test database."""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest
from django.db import connection
from kombu import Connection

from config.env import BASE_DIR
from devtools.localrabbitmq import RabbitVhost


def database_url() -> str:
    """The URL of the test database this process uses, for child processes."""
    db = connection.settings_dict
    if db["ENGINE"].endswith("sqlite3"):
        return f"sqlite:///{db['NAME']}"
    user = db.get("USER") or ""
    password = f":{db['PASSWORD']}" if db.get("PASSWORD") else ""
    auth = f"{user}{password}@" if user else ""
    host = db.get("HOST") or "localhost"
    port = f":{db['PORT']}" if db.get("PORT") else ""
    return f"postgres://{auth}{host}{port}/{db['NAME']}"


def process_env(**overrides: str) -> dict[str, str]:
    """The environment of a process a test starts: test settings, the test database, JSON logs."""
    return {
        **os.environ,
        "DJANGO_SETTINGS_MODULE": "config.settings.test",
        "DATABASE_URL": database_url(),
        "LOG_FORMAT": "json",
        **overrides,
    }


class WorkerProcess:
    """`celery -A config worker` as an operator starts it, with its log kept in a file."""

    def __init__(
        self,
        log_path: Path,
        queues: str = "high,normal,low",
        concurrency: int = 2,
        extra_env: dict[str, str] | None = None,
        extra_args: list[str] | None = None,
    ) -> None:
        self.name = f"test-{uuid.uuid4().hex[:8]}@%h"
        self.log_path = log_path
        self.queues = queues
        self.concurrency = concurrency
        # Tests that stop a busy worker don't need to wait the production 30 s; its liveness file is
        # its own (tests run side by side); a test's own extra_env wins over the defaults.
        defaults = {
            "WORKER_METRICS_PORT": "0",
            "CELERY_SHUTDOWN_TIMEOUT": "1",
            "LIVENESS_DIR": str(log_path.parent / "run"),
        }
        self.env = process_env(**{**defaults, **(extra_env or {})})
        self.extra_args = ["-I", "tests.integration.tasks", *(extra_args or [])]
        self.process: subprocess.Popen | None = None

    def start(self, timeout: float = 30.0) -> WorkerProcess:
        args = [
            sys.executable,
            "-m",
            "celery",
            "-A",
            "config",
            "worker",
            "-Q",
            self.queues,
            "-c",
            str(self.concurrency),
            "-n",
            self.name,
            "--without-gossip",
            "--without-mingle",
            *self.extra_args,
        ]
        self._log = self.log_path.open("ab")
        self.process = subprocess.Popen(args, cwd=BASE_DIR, env=self.env, stdout=self._log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"worker exited at start:\n{self.log()[-3000:]}")
            if " ready." in self.log():
                return self
            time.sleep(0.1)
        self.stop()
        raise RuntimeError(f"worker not ready within {timeout} s:\n{self.log()[-3000:]}")

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def signal(self, sig: int) -> None:
        assert self.process is not None
        self.process.send_signal(sig)

    def wait(self, timeout: float) -> int:
        assert self.process is not None
        return self.process.wait(timeout=timeout)

    def terminate(self) -> None:
        """Asks it to stop (SIGTERM) without waiting: `stop` then waits."""
        if self.process and self.process.poll() is None and not getattr(self, "_terminated", False):
            self.process.send_signal(signal.SIGTERM)
            self._terminated = True

    def stop(self, timeout: float = 30.0) -> None:
        if self.process and self.process.poll() is None:
            self.terminate()
            try:
                self.process.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        if getattr(self, "_log", None):
            self._log.close()


class ServiceProcess:
    """Any other long-running process of the project (beat, Flower), logging to a file."""

    def __init__(self, args: list[str], log_path: Path, extra_env: dict[str, str] | None = None) -> None:
        self.args = args
        self.log_path = log_path
        self.env = process_env(**{"LIVENESS_DIR": str(log_path.parent / "run"), **(extra_env or {})})
        self.process: subprocess.Popen | None = None

    def start(self) -> ServiceProcess:
        self._log = self.log_path.open("ab")
        self.process = subprocess.Popen(
            [sys.executable, "-m", *self.args], cwd=BASE_DIR, env=self.env, stdout=self._log, stderr=subprocess.STDOUT
        )
        return self

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 20.0) -> None:
        if self.process and self.process.poll() is None:
            self.process.send_signal(sig)
            try:
                self.process.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        if getattr(self, "_log", None):
            self._log.close()


@pytest.fixture
def start_service(tmp_path, redis_server):
    """Factory: `start_service(["celery", "-A", "config", "beat"], extra_env={...})`."""
    services: list[ServiceProcess] = []

    def start(args: list[str], extra_env: dict[str, str] | None = None) -> ServiceProcess:
        service = ServiceProcess(args, tmp_path / f"service-{len(services)}.log", extra_env).start()
        services.append(service)
        return service

    yield start
    for service in services:
        service.stop()


def wait_for(predicate, timeout: float = 30.0, interval: float = 0.1):
    """Polls `predicate` until it returns something truthy; fails the test after `timeout`."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(interval)
    raise AssertionError(f"condition not met within {timeout} s")


@pytest.fixture
def start_worker(tmp_path, redis_client):
    """Factory: `start_worker(**options)` starts a worker; all are stopped after the test, before
    `redis_client` empties the session's Redis (what a stopped worker gave back to the broker, a
    task it was running with late acks, must not be run by the next test's worker)."""
    workers: list[WorkerProcess] = []

    def start(**options) -> WorkerProcess:
        worker = WorkerProcess(tmp_path / f"worker-{len(workers)}.log", **options).start()
        workers.append(worker)
        return worker

    yield start
    for worker in workers:  # all at once: each takes its shutdown's time
        worker.terminate()
    for worker in workers:
        worker.stop()


RABBIT = "amqp://guest:guest@127.0.0.1:5672/"


@pytest.fixture
def rabbitmq_vhost():
    """A throw-away virtual host on the local RabbitMQ, or a skip saying why there is none."""
    try:
        with Connection(RABBIT + "%2F", connect_timeout=2) as conn:
            conn.ensure_connection(max_retries=0)
    except Exception as exc:  # noqa: BLE001
        pytest.skip(f"no RabbitMQ answers on 127.0.0.1:5672 ({type(exc).__name__})")
    vhost = RabbitVhost("jobs-test", RABBIT)
    try:
        vhost.start()
    except (RuntimeError, OSError, subprocess.SubprocessError) as exc:
        pytest.skip(f"cannot create a RabbitMQ vhost: {exc}"[:240])
    yield vhost.url
    with contextlib.suppress(RuntimeError, OSError, subprocess.SubprocessError):
        vhost.stop()


# --- a real browser -------------------------------------------------------------------------

CHROMIUM = os.environ.get("CHROMIUM_PATH", "/usr/bin/chromium")
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]


def admin_login(page, live_server, next_path: str, username: str, password: str) -> None:
    """Logs `page` into the admin through its login form, landing on `next_path`."""
    page.goto(f"{live_server.url}/admin/login/?next={next_path}")
    page.fill("#id_username", username)
    page.fill("#id_password", password)
    page.click("input[type=submit]")


@pytest.fixture
def browser(monkeypatch):
    """A headless Chromium; the test is skipped (with the reason) only when none can be started."""
    try:
        from playwright.sync_api import Error, sync_playwright
    except ImportError as exc:
        pytest.skip(f"playwright cannot be imported: {exc}")
    if not shutil.which(CHROMIUM):
        pytest.skip(f"no Chromium at {CHROMIUM} (apt-get install chromium, or `make browser`)")
    # Playwright's sync API runs an event loop in this thread; the ORM calls of the test are still synchronous.
    monkeypatch.setenv("DJANGO_ALLOW_ASYNC_UNSAFE", "true")
    manager = sync_playwright().start()
    try:
        browser = manager.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
    except Error as exc:
        manager.stop()
        pytest.skip(f"Chromium cannot be launched: {exc}")
    yield browser
    browser.close()
    manager.stop()
