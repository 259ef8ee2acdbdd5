"""A rolling deploy over the previous release, in the order docs/operations.md gives: the new
migrations run while the previous release's web and workers still serve. Their code (the
previous release's `jobs`, taken from git) must keep working against the new schema, and what
they do must not make the new workers run a job twice."""

from __future__ import annotations

import json
import subprocess
import sys
import tarfile
import textwrap
import uuid
from datetime import timedelta
from io import BytesIO

import pytest
from django.db import connection
from django.utils import timezone

from config.env import BASE_DIR
from jobs.models import OutboxMessage
from jobs.runtime import store
from tests.integration.conftest import process_env

pytestmark = [pytest.mark.django_db(transaction=True), pytest.mark.integration]

#: The previous release: the last commit before the job table (migration 0009).
PREVIOUS_RELEASE = "1772ae1a3ead81844e3701feedf8fd2940cfefdb"


@pytest.fixture(scope="module")
def previous_jobs(tmp_path_factory):
    """The previous release's `jobs` package, unpacked from git into a directory of its own."""
    archive = subprocess.run(
        ["git", "-C", str(BASE_DIR), "archive", "--format=tar", PREVIOUS_RELEASE, "jobs"],
        capture_output=True,
        check=False,
    )
    if archive.returncode != 0:
        pytest.fail(f"the previous release is not in this clone's history: {archive.stderr.decode()[:300]}")
    root = tmp_path_factory.mktemp("previous")
    with tarfile.open(fileobj=BytesIO(archive.stdout)) as tar:
        tar.extractall(root, filter="data")
    return root


def run_previous(root, script: str) -> dict:
    """Runs `script` with the previous release's `jobs` (and this checkout's site around it)
    against the test database; returns the JSON it printed last."""
    prelude = f"""
        import json, django
        django.setup()
        import jobs
        assert jobs.__file__.startswith({str(root)!r}), jobs.__file__
        """
    code = textwrap.dedent(prelude) + textwrap.dedent(script)
    env = process_env(PYTHONPATH=f"{root}:{BASE_DIR}")
    done = subprocess.run(
        [sys.executable, "-c", code], cwd=root, env=env, capture_output=True, text=True, timeout=120, check=False
    )
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


def test_the_previous_releases_web_enqueues_into_the_new_table(previous_jobs, redis_client):
    """0005 added NOT NULL columns without a database default: the old web's enqueues failed
    (500) after `migrate`. The job table's columns all carry one."""
    key = f"k-{uuid.uuid4().hex}"
    out = run_previous(
        previous_jobs,
        f"""
        from django.db import transaction
        from jobs.publish import enqueue
        with transaction.atomic():
            task_id = enqueue("tests.count_start", args=[{key!r}])
        print(json.dumps({{"task_id": task_id}}))
        """,
    )
    row = OutboxMessage.objects.get(task_id=out["task_id"])
    assert (row.state, row.runs, row.crashes, row.lease_owner) == (OutboxMessage.State.AVAILABLE, 0, 0, "")
    assert row.published_at is not None  # published by the old web after its commit
    run = store.job_start(out["task_id"], retries=0, hostname="new-worker")
    assert isinstance(run, store.Run)  # a new worker runs it under its lease


def test_the_previous_releases_relay_and_sweeper_leave_running_and_waiting_jobs_alone(previous_jobs, redis_client):
    """An old worker's upkeep beside new workers: a job a new worker runs is not published again,
    nor deleted; one waiting in the table for its retry is not touched before it is due."""
    now = timezone.now()
    OutboxMessage.objects.create(task_name="tests.count_start", task_id="running", args=["k"], published_at=now)
    run = store.job_start("running", retries=0, hostname="new-worker")
    OutboxMessage.objects.filter(task_id="running").update(published_at=now - timedelta(hours=1))
    OutboxMessage.objects.create(
        task_name="tests.count_start",
        task_id="waiting",
        args=["k"],
        state=OutboxMessage.State.RETRYABLE,
        retries=1,
        not_before=now + timedelta(minutes=10),
    )
    redis_client.hset(
        "unacked", "tag-1", json.dumps([{"headers": {"id": "running"}}, "", "normal"])
    )  # the running job's message, delivered and not acknowledged
    run_previous(
        previous_jobs,
        """
        from jobs.runtime.ledger import ledger_sweep
        from jobs.runtime.outbox import outbox_relay
        print(json.dumps({"relay": outbox_relay(), "sweep": ledger_sweep(), "again": ledger_sweep()}))
        """,
    )
    running = OutboxMessage.objects.get(task_id="running")
    assert (running.state, running.lease_owner, running.republished) == (OutboxMessage.State.EXECUTING, run.owner, 0)
    waiting = OutboxMessage.objects.get(task_id="waiting")
    assert (waiting.state, waiting.published_at) == (OutboxMessage.State.RETRYABLE, None)
    assert redis_client.llen("normal") == 0  # nothing published again
    connection.close()
