"""The kill-chaos run, short form: 1 500 jobs through two real workers while 8 of their processes are
SIGKILLed (one of them a whole worker), the broker Redis restarts empty once and the database
refuses every connection for 6 s once; and a shorter one on RabbitMQ (a vhost of its own, deleted
and made again in place of the restart). No job may be lost, no body may start twice unless a kill
explains it, and a kill may cost each job it hit one re-run at most (tests/chaos/run.py says how
each is counted; `make chaos` is the long form, its figures in docs/reliability.md)."""

from __future__ import annotations

import json
import subprocess
import sys
from urllib.parse import urlsplit

import pytest

from config.env import BASE_DIR
from devtools.localrabbitmq import RABBITMQ_URL, rabbitmq_answers
from tests.chaos.run import postgres_admin_url, postgres_answers

pytestmark = [pytest.mark.chaos, pytest.mark.integration]

SHORT = ["--jobs", "1500", "--kills", "8", "--worker-kills", "1", "--settle", "120"]
RABBITMQ_SHORT = ["--broker", "rabbitmq", "--jobs", "800", "--kills", "6", "--worker-kills", "1", "--settle", "180"]


@pytest.mark.timeout(900)
def test_kill_chaos_short_form(tmp_path):
    _chaos(tmp_path, SHORT, kills=8, jobs=1500)


@pytest.mark.timeout(900)
def test_kill_chaos_short_form_on_rabbitmq(tmp_path):
    if not rabbitmq_answers():
        where = urlsplit(RABBITMQ_URL).netloc.rsplit("@", 1)[-1]
        pytest.skip(f"no RabbitMQ answers on {where} (or rabbitmqctl is missing)")
    _chaos(tmp_path, RABBITMQ_SHORT, kills=6, jobs=800)


def _chaos(tmp_path, short: list[str], *, kills: int, jobs: int) -> None:
    if not postgres_answers():
        where = urlsplit(postgres_admin_url()).netloc.rsplit("@", 1)[-1]
        pytest.skip(f"the suite runs on PostgreSQL: the chaos run refuses its database, and none answers at {where}")
    figures_path = tmp_path / "figures.json"
    args = [sys.executable, "-m", "tests.chaos.run", *short, "--json", str(figures_path), "--log-dir", str(tmp_path)]
    # Its own process (its own database, Redis servers on free ports, workers): nothing shared with
    # the tests beside it. SIGTERM makes it remove all it started.
    run = subprocess.Popen(args, cwd=BASE_DIR, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        output, _ = run.communicate(timeout=840)
    except subprocess.TimeoutExpired:
        run.terminate()
        output, _ = run.communicate(timeout=60)
        pytest.fail(f"the chaos run did not end within 14 minutes:\n{output[-20000:]}")
    assert figures_path.exists(), f"the chaos run could not be made (exit {run.returncode}):\n{output[-20000:]}"
    figures = json.loads(figures_path.read_text())
    report = output[output.find("Kill-chaos run:") :][:20000]
    assert figures["kills"] >= kills, report
    assert figures["worker_kills"] >= 1, report
    assert figures["jobs"] >= jobs, report
    assert figures["broker"] == ("rabbitmq" if "rabbitmq" in short else "redis"), report
    assert figures["lost"] == 0, report
    assert figures["unexplained_duplicates"] == 0, report
    assert figures["max_reruns_per_kill"] <= 1, report
    assert run.returncode == 0, report
