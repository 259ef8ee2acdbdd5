"""`make run`'s process set (honcho with the Procfile, behind devtools.localredis): all five come up,
and Ctrl-C leaves nothing running."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import urllib.error
import urllib.request

import psutil
import pytest

from config.env import BASE_DIR
from devtools.localredis import free_port
from tests.integration.conftest import process_env, wait_for

pytestmark = [pytest.mark.django_db(transaction=True), pytest.mark.integration]


def status(url: str) -> int | None:
    try:
        with urllib.request.urlopen(url, timeout=3) as response:  # noqa: S310 - a local test server
            return response.status
    except urllib.error.HTTPError as exc:
        return exc.code
    except OSError:
        return None


def test_the_procfile_brings_up_web_both_workers_beat_and_flower_and_ctrl_c_stops_them_all(tmp_path, redis_client):
    # redis_client: what the Procfile's beat and workers leave in the session's Redis is emptied after.
    web_port = flower_port = free_port()
    while flower_port == web_port:
        flower_port = free_port()
    env = process_env(
        WEB_PORT=str(web_port),
        FLOWER_PORT=str(flower_port),
        FLOWER_BASIC_AUTH="ops:s3cret",
        FLOWER_DB=str(tmp_path / "flower.db"),
        LIVENESS_DIR=str(tmp_path / "live"),
        WORKER_METRICS_PORT="0",
        MAIL_WORKER_METRICS_PORT="0",
        JOBS_BEAT_LOCK_TTL="5",
        PATH=f"{os.path.dirname(sys.executable)}{os.pathsep}{os.environ['PATH']}",  # as the Makefile exports it
    )
    log = (tmp_path / "honcho.log").open("wb")
    # What `make run` runs (the Makefile adds migrate and setup_schedules before it).
    command = [
        sys.executable,
        "-m",
        "devtools.localredis",
        "--",
        sys.executable,
        "-m",
        "devtools.procfile",
        "start",
        "-f",
        "Procfile",
    ]
    run = subprocess.Popen(command, cwd=BASE_DIR, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    output = tmp_path / "honcho.log"
    try:
        wait_for(lambda: status(f"http://127.0.0.1:{web_port}/readyz") == 200, timeout=60, interval=0.5)
        wait_for(lambda: status(f"http://127.0.0.1:{flower_port}/") == 401, timeout=60, interval=0.5)  # auth on
        # Two workers: all queues, and `high` alone with the mail pool (`mail@...`).
        wait_for(lambda: output.read_text(errors="replace").count(" ready.") >= 2, timeout=60, interval=0.5)
        assert "mail@" in output.read_text(errors="replace")
        wait_for(lambda: "beat.leading" in output.read_text(errors="replace"), timeout=60, interval=0.5)
        processes = psutil.Process(run.pid).children(recursive=True)
        assert len(processes) >= 6  # honcho, and under it the shells or the five programs

        os.killpg(run.pid, signal.SIGINT)  # Ctrl-C in the terminal: the whole foreground group
        exit_code = run.wait(timeout=60)  # TimeoutExpired if honcho hung
        assert exit_code == 130, f"honcho exited with {exit_code}"  # 128 + SIGINT: stopped by the Ctrl-C
        _, alive = psutil.wait_procs(processes, timeout=30)
        assert not alive, [p.info for p in alive]
    finally:
        if run.poll() is None:
            os.killpg(run.pid, signal.SIGKILL)
            run.wait()
        log.close()
