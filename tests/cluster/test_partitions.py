"""Run once across hosts: a worker host cut off from the network while it runs jobs.

Its link is down for longer than the start lease and Redis's visibility timeout: from the other
hosts it is a crash (its process no longer beats in Redis, its lease lapses), so its jobs come
back once and run on the other worker. When its link comes back, its own runs end without
overwriting anything newer, and its messages, redelivered by Redis meanwhile, start nothing.
"""

from __future__ import annotations

import time

import pytest
from django.db import transaction

from jobs.models import OutboxMessage
from jobs.publish import enqueue
from tests.cluster.conftest import report, runs
from tests.integration import tasks
from tests.integration.conftest import wait_for

pytestmark = [pytest.mark.django_db(transaction=True), pytest.mark.cluster]

VISIBILITY = "15"


def cut_a_worker_host_running_jobs(cluster, name: str, *, down_for: float, **worker_env: str) -> None:
    """Three 10 s jobs start on w1; its link goes down for `down_for` s while w2 runs; then back."""
    record = cluster.tmp / "runs.txt"
    labels = [f"job-{n}" for n in range(3)]
    cut = cluster.worker("w1", concurrency=3, **worker_env)
    with transaction.atomic():
        for label in labels:
            enqueue(tasks.record_run, args=[str(record), label, 10.0], queue="normal")
    wait_for(lambda: sum(c["start"] for c in runs(record).values()) == 3, timeout=30)
    cluster.worker("w2", concurrency=3, **worker_env)

    cut.link_down()
    down_at = time.monotonic()
    # From w2's side w1 crashed: each of its jobs comes back once, on w2.
    wait_for(lambda: sum(c["start"] for c in runs(record).values()) == 6, timeout=60)
    reclaimed_in = time.monotonic() - down_at
    time.sleep(max(0.0, down_for - (time.monotonic() - down_at)))
    cut.link_up()

    wait_for(lambda: not OutboxMessage.objects.exists(), timeout=120)
    wait_for(lambda: all(runs(record)[label]["end"] == 2 for label in labels), timeout=60)
    time.sleep(5)  # w1's redelivered copies and kept writes have had their chance
    counted = runs(record)
    # 0 lost, at most one re-run for the one "crash" each job lived through, nothing started again
    # once w1 was back.
    assert {label: counted[label]["start"] for label in labels} == dict.fromkeys(labels, 2)
    assert not OutboxMessage.objects.exists()
    report(name, cluster, jobs=len(labels), lost=0, runs_per_job=2, slowest_reclaim=round(reclaimed_in, 1))
    for host in cluster.workers.values():
        assert host.processes[-1].poll() is None, f"{host.name} died"


def test_a_worker_host_cut_off_longer_than_the_lease_and_the_visibility_timeout(cluster):
    cut_a_worker_host_running_jobs(
        cluster,
        "worker host cut off 20 s (lease 2 s, visibility 15 s)",
        down_for=int(VISIBILITY) + 5,  # past the visibility timeout: Redis gives its messages back
        CELERY_VISIBILITY_TIMEOUT=VISIBILITY,
    )


def test_on_rabbitmq_a_worker_host_cut_off_longer_than_the_lease(rabbitmq_cluster):
    """RabbitMQ on the broker host: it keeps w1's unacknowledged messages until it notices the
    connection dead (heartbeats: a minute), so the jobs come back through their lapsed leases and
    the ledger; when w1 returns, its runs end and its acknowledgements go through."""
    cut_a_worker_host_running_jobs(rabbitmq_cluster, "worker host cut off 20 s (lease 2 s)", down_for=20)


def test_behind_sentinel_a_worker_host_cut_off_longer_than_the_lease_and_the_visibility_timeout(sentinel_cluster):
    cut_a_worker_host_running_jobs(
        sentinel_cluster,
        "worker host cut off 20 s (lease 2 s, visibility 15 s)",
        down_for=int(VISIBILITY) + 5,
        CELERY_VISIBILITY_TIMEOUT=VISIBILITY,
    )


def test_the_database_black_holed_for_20_s_under_running_jobs(cluster):
    """Connections to the database hang (no refusal, no reset) while jobs run and more are
    enqueued: no lease is taken over (every holder still beats in Redis), nothing runs twice, and
    every job ends once the database answers again."""
    record = cluster.tmp / "runs.txt"
    cluster.worker("w1", concurrency=3)
    cluster.worker("w2", concurrency=3)
    labels = [f"job-{n}" for n in range(8)]
    with transaction.atomic():
        for label in labels:
            enqueue(tasks.record_run, args=[str(record), label, 4.0], queue="normal")
    wait_for(lambda: sum(c["start"] for c in runs(record).values()) >= 6, timeout=30)
    cluster.forwarder.blackhole()
    time.sleep(20)
    cluster.forwarder.restore()

    wait_for(lambda: not OutboxMessage.objects.exists(), timeout=120)
    time.sleep(3)
    counted = runs(record)
    assert {label: counted[label]["start"] for label in labels} == dict.fromkeys(labels, 1)
    assert {label: counted[label]["end"] for label in labels} == dict.fromkeys(labels, 1)
    report("database black-holed 20 s under running jobs", cluster, jobs=len(labels), lost=0, runs_per_job=1)
    for host in cluster.workers.values():
        assert host.processes[-1].poll() is None, f"{host.name} died"


def test_a_worker_host_whose_clock_is_30_s_ahead(cluster):
    """Leases and the relay's due times are in the database's clock, so a host 30 s ahead (here
    the first worker, which takes the sweep lock) neither takes over a live run nor publishes a
    job waiting in the table early; every job runs once."""
    from jobs.models import JobAttempt

    record = cluster.tmp / "runs.txt"
    cluster.worker("ahead", concurrency=2, skew=30)
    cluster.worker("w2", concurrency=2)
    labels = [f"job-{n}" for n in range(8)]
    with transaction.atomic():
        for label in labels:
            enqueue(tasks.record_run, args=[str(record), label, 3.0], queue="normal")
        enqueue(tasks.record_run, args=[str(record), "later", 0.1], queue="normal", countdown=8)
    enqueued_at = time.time()
    wait_for(lambda: not OutboxMessage.objects.exists(), timeout=90)
    time.sleep(3)
    counted = runs(record)
    assert {label: counted[label]["start"] for label in [*labels, "later"]} == dict.fromkeys([*labels, "later"], 1)
    later = [float(line.split()[-1]) for line in record.read_text().splitlines() if line.startswith("start later ")]
    # Its own clock, if the ahead host ran it, says up to 30 s more: never less than the countdown.
    assert later[0] - enqueued_at >= 7.5
    assert not JobAttempt.objects.filter(outcome=JobAttempt.Outcome.CRASHED).exists()  # no live run taken over
    report("one worker host's clock 30 s ahead", cluster, jobs=len(labels) + 1, lost=0, runs_per_job=1, taken_over=0)
    for host in cluster.workers.values():
        assert host.processes[-1].poll() is None, f"{host.name} died"
