"""No task lost: SIGTERM, SIGKILL, a Redis restart and RabbitMQ, with real processes and signals."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import uuid
from urllib.parse import urlsplit

import psutil
import pytest
from kombu import Connection

from config.env import BASE_DIR
from devtools.localredis import LocalRedis
from jobs.models import DeadLetter
from tests.integration import tasks
from tests.integration.conftest import wait_for

pytestmark = [pytest.mark.django_db(transaction=True), pytest.mark.integration]


def publish_batch(key: str, count: int, seconds: float, broker_url: str | None = None) -> None:
    if broker_url is None:
        for n in range(count):
            tasks.slow_mark.delay(key, n, seconds)
        return
    with Connection(broker_url) as conn:
        for n in range(count):
            tasks.slow_mark.apply_async((key, n, seconds), connection=conn)


def members(redis_client, name: str) -> set[int]:
    return {int(m) for m in redis_client.smembers(name)}


def sigterm_scenario(start_worker, redis_client, extra_env: dict[str, str], broker_url: str | None = None) -> None:
    key = f"k-{uuid.uuid4().hex}"
    env = {"CELERY_SHUTDOWN_TIMEOUT": "1", **extra_env}
    first = start_worker(concurrency=2, extra_env=env)
    publish_batch(key, 6, 4.0, broker_url)
    # A retry-like message the worker holds until its ETA: it must be given back too.
    eta_options = {"countdown": 6}
    if broker_url:
        with Connection(broker_url) as conn:
            tasks.slow_mark.apply_async((key, 6, 0.1), connection=conn, **eta_options)
    else:
        tasks.slow_mark.apply_async((key, 6, 0.1), **eta_options)
    wait_for(lambda: len(members(redis_client, f"{key}:started")) == 2)

    first.signal(signal.SIGTERM)  # a deploy: 1 s of soft shutdown is not enough for 4 s tasks
    assert first.wait(timeout=60) == 0  # a clean exit, in time, having given the rest back
    assert members(redis_client, f"{key}:done") == set()  # nothing finished, nothing marked done

    start_worker(concurrency=2, extra_env=env)
    wait_for(lambda: members(redis_client, f"{key}:done") == set(range(7)), timeout=90)
    assert int(redis_client.get(f"{key}:completions")) == 7  # each ran to its end exactly once
    assert not DeadLetter.objects.exists()


def test_sigterm_during_a_batch_loses_nothing(start_worker, redis_client):
    sigterm_scenario(start_worker, redis_client, {})


def test_sigterm_lets_running_tasks_finish_within_the_shutdown_timeout(start_worker, redis_client):
    key = f"k-{uuid.uuid4().hex}"
    env = {"CELERY_SHUTDOWN_TIMEOUT": "8"}
    first = start_worker(concurrency=2, extra_env=env)
    publish_batch(key, 4, 1.0)  # two run at once, two wait in the queue
    wait_for(lambda: len(members(redis_client, f"{key}:started")) == 2)
    running = members(redis_client, f"{key}:started")

    first.signal(signal.SIGTERM)
    assert first.wait(timeout=60) == 0
    assert members(redis_client, f"{key}:done") == running  # the running two finished before the exit

    start_worker(concurrency=2, extra_env=env)
    wait_for(lambda: members(redis_client, f"{key}:done") == set(range(4)), timeout=60)
    assert int(redis_client.get(f"{key}:completions")) == 4  # the finished two did not run again
    assert not DeadLetter.objects.exists()


def test_sigkill_of_the_whole_worker_loses_nothing(start_worker, redis_client):
    key = f"k-{uuid.uuid4().hex}"
    env = {"CELERY_VISIBILITY_TIMEOUT": "3"}
    first = start_worker(concurrency=2, extra_env=env)
    publish_batch(key, 4, 2.0)
    wait_for(lambda: len(members(redis_client, f"{key}:started")) == 2)

    parent = psutil.Process(first.process.pid)
    for process in [*parent.children(recursive=True), parent]:  # a machine crash: everything at once
        with contextlib.suppress(psutil.NoSuchProcess):
            process.kill()
    first.wait(timeout=10)

    start_worker(concurrency=2, extra_env=env)
    wait_for(lambda: members(redis_client, f"{key}:done") == set(range(4)), timeout=90)
    assert not DeadLetter.objects.exists()


def test_worker_survives_a_redis_restart_and_consumes_again(start_worker, tmp_path):
    from django_celery_results.models import TaskResult

    broker = LocalRedis().start()
    try:
        worker = start_worker(
            extra_env={
                "CELERY_BROKER_URL": broker.url,
                "LIVENESS_DIR": str(tmp_path / "live"),
                "JOBS_LIVENESS_INTERVAL": "0.5",
            }
        )
        before = tasks.flaky.apply_async(("k-before", 0), connection=Connection(broker.url))
        wait_for(lambda: TaskResult.objects.filter(task_id=before.id, status="SUCCESS").exists())

        port = broker.port
        broker.stop()
        broker = LocalRedis(port=port).start()  # same address, empty: a restart

        after_id = None

        def consumed_after_restart():
            nonlocal after_id
            if after_id is None:
                with contextlib.suppress(Exception):
                    after_id = tasks.flaky.apply_async(("k-after", 0), connection=Connection(broker.url)).id
            return after_id and TaskResult.objects.filter(task_id=after_id, status="SUCCESS").exists()

        wait_for(consumed_after_restart, timeout=60, interval=0.5)
        assert worker.process.poll() is None
        # The liveness file must be written afresh by the reconnected consumer, not left over.
        for stale in (tmp_path / "live").iterdir():
            stale.unlink()

        def probe_passes():
            return (
                subprocess.run(
                    [sys.executable, "manage.py", "probe", "worker", "--max-age", "3"],
                    cwd=BASE_DIR,
                    env=worker.env,
                    capture_output=True,
                    text=True,
                    timeout=60,
                ).returncode
                == 0
            )

        wait_for(probe_passes, timeout=20, interval=0.5)
    finally:
        broker.stop()


def test_sigterm_on_rabbitmq_loses_nothing(start_worker, redis_client, rabbitmq_vhost):
    sigterm_scenario(start_worker, redis_client, {"CELERY_BROKER_URL": rabbitmq_vhost}, broker_url=rabbitmq_vhost)


def test_the_suite_talks_only_to_its_own_redis_and_database(redis_server):
    """Everything a test and the processes it starts reach is the suite's private Redis (never the
    machine's shared one on 6379) and a test database."""
    from celery import current_app
    from django.conf import settings
    from django.db import connection

    assert urlsplit(redis_server.url).port != 6379
    assert os.environ["CELERY_BROKER_URL"] == os.environ["REDIS_URL"] == redis_server.url  # inherited by workers
    assert current_app.conf.broker_url == settings.CELERY_BROKER_URL == redis_server.url
    assert settings.CACHES["default"]["LOCATION"] == redis_server.url
    assert os.path.basename(str(connection.settings_dict["NAME"])).startswith(("test_", "test-"))
