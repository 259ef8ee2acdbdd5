"""Cleanup of temporary files, the daily report and the default schedules."""

from __future__ import annotations

import os
import time
from datetime import timedelta
from pathlib import Path

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


@pytest.mark.parametrize("inside", ["media", "deep/down/media", "."])
def test_cleanup_refuses_a_root_that_holds_the_media(settings, inside):
    settings.MEDIA_ROOT = (settings.TEMP_ROOT / inside).resolve()
    precious = make(settings.MEDIA_ROOT / "photo.jpg", age_hours=100)
    report = temp_files_cleanup(roots=[settings.TEMP_ROOT], max_age=DAY)
    assert report.refused_roots == [str(settings.TEMP_ROOT)]
    assert precious.exists()


def test_cleanup_compares_resolved_paths(settings, tmp_path):
    real_media = make(settings.TEMP_ROOT / "uploads" / "photo.jpg", age_hours=100).parent
    (tmp_path / "media-link").symlink_to(real_media, target_is_directory=True)
    settings.MEDIA_ROOT = tmp_path / "media-link"  # looks elsewhere, lives inside the temp root
    report = temp_files_cleanup(roots=[tmp_path / "media" / ".." / "tmp"], max_age=DAY)
    assert report.refused_roots == [str(tmp_path / "media" / ".." / "tmp")]
    assert (real_media / "photo.jpg").exists()


@pytest.mark.parametrize("protected", ["BASE_DIR", "VAR_DIR", "STATIC_ROOT"])
def test_cleanup_refuses_a_root_that_holds_the_project_or_its_data(settings, protected):
    setattr(settings, protected, settings.TEMP_ROOT / "inside")
    precious = make(settings.TEMP_ROOT / "inside" / "manage.py", age_hours=100)
    report = temp_files_cleanup(roots=[settings.TEMP_ROOT], max_age=DAY)
    assert report.refused_roots == [str(settings.TEMP_ROOT)]
    assert precious.exists()


@pytest.mark.filterwarnings("ignore:Overriding setting DATABASES")
def test_cleanup_refuses_a_root_that_holds_the_sqlite_database(settings):
    database = make(settings.TEMP_ROOT / "db" / "db.sqlite3", age_hours=100)
    settings.DATABASES = {
        "default": {**settings.DATABASES["default"], "ENGINE": "django.db.backends.sqlite3", "NAME": str(database)}
    }
    report = temp_files_cleanup(roots=[settings.TEMP_ROOT], max_age=DAY)
    assert report.refused_roots == [str(settings.TEMP_ROOT)]
    assert database.exists()


def test_unsafe_root_reasons(settings, tmp_path):
    from jobs.housekeeping import cleanup_root_problem

    assert "filesystem root" in cleanup_root_problem(Path("/"))
    assert cleanup_root_problem(Path("/tmp")) is not None  # a shared top-level directory
    assert cleanup_root_problem(Path(settings.BASE_DIR)) is not None
    assert cleanup_root_problem(Path(settings.BASE_DIR).parent / "..") is not None
    assert cleanup_root_problem(settings.TEMP_ROOT) is None
    assert cleanup_root_problem(settings.MEDIA_ROOT) is not None


def test_cleanup_may_clean_a_temp_dir_inside_the_media(settings):
    """Only media at or below a cleanup root is at risk; a temp dir of its own inside
    MEDIA_ROOT deletes nothing else."""
    photo = make(settings.MEDIA_ROOT / "photo.jpg", age_hours=100)
    stale = make(settings.MEDIA_ROOT / "tmp" / "stale.upload", age_hours=100)
    report = temp_files_cleanup(roots=[settings.MEDIA_ROOT / "tmp"], max_age=DAY)
    assert report.refused_roots == []
    assert report.removed == [str(stale)]
    assert photo.exists()


@pytest.mark.parametrize(
    ("setting", "media"),
    [
        ("JOBS_TEMP_ROOT", "JOBS_TEMP_ROOT/media"),
        ("JOBS_TEMP_ROOT", "JOBS_TEMP_ROOT"),
        ("FILE_UPLOAD_TEMP_DIR", "FILE_UPLOAD_TEMP_DIR/m"),
    ],
)
def test_manage_py_check_reports_a_cleanup_root_holding_the_media(settings, tmp_path, setting, media):
    from django.core.management.base import SystemCheckError

    from jobs.checks import check_cleanup_roots

    settings.FILE_UPLOAD_TEMP_DIR = str(tmp_path / "uploads")
    base, _, rest = media.partition("/")
    settings.MEDIA_ROOT = Path(getattr(settings, base)) / rest
    problems = check_cleanup_roots()
    assert [p.id for p in problems] == ["jobs.E002"]
    assert setting in problems[0].msg
    assert str(Path(settings.MEDIA_ROOT).resolve()) in problems[0].msg
    with pytest.raises(SystemCheckError, match=r"jobs\.E002"):
        call_command("check", tags=["jobs"])


def test_manage_py_check_reports_a_cleanup_root_at_the_filesystem_root_or_holding_the_project(settings):
    from jobs.checks import check_cleanup_roots

    settings.FILE_UPLOAD_TEMP_DIR = None
    assert check_cleanup_roots() == []
    settings.JOBS_TEMP_ROOT = Path("/")
    assert [p.id for p in check_cleanup_roots()] == ["jobs.E002"]
    settings.JOBS_TEMP_ROOT = Path(settings.BASE_DIR).parent
    assert [p.id for p in check_cleanup_roots()] == ["jobs.E002"]
    assert "BASE_DIR" in check_cleanup_roots()[0].msg


def test_cleanup_task_uses_the_configured_roots(settings):
    settings.FILE_UPLOAD_TEMP_DIR = str(settings.TEMP_ROOT)
    settings.JOBS_CLEANUP_MAX_AGE_HOURS = 1
    assert cleanup_roots() == [settings.TEMP_ROOT]
    make(settings.TEMP_ROOT / "stale", age_hours=2)
    make(settings.TEMP_ROOT / "new")
    assert cleanup_temp_files()["removed"] == 1


@pytest.mark.django_db
def test_daily_report_counts(redis_client, settings):
    settings.JOBS_DEAD_LETTER_ALERT_EMAILS = ["ops@example.com"]
    now = timezone.now()
    started = now - timedelta(minutes=10)

    def result(name, status, seconds=1.0, done=None):
        row = TaskResult.objects.create(
            task_id=f"{name}-{status}-{TaskResult.objects.count()}", task_name=name, status=status
        )
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
def test_daily_report_aggregates_in_the_database(redis_client):
    """A busy day has millions of results: the report must not bring a row per task run into
    the process. Every query of the results table aggregates (GROUP BY) or is LIMITed."""
    from django.db import connection
    from django.test.utils import CaptureQueriesContext

    now = timezone.now()
    started = now - timedelta(hours=1)
    TaskResult.objects.bulk_create(
        TaskResult(task_id=f"id-{n}", task_name=f"t.{n % 3}", status="SUCCESS" if n % 4 else "FAILURE")
        for n in range(40)
    )
    for n, row in enumerate(TaskResult.objects.order_by("task_id")):
        TaskResult.objects.filter(pk=row.pk).update(date_created=started, date_done=started + timedelta(seconds=n))

    table = TaskResult._meta.db_table
    with CaptureQueriesContext(connection) as queries:
        data = daily_report_build(end=now)
    results_queries = [q["sql"] for q in queries if table in q["sql"]]
    assert results_queries
    assert [sql for sql in results_queries if "GROUP BY" not in sql.upper() and "LIMIT" not in sql.upper()] == []
    assert len(queries) <= 4
    assert data["totals"] == {"SUCCESS": 30, "FAILURE": 10}
    assert sum(sum(states.values()) for states in data["by_task"].values()) == 40
    assert [r["seconds"] for r in data["slowest"]] == [float(s) for s in range(39, 29, -1)]
    by_id = {row.task_id: row.task_name for row in TaskResult.objects.all()}
    assert all(by_id[r["task_id"]] == r["task_name"] for r in data["slowest"])


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
