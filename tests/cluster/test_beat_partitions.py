"""The beat pair across hosts: the leader cut from Redis but not from the database, and the reverse.

Two beats on hosts of their own, one worker host, one schedule every 2 s. Each run records the
beat tick that sent it (`meta.due_at`). Exactly one beat sends each tick: no two runs are closer
than the interval, and every run beat recorded (`total_run_count`) ran once. None is lost: no
gap between two ticks is longer than the interval plus a takeover (the lock's TTL, a standby's
poll, the new leader's first read).
"""

from __future__ import annotations

import itertools
import json
import time
from datetime import datetime

import pytest
from django_celery_beat.models import IntervalSchedule, PeriodicTask, PeriodicTasks

from jobs.models import OutboxMessage
from jobs.redis_client import redis_client
from jobs.runtime.beat import LOCK_KEY
from tests.cluster.conftest import Cluster, report
from tests.cluster.net import Host
from tests.integration.conftest import wait_for

pytestmark = [pytest.mark.django_db(transaction=True), pytest.mark.cluster]

INTERVAL = 2.0
TTL = 6.0  # JOBS_BEAT_LOCK_TTL: a standby polls every TTL/3 s
TAKEOVER = TTL + TTL / 3 + 3.0  # the lock expires, a standby's next poll, its fence and first read


def ticks(path) -> list[tuple[datetime, str]]:
    """(due_at, task id) of every run, in the order of their ticks."""
    found = []
    for line in path.read_text().splitlines() if path.exists() else []:
        _tick, due, _host, task_id, _at = line.split()
        found.append((datetime.fromisoformat(due), task_id))
    return sorted(found)


def leader(cluster: Cluster) -> Host:
    """The beat host holding the lock (its token names the process: `ip netns exec` keeps the pid)."""
    token = redis_client(cluster.redis_url, timeout=2).get(LOCK_KEY)  # a redis:// or sentinel:// URL
    assert token, "no beat leads"
    pid = int(token.decode().split(":")[1])
    return next(host for host in cluster.beats.values() if host.processes[-1].pid == pid)


def run_pair_through(name: str, cluster: Cluster, cut, *, seconds: float) -> None:
    """Starts the pair and the schedule, applies `cut(leader)` for `seconds`, and checks the ticks."""
    record = cluster.tmp / "ticks.txt"
    cluster.worker("w1", concurrency=2)
    every, _ = IntervalSchedule.objects.get_or_create(every=int(INTERVAL), period=IntervalSchedule.SECONDS)
    schedule = PeriodicTask.objects.create(
        name="cluster: tick", task="tests.record_tick", interval=every, args=json.dumps([str(record)])
    )
    for beat in ("b1", "b2"):
        cluster.beat(beat, JOBS_BEAT_LOCK_TTL=str(TTL))
    wait_for(lambda: len(ticks(record)) >= 3, timeout=60)
    old = leader(cluster)
    heal = cut(old)
    time.sleep(seconds)
    heal()
    time.sleep(3 * INTERVAL)
    # Off (an update: save() would write this stale copy's run count back); beat reads the change
    # within a second or two.
    PeriodicTask.objects.filter(pk=schedule.pk).update(enabled=False)
    PeriodicTasks.update_changed()
    time.sleep(3)
    wait_for(lambda: not OutboxMessage.objects.filter(task_name="tests.record_tick").exists(), timeout=90)
    time.sleep(2)

    runs = ticks(record)
    gaps = [(later - earlier).total_seconds() for (earlier, _), (later, _) in itertools.pairwise(runs)]
    new = next(host for host in cluster.beats.values() if host is not old)
    # The standby took over while the leader was cut off, and the old leader stood down.
    assert '"beat.leading"' in cluster.log(new.name).read_text()
    assert leader(cluster) is new
    # Exactly one send per tick: no two ticks closer than the interval, each message ran once,
    # and what the beats recorded as sent is what ran.
    assert min(gaps) >= INTERVAL - 0.05, gaps
    assert len({task_id for _due, task_id in runs}) == len(runs)
    schedule.refresh_from_db()
    assert schedule.total_run_count == len(runs)
    report(name, cluster, ticks=len(runs), shortest_gap=round(min(gaps), 2), longest_gap=round(max(gaps), 2))
    # None lost: the longest gap is one takeover.
    assert max(gaps) <= INTERVAL + TAKEOVER, gaps
    for host in [*cluster.beats.values(), *cluster.workers.values()]:
        assert host.processes[-1].poll() is None, f"{host.name} died"


def test_the_beat_leader_cut_from_redis_but_not_from_the_database(cluster):
    """It cannot renew the lock: it stops sending once its renewal fails, and the standby takes
    the lock at its expiry and the fencing token in the database; what the old leader recorded
    before is not sent again, and when it comes back it stays a standby."""

    def cut(host: Host):
        cluster.network.cut(host, cluster.broker)
        return lambda: cluster.network.heal(host, cluster.broker)

    run_pair_through("beat leader cut from Redis 20 s", cluster, cut, seconds=20)


def test_the_beat_leader_cut_from_the_database_but_not_from_redis(cluster):
    """Its ticks hang on the database, so its lock is not renewed and the standby takes over; after
    30 s without an answer TCP gives the query up (`tcp_user_timeout`), and the old leader finds
    the lock taken. A leader whose ticks fail at once instead (a refused connection) hands the
    lock over after `JOBS_BEAT_LOCK_TTL`/3 s of failures (tests/jobs/runtime/test_beat.py)."""

    def cut(host: Host):
        cluster.network.cut(host, None)
        return lambda: cluster.network.heal(host, None)

    run_pair_through("beat leader cut from the database 35 s", cluster, cut, seconds=35)
