"""The daily task report, and the retention of dead letters."""

from __future__ import annotations

from datetime import timedelta
from pathlib import Path

import pytest
from django.core import mail
from django.core.management import call_command
from django.utils import timezone
from django_celery_results.models import TaskResult

from jobs.models import DailyReport, DeadLetter, DeadLetterPurge
from jobs.reports import daily_report_build, daily_report_create, retry_count_add
from jobs.tasks import daily_report, dead_letter_retention
from tests.jobs.factories import DeadLetterFactory

DAY = timedelta(hours=24)


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
def test_the_retention_task_forgets_old_attempts_of_jobs(settings):
    from jobs.models import JobAttempt

    settings.JOBS_ATTEMPT_RETENTION_DAYS = 14
    for task_id, age in (("old", 15), ("recent", 13)):
        JobAttempt.objects.create(
            task_id=task_id,
            task_name="t",
            attempt=0,
            outcome="retried",
            finished_at=timezone.now() - timedelta(days=age),
        )
    dead_letter_retention()
    assert list(JobAttempt.objects.values_list("task_id", flat=True)) == ["recent"]
