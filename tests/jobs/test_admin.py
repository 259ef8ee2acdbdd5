"""The dead-letter admin through the Django test client."""

from __future__ import annotations

import pytest
from django.contrib.admin.helpers import ACTION_CHECKBOX_NAME
from django.db import connection
from django.test.utils import CaptureQueriesContext
from django.urls import reverse

from jobs.models import DeadLetter
from tests.conftest import results_table
from tests.jobs.factories import DeadLetterFactory

pytestmark = pytest.mark.django_db

CHANGELIST = "/admin/jobs/deadletter/"


@pytest.fixture
def staff(admin_client):
    return admin_client


def test_changelist_filters_and_search(staff):
    DeadLetterFactory(task_name="thumbnails.generate", request_id="rid-42")
    DeadLetterFactory(task_name="mailer.send_email", status=DeadLetter.Status.DISCARDED)
    response = staff.get(CHANGELIST, {"status__exact": "pending"})
    assert response.status_code == 200
    results = results_table(response)
    assert "thumbnails.generate" in results
    assert "mailer.send_email" not in results
    assert "Grouped view" in response.content.decode()
    response = staff.get(CHANGELIST, {"q": "rid-42"})
    assert "thumbnails.generate" in results_table(response)
    response = staff.get(CHANGELIST, {"q": "no-such-request"})
    assert "thumbnails.generate" not in results_table(response)


def test_changelist_queries_do_not_grow_with_rows(staff):
    def queries() -> int:
        with CaptureQueriesContext(connection) as ctx:
            assert staff.get(CHANGELIST).status_code == 200
        return len(ctx)

    DeadLetterFactory.create_batch(3)
    few = queries()
    DeadLetterFactory.create_batch(60, task_name="other.task", exception_type="KeyError")
    assert queries() == few


def test_detail_page_shows_arguments_and_traceback(staff):
    row = DeadLetterFactory(kwargs={"image_id": 7})
    response = staff.get(reverse("admin:jobs_deadletter_change", args=[row.pk]))
    content = response.content.decode()
    assert response.status_code == 200
    assert "&quot;image_id&quot;: 7" in content
    assert "PermanentError: cannot ever work" in content


def test_no_add(staff):
    assert staff.get("/admin/jobs/deadletter/add/").status_code == 403


def test_requeue_action_asks_then_requeues(staff, redis_client):
    rows = DeadLetterFactory.create_batch(2)
    data = {"action": "requeue_selected", ACTION_CHECKBOX_NAME: [r.pk for r in rows]}
    response = staff.post(CHANGELIST, data)
    assert response.status_code == 200
    assert "Requeue <strong>2</strong> pending dead letters?" in response.content.decode()
    assert redis_client.llen("normal") == 0

    response = staff.post(CHANGELIST, {**data, "confirm": "yes"}, follow=True)
    assert "Requeued 2 dead letters." in response.content.decode()
    assert redis_client.llen("normal") == 2
    assert set(DeadLetter.objects.values_list("requeued_by", flat=True)) == {"admin:admin"}


def test_requeue_action_with_nothing_pending(staff, redis_client):
    row = DeadLetterFactory(status=DeadLetter.Status.REQUEUED)
    data = {"action": "requeue_selected", ACTION_CHECKBOX_NAME: [row.pk], "confirm": "yes"}
    response = staff.post(CHANGELIST, data, follow=True)
    assert "Nothing to requeue" in response.content.decode()


def test_discard_action(staff):
    row = DeadLetterFactory()
    data = {"action": "discard_selected", ACTION_CHECKBOX_NAME: [row.pk], "confirm": "yes"}
    response = staff.post(CHANGELIST, data, follow=True)
    assert "Discarded 1 dead letter." in response.content.decode()
    row.refresh_from_db()
    assert row.status == DeadLetter.Status.DISCARDED


def test_grouped_view_lists_and_requeues_a_group(staff, redis_client):
    DeadLetterFactory.create_batch(3, task_name="a.task", exception_type="TimeoutError")
    DeadLetterFactory(task_name="b.task", exception_type="KeyError")
    url = reverse("admin:jobs_deadletter_groups")
    content = staff.get(url).content.decode()
    assert content.index("a.task") < content.index("b.task")
    assert "Requeue 3" in content

    response = staff.post(url, {"task_name": "a.task", "exception_type": "TimeoutError"}, follow=True)
    assert "Requeued 3 dead letters." in response.content.decode()
    assert DeadLetter.objects.filter(status="pending").count() == 1


def test_grouped_view_needs_staff(client, django_user_model):
    url = reverse("admin:jobs_deadletter_groups")
    assert client.get(url).status_code == 302  # to the login page
    user = django_user_model.objects.create_user("viewer", password="pw", is_staff=True)
    client.force_login(user)
    assert client.get(url).status_code == 403
    assert client.post(url, {"task_name": "x", "exception_type": "y"}).status_code == 403
