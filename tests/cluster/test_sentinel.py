"""Redis behind Sentinel: the master's host drops off the network during steady load.

Every process is given one URL, `sentinel://r1:26379,r2:26379,r3:26379/jobs` (REDIS_URL): the
broker, the ledger's view of it, beat's lock and the cache all go through the sentinels. The
master's link goes down (its connections hang; writes not yet on the replica are lost); the
sentinels promote the replica; each client finds the new master on its next connection. Jobs
enqueued all along run once, beat goes on sending each tick once, and the cache is written on
the new master.
"""

from __future__ import annotations

import itertools
import json
import time

import pytest
import redis
from django.conf import settings
from django.db import transaction
from django_celery_beat.models import IntervalSchedule, PeriodicTask, PeriodicTasks

from config.cache import SentinelRedisCache
from jobs.heartbeat import KEY as HEARTBEAT_KEY
from jobs.models import OutboxMessage
from jobs.publish import enqueue
from tests.cluster.conftest import MASTER, report, runs
from tests.cluster.test_beat_partitions import INTERVAL, ticks
from tests.integration import tasks
from tests.integration.conftest import wait_for

pytestmark = [pytest.mark.django_db(transaction=True), pytest.mark.cluster]


def test_a_sentinel_failover_during_steady_load(sentinel_cluster):
    cluster = sentinel_cluster
    r1, r2, _r3 = cluster.redis_hosts
    record, beat_record = cluster.tmp / "runs.txt", cluster.tmp / "ticks.txt"
    every, _ = IntervalSchedule.objects.get_or_create(every=int(INTERVAL), period=IntervalSchedule.SECONDS)
    schedule = PeriodicTask.objects.create(
        name="cluster: tick", task="tests.record_tick", interval=every, args=json.dumps([str(beat_record)])
    )
    cluster.worker("w1", concurrency=3)
    cluster.worker("w2", concurrency=3)
    cluster.beat("b1", JOBS_BEAT_LOCK_TTL="6")
    wait_for(lambda: len(ticks(beat_record)) >= 2, timeout=60)

    labels = []
    enqueued_at: dict[str, float] = {}
    started = time.monotonic()
    failed_over_at = None
    for n in itertools.count():
        if time.monotonic() - started > 40:
            break
        if failed_over_at is None and time.monotonic() - started > 10:
            r1.link_down()  # the master's host is gone; it does not come back in this test
            failed_over_at = time.time()
        label = f"job-{n}"
        labels.append(label)
        enqueued_at[label] = time.time()
        with transaction.atomic():
            enqueue(tasks.record_run, args=[str(record), label, 0.5], queue="normal")
        time.sleep(0.25)

    sentinel = redis.Redis(host=r2.address, port=26379, socket_timeout=2, decode_responses=True)
    assert sentinel.sentinel_get_master_addr_by_name(MASTER)[0] == r2.address  # the replica was promoted
    wait_for(lambda: all(runs(record)[label]["end"] >= 1 for label in labels), timeout=240)
    # Recovery: from the master's loss to the end of the first job enqueued after it.
    after = [label for label, at in enqueued_at.items() if at > failed_over_at]
    lines = [line.split() for line in record.read_text().splitlines()]
    ends = {label: float(at) for what, label, *_, at in lines if what == "end"}
    recovered_in = min(ends[label] for label in after) - failed_over_at
    PeriodicTask.objects.filter(pk=schedule.pk).update(enabled=False)
    PeriodicTasks.update_changed()
    wait_for(lambda: not OutboxMessage.objects.exists(), timeout=90)
    time.sleep(3)

    counted = runs(record)
    starts = {label: counted[label]["start"] for label in labels}
    # Every job ran, once: no process crashed, so no re-run is allowed either.
    assert starts == dict.fromkeys(labels, 1), {k: v for k, v in starts.items() if v != 1}
    # Beat went on through the failover: each tick once, and none lost beyond the failover.
    beat_runs = ticks(beat_record)
    gaps = [(later - earlier).total_seconds() for (earlier, _), (later, _) in itertools.pairwise(beat_runs)]
    assert min(gaps) >= INTERVAL - 0.05, gaps
    assert any(due.timestamp() > failed_over_at + 5 for due, _ in beat_runs)
    # The cache followed: beat's heartbeat (written through the cache) is on the new master.
    cache = SentinelRedisCache(cluster.redis_url, {**settings.CACHES["default"], "OPTIONS": {"socket_timeout": 2}})
    assert (cache.get(HEARTBEAT_KEY.format("beat")) or {}).get("at", 0) > failed_over_at
    assert redis.Redis(host=r2.address, socket_timeout=2).exists(cache.make_key(HEARTBEAT_KEY.format("beat")))
    report(
        "Sentinel failover (master's host off the network) under steady load",
        jobs=len(labels),
        beat_ticks=len(beat_runs),
        longest_tick_gap=round(max(gaps), 2),
        first_job_after_the_loss_ended_in=round(recovered_in, 1),
    )
    for host in [*cluster.beats.values(), *cluster.workers.values()]:
        assert host.processes[-1].poll() is None, f"{host.name} died"
