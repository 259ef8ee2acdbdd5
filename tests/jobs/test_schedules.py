"""The default periodic schedules: created once, edits kept, the scheduler told of bulk edits."""

from __future__ import annotations

from datetime import timedelta

import pytest
from django.core.management import call_command
from django_celery_beat.models import IntervalSchedule, PeriodicTask

from jobs.schedules import DEFAULT_SCHEDULES, schedules_setup

DAY = timedelta(hours=24)


@pytest.mark.django_db
def test_setup_schedules_creates_once_and_keeps_edits():
    first = schedules_setup()
    assert len(first["created"]) == len(DEFAULT_SCHEDULES)
    assert schedules_setup() == {"created": [], "kept": [d.name for d in DEFAULT_SCHEDULES], "reset": []}
    assert PeriodicTask.objects.count() == len(DEFAULT_SCHEDULES)

    heartbeat = PeriodicTask.objects.get(name="jobs: heartbeat")
    assert (heartbeat.interval.every, heartbeat.interval.period) == (30, "seconds")
    heartbeat.interval = IntervalSchedule.objects.create(every=5, period=IntervalSchedule.MINUTES)
    heartbeat.enabled = False
    heartbeat.save()

    call_command("setup_schedules", verbosity=0)
    heartbeat.refresh_from_db()
    assert (heartbeat.interval.every, heartbeat.enabled) == (5, False)

    call_command("setup_schedules", "--reset", verbosity=0)
    heartbeat.refresh_from_db()
    assert (heartbeat.interval.every, heartbeat.interval.period, heartbeat.enabled) == (30, "seconds", True)
    assert PeriodicTask.objects.count() == len(DEFAULT_SCHEDULES)
    cron = PeriodicTask.objects.get(name="jobs: daily task report").crontab
    assert (cron.minute, cron.hour) == ("5", "0")


@pytest.mark.django_db
def test_setup_schedules_finds_a_renamed_default_by_its_task():
    schedules_setup()
    PeriodicTask.objects.filter(name="jobs: heartbeat").update(name="Liveness every 30 s")
    assert "jobs: heartbeat" in schedules_setup()["kept"]
    assert PeriodicTask.objects.filter(task="jobs.heartbeat").count() == 1  # no second copy running it twice

    schedules_setup(reset=True)
    assert list(PeriodicTask.objects.filter(task="jobs.heartbeat").values_list("name", flat=True)) == [
        "jobs: heartbeat"
    ]


@pytest.mark.django_db
def test_bulk_edits_in_the_beat_admin_tell_the_scheduler(admin_client):
    from django_celery_beat.models import PeriodicTasks

    schedules_setup()
    before = PeriodicTasks.last_change()
    ids = list(PeriodicTask.objects.values_list("pk", flat=True))
    response = admin_client.post(
        "/admin/django_celery_beat/periodictask/", {"action": "disable_tasks", "_selected_action": ids}
    )
    assert response.status_code == 302
    assert not PeriodicTask.objects.filter(enabled=True).exists()
    assert PeriodicTasks.last_change() > before
