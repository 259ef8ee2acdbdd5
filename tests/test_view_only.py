"""A view-only staff member reads everything and changes nothing: every staff write of the API
answers 403 naming the permission it takes, no admin list offers them an action, and the
dashboard's buttons refuse them; nothing in the database or the broker changes."""

from __future__ import annotations

import base64
import json
from datetime import timedelta

import pytest
from django.contrib import admin
from django.contrib.auth.models import Permission
from django.test import RequestFactory
from django.utils import timezone

from jobs.models import DeadLetter, JobAction, OutboxMessage, PausedQueue
from tests.jobs.factories import DeadLetterFactory

pytestmark = pytest.mark.django_db

#: Every staff write of the site's API, with the permission it takes.
API_WRITES = [
    ("/api/emails/", {"template": "welcome", "to": ["a@example.com"], "context": {"name": "A"}}, "mailer.add_email"),
    ("/api/emails/purge/", {"older_than_days": 90}, "mailer.delete_email"),
    ("/api/jobs/dead-letters/requeue/", {"all": True}, "jobs.change_deadletter"),
    ("/api/jobs/dead-letters/{dead_letter}/requeue/", None, "jobs.change_deadletter"),
    ("/api/jobs/dead-letters/{dead_letter}/discard/", None, "jobs.change_deadletter"),
    ("/api/jobs/jobs/{job}/cancel/", None, "jobs.change_job"),
    ("/api/jobs/jobs/{job}/run-now/", None, "jobs.change_job"),
    ("/api/jobs/jobs/{dead_job}/retry/", None, "jobs.change_job"),
    ("/api/jobs/queues/low/pause/", None, "jobs.change_job"),
    ("/api/jobs/queues/low/resume/", None, "jobs.change_job"),
]

DASHBOARD_BUTTONS = [
    {"action": "requeue", "task": "tests.permanent", "exception": "PermanentError"},
    {"action": "discard", "task": "tests.permanent", "exception": "PermanentError"},
    {"action": "pause_queue", "queue": "low"},
    {"action": "resume_queue", "queue": "low"},
    {"action": "pause_schedule", "schedule": "{schedule}"},
    {"action": "run_schedule", "schedule": "{schedule}"},
]


@pytest.fixture
def viewer(django_user_model):
    """Staff with every view permission of the site and none other."""
    user = django_user_model.objects.create_user("viewer", password="pw", is_staff=True)
    user.user_permissions.set(Permission.objects.filter(codename__startswith="view_"))
    return django_user_model.objects.get(pk=user.pk)


@pytest.fixture
def world():
    from django_celery_beat.models import IntervalSchedule, PeriodicTask

    from jobs.runtime import store

    letter = DeadLetterFactory(task_id="dead-1", task_name="tests.permanent", exception_type="PermanentError")
    job = store.job_add(
        task_name="jobs.ping",
        task_id="job-1",
        args=[],
        kwargs={},
        options={"queue": "low"},
        not_before=timezone.now() + timedelta(hours=1),
    )
    every = IntervalSchedule.objects.create(every=10, period=IntervalSchedule.SECONDS)
    schedule = PeriodicTask.objects.create(name="ping", task="jobs.ping", interval=every)
    return {"dead_letter": letter.pk, "job": job.task_id, "dead_job": letter.task_id, "schedule": schedule.pk}


def state() -> tuple:
    from django_celery_beat.models import PeriodicTask

    from mailer.models import Email

    return (
        list(OutboxMessage.objects.values_list("task_id", "state", "published_at").order_by("pk")),
        list(DeadLetter.objects.values_list("pk", "status").order_by("pk")),
        list(PeriodicTask.objects.values_list("name", "enabled").order_by("pk")),
        Email.objects.count(),
        PausedQueue.objects.count(),
        JobAction.objects.count(),
    )


@pytest.mark.parametrize(("path", "body", "permission"), API_WRITES)
def test_every_api_write_is_403_naming_its_permission(client, viewer, world, redis_client, path, body, permission):
    before = state()
    auth = "Basic " + base64.b64encode(b"viewer:pw").decode()
    response = client.post(
        path.format(**world),
        data=json.dumps(body) if body is not None else "",
        content_type="application/json",
        CONTENT_TYPE="application/json",
        HTTP_AUTHORIZATION=auth,
    )
    assert response.status_code == 403, response.content
    assert response.json()["permission"] == permission
    assert state() == before
    assert redis_client.dbsize() == 0  # nothing was published


def test_no_admin_list_offers_a_view_only_user_an_action(viewer):
    request = RequestFactory().get("/admin/")
    request.user = viewer
    offered = {
        f"{model._meta.label}: {name}"
        for model, model_admin in admin.site._registry.items()
        for name in model_admin.get_actions(request)
    }
    assert offered == set()


@pytest.mark.parametrize("button", DASHBOARD_BUTTONS)
def test_every_dashboard_button_refuses_a_view_only_user(client, viewer, world, button):
    client.force_login(viewer)
    before = state()
    response = client.post("/admin/jobs/dashboard/", {k: str(v).format(**world) for k, v in button.items()})
    assert response.status_code == 403
    assert state() == before


def test_a_view_only_user_reads_the_pages(client, viewer, world):
    client.force_login(viewer)
    for path in ("/admin/jobs/job/", "/admin/jobs/deadletter/", "/admin/jobs/dashboard/", "/admin/jobs/jobaction/"):
        assert client.get(path).status_code == 200, path
    auth = {"HTTP_AUTHORIZATION": "Basic " + base64.b64encode(b"viewer:pw").decode()}
    assert client.get("/api/jobs/jobs/job-1/", **auth).json()["state"] == "scheduled"
