"""Settings that must agree across hosts (jobs/fleet.py): each worker and beat records its own,
and `manage.py check` names what differs (jobs.W020)."""

from __future__ import annotations

import io
import json
import time

import pytest
from celery import current_app
from django.core.management import call_command

from jobs.checks import check_fleet_settings
from jobs.fleet import FLEET_KEY, STALE_AFTER, fleet_contradictions, fleet_publish, fleet_read, fleet_settings


def test_only_the_settings_whose_values_differ_are_named_with_who_holds_which():
    here = {"JOBS_LEASE_SECONDS": 20.0, "visibility_timeout": 3600.0, "TIME_ZONE": "UTC"}
    records = {
        "worker a pid 1": {**here},
        "worker b pid 2": {**here, "visibility_timeout": 120.0},
        "beat c pid 3": {"JOBS_LEASE_SECONDS": 20.0, "TIME_ZONE": "UTC"},  # a RabbitMQ-era record: not compared
    }
    assert fleet_contradictions(records, here) == {
        "visibility_timeout": {"3600.0": ["here", "worker a pid 1"], "120.0": ["worker b pid 2"]}
    }
    assert fleet_contradictions({"worker a pid 1": here}, here) == {}


def test_check_warns_of_a_worker_running_with_another_lease_and_visibility_timeout(redis_client, settings):
    options = settings.CELERY_BROKER_TRANSPORT_OPTIONS
    settings.JOBS_LEASE_SECONDS = 5.0
    settings.CELERY_BROKER_TRANSPORT_OPTIONS = {**options, "visibility_timeout": 120}
    fleet_publish("worker", redis_client)  # a worker started with other numbers
    settings.JOBS_LEASE_SECONDS = 20.0
    settings.CELERY_BROKER_TRANSPORT_OPTIONS = options
    fleet_publish("beat", redis_client)  # and a beat that agrees with this process

    warnings = check_fleet_settings()
    assert [w.id for w in warnings] == ["jobs.W020", "jobs.W020"]
    lease, visibility = (w.msg for w in warnings)
    assert lease.startswith("JOBS_LEASE_SECONDS differs across the processes running now: 20.0 on here, beat ")
    assert "; 5.0 on worker " in lease
    assert visibility.startswith("visibility_timeout differs")
    assert "120.0 on worker " in visibility

    # `manage.py check --deploy` shows it (a warning: the command still succeeds); a plain check,
    # which every command and probe runs, does not ask Redis.
    shown = io.StringIO()
    call_command("check", "--deploy", "--tag", "jobs", stdout=shown, stderr=shown)
    assert "jobs.W020" in shown.getvalue()
    plain = io.StringIO()
    call_command("check", "--tag", "jobs", stdout=plain, stderr=plain)
    assert "jobs.W020" not in plain.getvalue()


def test_agreeing_processes_stale_records_and_an_unreachable_redis_give_no_warning(redis_client, settings):
    fleet_publish("worker", redis_client)
    assert check_fleet_settings() == []
    old = {"at": time.time() - STALE_AFTER - 1, "settings": {**fleet_settings(), "JOBS_LEASE_SECONDS": 1.0}}
    redis_client.hset(FLEET_KEY, "worker gone pid 9", json.dumps(old))
    redis_client.hset(FLEET_KEY, "worker garbled pid 8", "{not json")
    assert check_fleet_settings() == []
    assert list(fleet_read(redis_client)) == [next(iter(redis_client.hkeys(FLEET_KEY))).decode()]  # the two removed

    settings.JOBS_REDIS_URL = "redis://127.0.0.1:1/0"  # nothing listens
    started = time.monotonic()
    assert check_fleet_settings() == []
    assert time.monotonic() - started < 3


@pytest.mark.django_db(transaction=True)  # django-celery-beat commits and closes connections
def test_workers_and_beats_record_the_settings_they_use_and_a_stopping_beat_removes_its_own(redis_client):
    from jobs.runtime import beat, ledger

    def recorded() -> dict[str, dict]:
        return {k.decode().split()[0]: json.loads(v)["settings"] for k, v in redis_client.hgetall(FLEET_KEY).items()}

    ledger._fleet_publish()  # what the worker's sweeper does at every sweep
    scheduler = beat.LockedDatabaseScheduler(app=current_app, lazy=True)
    try:
        scheduler.tick()
        everything = fleet_settings()
        # Each role records what it uses: the beat lock's TTL is beat's, the visibility timeout the workers'.
        assert recorded() == {
            "worker": {k: v for k, v in everything.items() if k != "JOBS_BEAT_LOCK_TTL"},
            "beat": {k: v for k, v in everything.items() if k != "visibility_timeout"},
        }
    finally:
        scheduler.close()
    assert list(recorded()) == ["worker"]  # a stopping beat takes its record away (a worker's goes stale)
