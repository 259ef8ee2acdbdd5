"""Cleanup of temporary files, the daily report and the default schedules."""

from __future__ import annotations

import os
import time
from datetime import timedelta

import pytest
from django.core import mail
from django.core.management import call_command
from django.utils import timezone
from django_celery_beat.models import IntervalSchedule, PeriodicTask
from django_celery_results.models import TaskResult

from jobs.housekeeping import (
    cleanup_roots,
    daily_report_build,
    daily_report_create,
    retry_count_add,
    temp_files_cleanup,
)
from jobs.models import DailyReport, DeadLetter, DeadLetterPurge
from jobs.schedules import DEFAULT_SCHEDULES, schedules_setup
from jobs.tasks import cleanup_temp_files, daily_report, dead_letter_retention
from tests.jobs.factories import DeadLetterFactory

DAY = timedelta(hours=24)


def make(path, age_hours=0.0, content=b"x"):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(content)
    when = time.time() - age_hours * 3600
    os.utime(path, (when, when))
    return path


def test_cleanup_removes_only_old_regular_files_inside_the_root(tmp_path):
    root = tmp_path / "tmp"
    outside = make(tmp_path / "outside" / "precious.txt", age_hours=100)
    old = make(root / "old.upload", age_hours=30, content=b"12345")
    nested_old = make(root / "a" / "b" / "old.part", age_hours=30)
    fresh = make(root / "being-written.upload", age_hours=0.1)
    (root / "link-to-outside").symlink_to(outside)
    os.utime(root / "link-to-outside", (0, 0), follow_symlinks=False)
    (root / "dir-link").symlink_to(outside.parent, target_is_directory=True)

    report = temp_files_cleanup(roots=[root], max_age=DAY)

    assert sorted(report.removed) == sorted([str(old), str(nested_old)])
    assert report.bytes_freed == 6
    assert fresh.exists()
    assert outside.exists()  # neither the file link nor the directory link was followed
    assert (root / "link-to-outside").is_symlink()
    assert report.skipped_symlinks == 1
    assert report.skipped_recent == 1


def test_cleanup_dry_run_removes_nothing(tmp_path):
    old = make(tmp_path / "tmp" / "old", age_hours=48)
    report = temp_files_cleanup(roots=[tmp_path / "tmp"], max_age=DAY, dry_run=True)
    assert report.removed == [str(old)]
    assert old.exists()


def test_cleanup_refuses_dangerous_roots(settings, tmp_path):
    precious = make(settings.MEDIA_ROOT / "photo.jpg", age_hours=100)
    report = temp_files_cleanup(roots=[settings.MEDIA_ROOT, tmp_path / "missing"], max_age=DAY)
    assert report.refused_roots == [str(settings.MEDIA_ROOT)]
    assert precious.exists()


def test_cleanup_task_uses_the_configured_roots(settings):
    settings.FILE_UPLOAD_TEMP_DIR = str(settings.TEMP_ROOT)
    settings.CLEANUP_MAX_AGE_HOURS = 1
    assert cleanup_roots() == [settings.TEMP_ROOT]
    make(settings.TEMP_ROOT / "stale", age_hours=2)
    make(settings.TEMP_ROOT / "new")
    assert cleanup_temp_files()["removed"] == 1


@pytest.mark.django_db
def test_daily_report_counts(redis_client, settings):
    settings.DEAD_LETTER_ALERT_EMAILS = ["ops@example.com"]
    now = timezone.now()
    started = now - timedelta(minutes=10)

    def result(name, status, seconds=1.0, done=None):
        row = TaskResult.objects.create(task_id=f"{name}-{status}-{TaskResult.objects.count()}", task_name=name,
                                        status=status)  # fmt: skip
        done = done or started + timedelta(seconds=seconds)
        TaskResult.objects.filter(pk=row.pk).update(date_created=started, date_done=done)

    result("thumbnails.generate", "SUCCESS", 2)
    result("thumbnails.generate", "SUCCESS", 9)
    result("thumbnails.generate", "FAILURE", 1)
    result("mailer.send_email", "SUCCESS", 0.5)
    result("mailer.send_email", "SUCCESS", done=now - timedelta(days=2))  # outside the day
    retry_count_add("mailer.send_email")
    retry_count_add("mailer.send_email")
    DeadLetterFactory(task_name="thumbnails.generate", failed_at=started)
    DeadLetterFactory(task_name="thumbnails.generate", failed_at=now - timedelta(days=3))

    data = daily_report_build(end=now)
    assert data["by_task"] == {"thumbnails.generate": {"SUCCESS": 2, "FAILURE": 1}, "mailer.send_email": {"SUCCESS": 1}}
    assert data["totals"] == {"SUCCESS": 3, "FAILURE": 1}
    assert data["retries"] == {"mailer.send_email": 2}
    assert data["dead_letters_created"] == 1
    assert data["slowest"][0]["task_name"] == "thumbnails.generate"
    assert data["slowest"][0]["seconds"] == 9

    assert DailyReport.objects.get(pk=daily_report()).data["totals"] == {"SUCCESS": 3, "FAILURE": 1}
    daily_report_create()  # the same day again replaces, never duplicates
    assert DailyReport.objects.count() == 1
    assert len(mail.outbox) == 2
    assert "mailer.send_email: success 1; retries 2" in mail.outbox[0].body


@pytest.mark.django_db
def test_dead_letter_retention_task(settings):
    settings.JOBS_DEAD_LETTER_RETENTION_DAYS = 30
    old = timezone.now() - timedelta(days=31)
    DeadLetterFactory(status="discarded", failed_at=old)
    DeadLetterFactory(status="requeued", failed_at=old)
    kept = [DeadLetterFactory(status="pending", failed_at=old), DeadLetterFactory(status="discarded")]
    assert dead_letter_retention() == 2
    assert set(DeadLetter.objects.values_list("pk", flat=True)) == {row.pk for row in kept}
    assert DeadLetterPurge.objects.get().actor == "retention"


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
