"""Request ids end to end, JSON logs, worker metrics, liveness and Flower, with real processes."""

from __future__ import annotations

import json
import subprocess
import sys
import urllib.error
import urllib.request
import uuid

import pytest

from config.celery import app
from config.env import BASE_DIR
from devtools.localredis import free_port
from jobs.context import request_id_var
from tests.integration import tasks
from tests.integration.conftest import wait_for

pytestmark = [pytest.mark.django_db(transaction=True), pytest.mark.integration]


def json_lines(text: str) -> list[dict]:
    """Every line a process wrote, each of which must be one JSON object."""
    return [json.loads(line) for line in text.splitlines() if line.strip()]


def test_request_id_travels_into_tasks_and_their_children(start_worker, redis_client):
    worker = start_worker()
    key = f"k-{uuid.uuid4().hex}"
    token = request_id_var.set("req-e2e-1")
    try:
        tasks.parent.delay(key)
    finally:
        request_id_var.reset(token)
    wait_for(lambda: redis_client.get(f"{key}:child"))
    lines = json_lines(worker.log())
    ran = {line["event"]: line for line in lines if line["event"] in {"tests.parent_ran", "tests.child_ran"}}
    assert ran["tests.parent_ran"]["request_id"] == "req-e2e-1"
    assert ran["tests.child_ran"]["request_id"] == "req-e2e-1"
    assert ran["tests.child_ran"]["task_name"] == "tests.child"
    assert ran["tests.parent_ran"]["task_id"] != ran["tests.child_ran"]["task_id"]
    printed = [line for line in lines if line["event"] == f"tests.parent printed {key}"]
    assert printed
    assert printed[0]["request_id"] == "req-e2e-1"
    # Celery's start banner, a plain print to sys.__stdout__ otherwise, is a log record too.
    assert any("[queues]" in line["event"] for line in lines)
    worker.stop()
    assert any(line["event"] == "worker.stopping" for line in json_lines(worker.log()))  # JSON to the end
    for line in lines:
        assert {"timestamp", "level", "logger", "event"} <= set(line)


def scrape(port: int) -> str:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as response:
        return response.read().decode()


def test_worker_metrics_count_outcomes_across_prefork_processes(start_worker, redis_client):
    port = free_port()
    start_worker(concurrency=2, extra_env={"WORKER_METRICS_PORT": str(port), "TASK_RETRY_BACKOFF_BASE": "0.1"})
    key = f"k-{uuid.uuid4().hex}"
    results = [tasks.flaky.delay(f"{key}-{i}", 0) for i in range(4)]
    retried = tasks.flaky.delay(f"{key}-r", 1)
    tasks.permanent.delay(f"{key}-p")
    for result in [*results, retried]:
        result.get(timeout=30)

    def counted():
        text = scrape(port)
        return text if 'celery_tasks_total{state="failed",task="tests.permanent"} 1.0' in text else None

    text = wait_for(counted)
    assert 'celery_tasks_total{state="succeeded",task="tests.flaky"} 5.0' in text
    assert 'celery_tasks_total{state="retried",task="tests.flaky"} 1.0' in text
    assert 'celery_tasks_total{state="dead_lettered",task="tests.permanent"} 1.0' in text
    assert 'celery_tasks_total{state="received",task="tests.flaky"} 6.0' in text
    assert 'celery_tasks_in_progress{task="tests.flaky"} 0.0' in text
    assert 'celery_task_runtime_seconds_count{task="tests.flaky"} 5.0' in text


def probe(env: dict, max_age: str = "2") -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "manage.py", "probe", "worker", "--max-age", max_age],
        cwd=BASE_DIR,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )


def test_liveness_probe_fails_when_the_consumer_stops_consuming(start_worker, tmp_path):
    live = tmp_path / "live"
    worker = start_worker(extra_env={"LIVENESS_DIR": str(live), "JOBS_LIVENESS_INTERVAL": "0.3"})
    env = {**worker.env, "LIVENESS_DIR": str(live)}
    assert probe(env).returncode == 0
    node = worker.name.replace("%h", __import__("socket").gethostname())
    for queue in ("high", "normal", "low"):
        app.control.cancel_consumer(queue, destination=[node], reply=True, timeout=5)
    wait_for(lambda: probe(env).returncode != 0, timeout=20, interval=0.5)
    result = probe(env)
    assert "stale" in result.stderr
    assert worker.process.poll() is None  # the process lives on: only the probe can tell


def test_flower_refuses_requests_without_auth(start_service, tmp_path):
    port = free_port()
    flower = start_service(
        ["celery", "-A", "config", "flower", f"--port={port}", "--address=127.0.0.1"],
        extra_env={
            "DJANGO_DEBUG": "false",
            "FLOWER_BASIC_AUTH": "ops:s3cret",
            "FLOWER_DB": str(tmp_path / "flower.db"),
        },
    )

    def status(headers=None):
        request = urllib.request.Request(f"http://127.0.0.1:{port}/", headers=headers or {})
        try:
            with urllib.request.urlopen(request, timeout=2) as response:  # noqa: S310
                return response.status
        except urllib.error.HTTPError as exc:
            return exc.code
        except OSError:
            return None

    assert wait_for(lambda: status(), timeout=30) == 401, flower.log()[-2000:]
    import base64

    auth = {"Authorization": "Basic " + base64.b64encode(b"ops:s3cret").decode()}
    assert status(auth) == 200
    assert status({"Authorization": "Basic " + base64.b64encode(b"ops:wrong").decode()}) == 401


def test_flower_will_not_start_without_auth_outside_debug(redis_server):
    import os

    env = {**os.environ, "DJANGO_SETTINGS_MODULE": "config.settings.test", "DJANGO_DEBUG": "false"}
    env.pop("FLOWER_BASIC_AUTH", None)
    result = subprocess.run(
        [sys.executable, "-m", "celery", "-A", "config", "flower", f"--port={free_port()}"],
        cwd=BASE_DIR,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode != 0
    assert "FLOWER_BASIC_AUTH (user:password) must be set" in result.stderr


def test_a_worker_ignores_the_webs_prometheus_multiprocess_directory(start_worker, tmp_path):
    """An environment shared with gunicorn (one ConfigMap) must not switch a worker's
    prometheus_client to files in a directory that is not there."""
    missing = tmp_path / "no-such-dir"
    start_worker(extra_env={"PROMETHEUS_MULTIPROC_DIR": str(missing)})
    assert tasks.flaky.delay(f"k-{uuid.uuid4().hex}", 0).get(timeout=30) == 1  # result stored in the database
    assert not missing.exists()
