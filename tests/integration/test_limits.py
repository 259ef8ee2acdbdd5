"""Limits per key on real workers: two worker processes, two queues, one job table. A concurrency
limit of 2 never has 3 bodies running for a key, a rate limit of 10 a second never starts 11 in
any second, other keys are not held up, and a SIGKILLed run's slot comes back at its lease's end."""

from __future__ import annotations

import os
import time
import uuid
from datetime import timedelta

import pytest
from django.db import transaction
from django.utils import timezone

from jobs.models import OutboxMessage
from jobs.publish import enqueue
from tests.integration import tasks
from tests.integration.conftest import wait_for
from tests.integration.test_run_once import FAST, _kill_tree

pytestmark = [pytest.mark.django_db(transaction=True), pytest.mark.integration]


def _events(redis_client, key: str) -> list[tuple[str, str, str, float]]:
    events = []
    for raw in redis_client.lrange(f"{key}:events", 0, -1):
        kind, customer, run, at = raw.decode().split("|")
        events.append((kind, customer, run, float(at)))
    return events


def _most_at_once(events, customer: str, killed_at: float | None = None) -> int:
    """The most runs of `customer` whose bodies overlapped; a run the kill cut short ends then."""
    starts = {run: at for kind, c, run, at in events if kind == "start" and c == customer}
    ends = {run: at for kind, c, run, at in events if kind == "end" and c == customer}
    edges = []
    for run, start in starts.items():
        end = ends.get(run, killed_at if killed_at is not None else float("inf"))
        edges += [(start, 1), (end, -1)]
    running = most = 0
    for _at, step in sorted(edges, key=lambda e: (e[0], e[1])):  # an end before a start at the same instant
        running += step
        most = max(most, running)
    return most


def _ended(redis_client, key: str) -> int:
    return sum(1 for kind, *_rest in _events(redis_client, key) if kind == "end")


def test_limits_hold_across_two_workers_and_two_queues(start_worker, redis_client):
    """One run of two workers (three pool processes each) consuming two queues, with jobs of
    three limited tasks at once: at most 2 running per customer, at most 10 starts a second per
    provider, one at a time per customer in order of arrival; other keys are not held up."""
    key = f"k-{uuid.uuid4().hex}"
    for _ in range(2):
        start_worker(queues="high,low", concurrency=3, extra_env=FAST)
    queue = ["low", "high"]
    with transaction.atomic():
        for n in range(8):
            enqueue(tasks.limited_sync, args=[key, "acme", 0.6], queue=queue[n % 2])
        for n in range(2):
            enqueue(tasks.limited_sync, args=[key, "globex", 0.6], queue=queue[n % 2])
        for n in range(25):
            enqueue(tasks.limited_rate, args=[key, "mail-api"], queue=queue[n % 2])
        for n in range(5):
            enqueue(tasks.limited_rate, args=[key, "sms-api"], queue=queue[n % 2])
    wait_for(lambda: _ended(redis_client, key) == 10, timeout=90)
    wait_for(lambda: redis_client.llen(f"{key}:starts:mail-api") == 25, timeout=60)
    wait_for(lambda: redis_client.llen(f"{key}:starts:sms-api") == 5)
    events = _events(redis_client, key)

    # Concurrency: six pool processes would run all of acme's at once without the limit.
    assert _most_at_once(events, "acme") == 2
    assert _most_at_once(events, "globex") == 2
    starts = sorted((at, customer) for kind, customer, _run, at in events if kind == "start")
    assert len(starts) == 10  # each body once: a throttled message starts nothing
    # globex's jobs, enqueued after acme's eight, did not wait behind acme's line.
    last_acme = max(at for at, customer in starts if customer == "acme")
    assert all(at < last_acme for at, customer in starts if customer == "globex")

    # Rate: any eleven consecutive starts span at least a second (database time, as the limit
    # counts); unlimited, 25 jobs on six processes start within a fraction of a second.
    mail = sorted(float(at) for at in redis_client.lrange(f"{key}:starts:mail-api", 0, -1))
    assert all(mail[i + 10] - mail[i] >= 1.0 for i in range(len(mail) - 10))
    assert mail[-1] - mail[0] >= 2.0

    # Order of arrival: jobs waiting for one key start in the order they were enqueued (the
    # first to reach a worker takes the free slot, whichever it is: the two queues race). Alone
    # on the workers: a job still behind others in the broker has not waited yet, and the
    # guarantee is among the jobs that wait (docs/limits.md).
    wait_for(lambda: not OutboxMessage.objects.exists())
    with transaction.atomic():
        for n in range(6):
            enqueue(tasks.limited_solo, args=[key, "initech", 0.1, str(n)], queue=queue[n % 2])
    wait_for(lambda: _ended(redis_client, key) == 16, timeout=90)
    events = _events(redis_client, key)
    solo = sorted((at, run.split("-")[0]) for kind, c, run, at in events if kind == "start" and c == "initech")
    labels = [label for _at, label in solo]
    assert sorted(labels) == ["0", "1", "2", "3", "4", "5"]
    assert labels[1:] == sorted(labels[1:], key=int)
    assert _most_at_once(events, "initech") == 1
    wait_for(lambda: not OutboxMessage.objects.exists())


#: Seconds the first job runs: long enough for the second worker to start (up to 6 s on a loaded
#: machine) while it still runs, or the waiting job never waits.
FIRST = 10.0


@pytest.mark.parametrize("broker", ["redis", "rabbitmq"])
def test_the_slot_of_a_sigkilled_run_comes_back_at_its_lease_end_before_the_job_runs_again(
    start_worker, redis_client, request, broker
):
    """One at a time per customer; the worker running the first job is killed outright. The
    second job starts once the dead run's lease expires, before the sweeper brings the first back
    (twice the lease and the holder's silence later); the first then runs once more."""
    key = f"k-{uuid.uuid4().hex}"
    env = dict(FAST)
    if broker == "rabbitmq":
        env.update(CELERY_BROKER_URL=request.getfixturevalue("rabbitmq_vhost"), JOBS_REDIS_URL=os.environ["REDIS_URL"])
    doomed = start_worker(queues="high", concurrency=1, extra_env=env)
    if broker == "redis":
        with transaction.atomic():
            enqueue(tasks.limited_solo, args=[key, "acme", FIRST, "first"], queue="high")
    else:  # the test process publishes to its own Redis only: the workers' relay publishes these rows
        _row(tasks.limited_solo.name, [key, "acme", FIRST, "first"], "high")
    wait_for(lambda: len(_events(redis_client, key)) == 1, timeout=30)
    if broker == "redis":
        with transaction.atomic():
            enqueue(tasks.limited_solo, args=[key, "acme", 0.2, "waiting"], queue="low")
    else:
        _row(tasks.limited_solo.name, [key, "acme", 0.2, "waiting"], "low")
    survivor = start_worker(queues="low,high", concurrency=2, extra_env=env)
    wait_for(lambda: OutboxMessage.objects.filter(state=OutboxMessage.State.THROTTLED).exists(), timeout=30)
    _kill_tree(doomed.process)
    killed_at = time.time()

    wait_for(lambda: _ended(redis_client, key) == 2, timeout=90)
    events = _events(redis_client, key)
    starts = sorted((at, run.split("-")[0]) for kind, _c, run, at in events if kind == "start")
    # The killed run, the waiting job, the killed job once more: the slot came back at the dead
    # run's lease end, before the sweeper brought the killed job back.
    assert [label for _at, label in starts] == ["first", "waiting", "first"]
    assert _most_at_once(events, "acme", killed_at=killed_at) == 1
    wait_for(lambda: not OutboxMessage.objects.exists(), timeout=30)
    assert survivor.process.poll() is None


def _row(task_name: str, args: list, queue: str) -> None:
    OutboxMessage.objects.create(
        task_name=task_name,
        task_id=uuid.uuid4().hex,
        args=args,
        options={"queue": queue, "headers": {"jobs_ledger": 1}},
        queue=queue,
        created_at=timezone.now() - timedelta(minutes=5),
        attempts=1,
    )
