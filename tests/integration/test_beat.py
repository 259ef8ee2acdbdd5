"""Beat on the database scheduler with a real worker and Redis: live edits, one beat at a time."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import time
import uuid

import pytest
from django_celery_beat.models import IntervalSchedule, PeriodicTask
from django_celery_results.models import TaskResult

from jobs.schedules import schedules_setup
from tests.integration.conftest import wait_for

pytestmark = [pytest.mark.django_db(transaction=True), pytest.mark.integration]

BEAT = ["celery", "-A", "config", "beat", "--loglevel", "INFO"]
FAST_BEAT = {"JOBS_BEAT_LOCK_TTL": "3"}


def pings() -> int:
    return TaskResult.objects.filter(task_name="jobs.ping").count()


def heartbeats_run(worker) -> int:
    """Heartbeat tasks the worker ran (they keep no result row: `jobs.tasks.QUIET`)."""
    return sum(1 for line in worker.log().splitlines() if '"Task jobs.heartbeat[' in line and "succeeded" in line)


def every_second_ping(name: str = "test: ping") -> PeriodicTask:
    interval, _ = IntervalSchedule.objects.get_or_create(every=1, period=IntervalSchedule.SECONDS)
    return PeriodicTask.objects.create(name=name, task="jobs.ping", interval=interval)


def test_setup_schedules_twice_and_live_edits_reach_a_running_beat(start_worker, start_service):
    schedules_setup()
    schedules_setup()
    assert PeriodicTask.objects.filter(name="jobs: heartbeat").count() == 1
    worker = start_worker()
    beat = start_service(BEAT, extra_env=FAST_BEAT)

    # An edit made while beat runs (here: a new 1 s interval on the heartbeat) is picked up.
    heartbeat = PeriodicTask.objects.get(name="jobs: heartbeat")
    heartbeat.interval = IntervalSchedule.objects.create(every=1, period=IntervalSchedule.SECONDS)
    heartbeat.save()
    wait_for(lambda: heartbeats_run(worker) >= 4, timeout=40)

    # Disabling stops the runs, still without a restart.
    heartbeat.enabled = False
    heartbeat.save()
    time.sleep(3)  # let a send already in flight land
    settled = heartbeats_run(worker)
    time.sleep(4)
    assert heartbeats_run(worker) == settled
    assert beat.process.poll() is None

    # A restarted beat keeps those edits: django-celery-beat's own sync of CELERY_BEAT_SCHEDULE
    # would re-enable the heartbeat and put its default interval back.
    beat.stop()
    restarted = start_service(BEAT, extra_env=FAST_BEAT)
    wait_for(lambda: '"beat.leading"' in restarted.log())
    time.sleep(3)
    heartbeat.refresh_from_db()
    assert heartbeat.enabled is False
    assert heartbeat.interval.every == 1
    assert heartbeats_run(worker) == settled
    # Beat writes nothing but JSON lines, its start banner included.
    for line in [*beat.log().splitlines(), *restarted.log().splitlines()]:
        assert json.loads(line)["event"]


def test_two_beats_send_each_tick_once_and_the_standby_takes_over(start_worker, start_service):
    start_worker()
    every_second_ping()
    first = start_service(BEAT, extra_env=FAST_BEAT)
    second = start_service(BEAT, extra_env=FAST_BEAT)
    wait_for(lambda: pings() >= 1, timeout=30)
    start, began = pings(), time.monotonic()
    time.sleep(6)
    sent, elapsed = pings() - start, time.monotonic() - began
    assert sent <= elapsed + 1.5, f"{sent} sends in {elapsed:.1f} s: two beats sent"
    assert sent >= elapsed - 2.5
    # Each run's history keeps the tick that found it due: the dashboard shows its lateness.
    from jobs.dashboard import _run

    runs = [_run(row) for row in TaskResult.objects.filter(task_name="jobs.ping").values("meta", "date_started")]
    assert all(run["lateness"] is not None and run["lateness"] < 10 for run in runs), runs

    logs = first.log() + second.log()
    assert logs.count('"beat.leading"') == 1
    assert '"beat.standby"' in logs
    leader, standby = (first, second) if '"beat.leading"' in first.log() else (second, first)

    leader.stop(signal.SIGKILL)  # no chance to release: the lock must expire
    wait_for(lambda: '"beat.leading"' in standby.log(), timeout=20)
    before = pings()
    wait_for(lambda: pings() >= before + 2, timeout=20)


def test_on_rabbitmq_beat_sends_each_tick_once_even_beside_a_tagged_entry(
    start_worker, start_service, redis_client, rabbitmq_vhost
):
    """Issue 25, with RabbitMQ as the broker: kwargs an admin typed in kombu's tagged form (read by
    django-celery-beat as a Decimal, which the ledger's JSON column cannot hold) beside a plain
    schedule. Every tick failed (`beat.tick_failed`) and beat sent nothing at all. Both must keep
    running, each tick run once: the plain one through the ledger, the tagged one straight to the
    broker. Worker and beat use the test's vhost; beat's lock and the cache stay on its Redis."""
    env = {"CELERY_BROKER_URL": rabbitmq_vhost, "JOBS_REDIS_URL": os.environ["REDIS_URL"]}
    key = f"k-{uuid.uuid4().hex}"
    keys = {"test: plain": f"{key}-plain", "test: tagged": f"{key}-tagged"}
    for name in keys.values():
        redis_client.set(f"{name}:healed", 1)  # `tests.permanent` then only counts its run, and takes any kwarg
    interval, _ = IntervalSchedule.objects.get_or_create(every=1, period=IntervalSchedule.SECONDS)
    PeriodicTask.objects.create(
        name="test: plain", task="tests.permanent", interval=interval, kwargs=json.dumps({"key": keys["test: plain"]})
    )
    tagged = {"key": keys["test: tagged"], "ms": {"__type__": "decimal", "__value__": "1"}}
    PeriodicTask.objects.create(
        name="test: tagged", task="tests.permanent", interval=interval, kwargs=json.dumps(tagged)
    )

    def runs() -> dict[str, int]:
        return {name: int(redis_client.get(k) or 0) for name, k in keys.items()}

    start_worker(extra_env=env)
    beat = start_service(BEAT, extra_env={**FAST_BEAT, **env})
    wait_for(lambda: min(runs().values()) >= 3, timeout=30)
    beat.stop()

    # What beat recorded as sent, each run with its message; every send is run, none twice.
    sent = dict(PeriodicTask.objects.filter(name__in=keys).values_list("name", "total_run_count"))
    with contextlib.suppress(AssertionError):  # the sends still in flight land
        wait_for(lambda: runs() == sent, timeout=10)
    time.sleep(2)  # a second run of a tick would land meanwhile
    assert runs() == sent
    # The worker got the Decimal the admin meant, not the tagged mapping.
    results = TaskResult.objects.filter(task_name="tests.permanent", task_kwargs__contains=keys["test: tagged"])
    wait_for(lambda: results.count() == sent["test: tagged"])
    assert all("'ms': Decimal('1')" in kwargs for kwargs in results.values_list("task_kwargs", flat=True))
    log = beat.log()
    assert '"beat.tick_failed"' not in log
    assert log.count('"beat.entry_sent_outside_ledger"') == sent["test: tagged"]


def test_housekeeping_tasks_run_on_a_real_worker(start_worker, tmp_path, settings):
    import os

    from django_celery_results.models import TaskResult

    from config.celery import app
    from jobs.models import DailyReport

    temp = tmp_path / "temp"
    outside = tmp_path / "outside"
    temp.mkdir()
    outside.mkdir()
    old, fresh, precious = temp / "old.upload", temp / "fresh.upload", outside / "precious"
    for path in (old, fresh, precious):
        path.write_bytes(b"x")
    for path in (old, precious):
        os.utime(path, (time.time() - 7200, time.time() - 7200))
    (temp / "link").symlink_to(precious)

    start_worker(queues="low", extra_env={"TEMP_ROOT": str(temp), "CLEANUP_MAX_AGE_HOURS": "1"})
    cleanup = app.send_task("jobs.cleanup_temp_files")
    wait_for(lambda: TaskResult.objects.filter(task_id=cleanup.id, status="SUCCESS").exists())
    assert not old.exists()
    assert fresh.exists()
    assert precious.exists()
    assert (temp / "link").is_symlink()

    report = app.send_task("jobs.daily_report")
    wait_for(lambda: TaskResult.objects.filter(task_id=report.id, status="SUCCESS").exists())
    data = DailyReport.objects.get().data
    assert data["by_task"]["jobs.cleanup_temp_files"] == {"SUCCESS": 1}
