"""The jobs page in the admin: every job by state, a job's page with its attempts, actions
confirmed and audited behind `jobs.change_job`, queues paused from the dashboard."""

from __future__ import annotations

from datetime import timedelta

import pytest
from django.contrib.admin.helpers import ACTION_CHECKBOX_NAME
from django.utils import timezone

from jobs.models import DeadLetter, JobAction, JobAttempt, OutboxMessage, PausedQueue
from tests.conftest import grant, results_table
from tests.jobs.test_job_api import add

pytestmark = pytest.mark.django_db

URL = "/admin/jobs/job/"
State = OutboxMessage.State


@pytest.fixture
def operator(django_user_model, client):
    user = django_user_model.objects.create_user("op", password="pw", is_staff=True)
    grant(user, "jobs.view_job", "jobs.change_job")
    client.force_login(user)
    return user


def test_the_list_shows_each_job_by_state_with_counts_per_state_and_queue(client, operator):
    add("s-1", State.SCHEDULED, not_before=timezone.now() + timedelta(hours=2))
    add("q-1", options={"queue": "low", "headers": {"request_id": "req-7"}})
    add("r-1", State.EXECUTING, lease_owner="w1@h:9:tok", started_at=timezone.now(), lease_until=timezone.now())
    add("t-1", State.RETRYABLE, not_before=timezone.now() + timedelta(minutes=5), retries=1)
    JobAttempt.objects.create(
        task_id="t-1", task_name="mailer.send_email", attempt=0, outcome="retried", error="SMTP 451"
    )
    page = client.get(URL)
    assert page.status_code == 200
    html = page.content.decode()
    table = results_table(page)
    assert 'job-state-scheduled">scheduled' in table
    assert "due in 1\xa0hour" in table
    assert "running for" in table
    assert "w1@h:9" in table
    assert "queued for 0 s" in table  # not "0 minutes"
    assert "2 of 6" in table
    assert "SMTP 451" in table
    counts = html[html.index('id="job-counts"') : html.index('id="changelist"')]
    assert '<a href="?state=queued">1</a>' in counts
    assert '<a href="?queue=low&amp;state=queued">1</a>' in counts

    assert "q-1" in results_table(client.get(URL, {"state": "queued"}))
    assert "s-1" not in results_table(client.get(URL, {"state": "queued"}))
    assert "q-1" in results_table(client.get(URL, {"request_id": "req-7"}))
    assert "t-1" not in results_table(client.get(URL, {"request_id": "req-7"}))


def test_search_looks_in_the_arguments(client, operator):
    add("a-1", args=["order-5150"])
    add("a-2", args=["order-1"])
    table = results_table(client.get(URL, {"q": "5150"}))
    assert "a-1" in table
    assert "a-2" not in table


def test_the_admin_search_never_finds_a_job_by_its_secrets(client, operator):
    add("p-1", kwargs={"api_key": "s3cret-value"})
    assert "p-1" not in results_table(client.get(URL, {"q": "s3cret"}))
    assert "p-1" in results_table(client.get(URL, {"q": "p-1"}))


def test_a_jobs_page_shows_redacted_arguments_its_attempts_and_its_actions(client, operator):
    row = add("j-1", State.RETRYABLE, kwargs={"api_key": "s3cret", "to": "x@example.com"}, retries=1)
    JobAttempt.objects.create(task_id="j-1", task_name="mailer.send_email", attempt=0, outcome="retried", error="E1")
    html = client.get(f"{URL}{row.pk}/change/").content.decode()
    assert "s3cret" not in html
    assert "x@example.com" in html
    assert "Failed, retried" in html
    assert "E1" in html
    assert f"{URL}{row.pk}/act/cancel/" in html
    assert f"{URL}{row.pk}/act/run_now/" in html
    assert 'name="_save"' not in html  # read-only


def test_run_now_from_a_jobs_page_confirms_then_acts(client, operator, redis_client):
    row = add("n-1", State.SCHEDULED, not_before=timezone.now() + timedelta(days=1), task_name="jobs.health_check")
    confirm = client.get(f"{URL}{row.pk}/act/run_now/")
    assert "Run now <strong>1</strong> job?" in confirm.content.decode()
    assert OutboxMessage.objects.get(pk=row.pk).state == State.SCHEDULED  # a GET changes nothing
    client.post(f"{URL}{row.pk}/act/run_now/", {"confirm": "yes"})
    assert OutboxMessage.objects.get(pk=row.pk).state == State.AVAILABLE
    assert JobAction.objects.get().actor == "admin:op"


def test_cancel_a_filtered_selection_confirmed_and_audited(client, operator):
    for n in range(3):
        add(f"c-{n}", options={"queue": "low"})
    add("keep", options={"queue": "high"})
    data = {"action": "cancel_selected", "index": 0, "select_across": 1, ACTION_CHECKBOX_NAME: ["x"]}
    confirm = client.post(URL + "?queue=low", data)
    html = confirm.content.decode()
    assert "Cancel <strong>3</strong> jobs?" in html
    assert OutboxMessage.objects.count() == 4  # nothing yet
    done = client.post(URL + "?queue=low", {**data, "confirm": "yes"}, follow=True)
    assert "Cancelled: 3 jobs." in done.content.decode()
    assert list(OutboxMessage.objects.values_list("task_id", flat=True)) == ["keep"]
    assert DeadLetter.objects.filter(reason="cancelled", status="discarded").count() == 3
    audit = JobAction.objects.get()
    assert (audit.action, audit.count, sorted(audit.task_ids)) == ("cancel", 3, ["c-0", "c-1", "c-2"])


def test_a_view_only_user_sees_no_actions_and_cannot_act(client, watcher):
    row = add("v-1", State.SCHEDULED, not_before=timezone.now() + timedelta(hours=1))
    html = client.get(URL).content.decode()
    assert "cancel_selected" not in html
    assert "run_now_selected" not in html
    assert "/act/" not in client.get(f"{URL}{row.pk}/change/").content.decode()
    assert client.post(f"{URL}{row.pk}/act/cancel/", {"confirm": "yes"}).status_code == 403
    client.post(URL, {"action": "cancel_selected", "index": 0, ACTION_CHECKBOX_NAME: [row.pk], "confirm": "yes"})
    assert OutboxMessage.objects.filter(pk=row.pk).exists()
    dashboard = client.post("/admin/jobs/dashboard/", {"action": "pause_queue", "queue": "low"})
    assert dashboard.status_code == 403
    assert not PausedQueue.objects.exists()


def test_staff_without_view_job_do_not_see_the_jobs_page(client, django_user_model):
    client.force_login(django_user_model.objects.create_user("plain", password="pw", is_staff=True))
    assert client.get(URL).status_code == 403


def test_queues_are_paused_and_resumed_from_the_dashboard(client, operator):
    page = client.get("/admin/jobs/dashboard/").content.decode()
    assert 'id="pause-low"' in page
    client.post("/admin/jobs/dashboard/", {"action": "pause_queue", "queue": "low"})
    assert PausedQueue.objects.get().paused_by == "admin:op"
    page = client.get("/admin/jobs/dashboard/").content.decode()
    assert 'id="resume-low"' in page
    assert "paused by admin:op" in page
    assert "low (paused)" in client.get(URL).content.decode()
    client.post("/admin/jobs/dashboard/", {"action": "resume_queue", "queue": "low"})
    assert not PausedQueue.objects.exists()
    assert list(JobAction.objects.order_by("pk").values_list("action", flat=True)) == ["pause_queue", "resume_queue"]


def test_the_audit_log_is_read_only(client, operator, django_user_model):
    admin_user = django_user_model.objects.create_superuser("root", password="pw")
    client.force_login(admin_user)
    row = add("z-1")
    client.post(URL, {"action": "cancel_selected", "index": 0, ACTION_CHECKBOX_NAME: [row.pk], "confirm": "yes"})
    audit = client.get("/admin/jobs/jobaction/").content.decode()
    assert "admin:root" in audit
    assert client.get("/admin/jobs/jobaction/add/").status_code == 403


@pytest.fixture
def schedule():
    from django_celery_beat.models import IntervalSchedule, PeriodicTask

    every = IntervalSchedule.objects.create(every=10, period=IntervalSchedule.SECONDS)
    return PeriodicTask.objects.create(name="ping often", task="jobs.ping", interval=every, queue="low")


def test_schedules_are_paused_resumed_and_run_from_the_dashboard_audited(client, operator, schedule):
    grant(operator, "django_celery_beat.view_periodictask", "django_celery_beat.change_periodictask")
    page = client.get("/admin/jobs/dashboard/").content.decode()
    assert f'id="pause-schedule-{schedule.pk}"' in page

    client.post("/admin/jobs/dashboard/", {"action": "pause_schedule", "schedule": schedule.pk})
    schedule.refresh_from_db()
    assert schedule.enabled is False
    client.post("/admin/jobs/dashboard/", {"action": "resume_schedule", "schedule": schedule.pk})
    schedule.refresh_from_db()
    assert schedule.enabled is True

    client.post("/admin/jobs/dashboard/", {"action": "run_schedule", "schedule": schedule.pk})
    job = OutboxMessage.objects.get(task_name="jobs.ping")  # through the job table, like beat's runs
    assert job.queue == "low"
    assert job.options["headers"]["periodic_task_name"] == "ping often"
    audit = list(JobAction.objects.order_by("pk").values_list("action", "target", "actor"))
    assert audit == [
        ("pause_schedule", "ping often", "admin:op"),
        ("resume_schedule", "ping often", "admin:op"),
        ("run_schedule", "ping often", "admin:op"),
    ]


def test_a_schedule_viewer_cannot_steer_it(client, watcher, schedule):
    grant(watcher, "django_celery_beat.view_periodictask")
    assert "pause-schedule" not in client.get("/admin/jobs/dashboard/").content.decode()
    response = client.post("/admin/jobs/dashboard/", {"action": "run_schedule", "schedule": schedule.pk})
    assert response.status_code == 403
    assert not OutboxMessage.objects.exists()


def test_beats_own_run_action_goes_through_the_job_table_audited(client, django_user_model, schedule):
    client.force_login(django_user_model.objects.create_superuser("root", password="pw"))
    client.post(
        "/admin/django_celery_beat/periodictask/",
        {"action": "run_tasks", "index": 0, ACTION_CHECKBOX_NAME: [schedule.pk]},
    )
    assert OutboxMessage.objects.filter(task_name="jobs.ping").count() == 1
    assert JobAction.objects.get().action == "run_schedule"
    client.post(
        "/admin/django_celery_beat/periodictask/",
        {"action": "disable_tasks", "index": 0, ACTION_CHECKBOX_NAME: [schedule.pk]},
    )
    schedule.refresh_from_db()
    assert schedule.enabled is False


def test_each_schedule_shows_its_last_runs_and_how_late_each_started(client, operator, schedule):
    import json

    from django_celery_results.models import TaskResult

    grant(operator, "django_celery_beat.view_periodictask")
    now = timezone.now()
    for n, late in enumerate((2, 75)):
        TaskResult.objects.create(
            task_id=f"run-{n}",
            task_name="jobs.ping",
            periodic_task_name="ping often",
            status="SUCCESS",
            meta=json.dumps({"due_at": (now - timedelta(minutes=n) - timedelta(seconds=late)).isoformat()}),
            date_started=now - timedelta(minutes=n),
            date_done=now - timedelta(minutes=n),
        )
    page = client.get("/admin/jobs/dashboard/").content.decode()
    runs = page[page.index('class="runs"') :]
    runs = runs[: runs.index("</td>")]
    assert runs.count("success") == 2
    assert "2 s" in runs
    assert "1 min 15 s" in runs
