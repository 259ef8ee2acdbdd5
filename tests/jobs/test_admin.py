"""The dead-letter admin through the Django test client."""

from __future__ import annotations

import pytest
from django.contrib.admin.helpers import ACTION_CHECKBOX_NAME
from django.db import connection
from django.test.utils import CaptureQueriesContext
from django.urls import reverse

from jobs.models import DeadLetter
from tests.conftest import grant, results_table
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


def _form_fields(html: str, form_id: str) -> dict[str, str]:
    """The hidden inputs and the buttons of the form inside the element `form_id`."""
    import re

    start = html.index(f'id="{form_id}"')
    form = html[start : html.index("</form>", start)]
    fields = dict(re.findall(r'<input type="hidden" name="([^"]+)" value="([^"]*)"', form))
    fields["buttons"] = ",".join(re.findall(r'<button type="submit" name="action" value="([^"]+)"', form))
    return fields


def test_a_dead_letters_page_is_read_only_with_requeue_and_discard_that_ask_first(staff, redis_client):
    row = DeadLetterFactory(reason=DeadLetter.Reason.UNEXPECTED_ERROR)
    html = staff.get(reverse("admin:jobs_deadletter_change", args=[row.pk])).content.decode()
    for save in ('name="_save"', 'name="_continue"', 'name="_addanother"', "deletelink"):
        assert save not in html
    fields = _form_fields(html, "dead-letter-actions")
    assert fields["buttons"] == "requeue_selected,discard_selected"
    assert fields[ACTION_CHECKBOX_NAME] == str(row.pk)
    assert "permanent error" not in html  # no warning for an unexpected error

    # The button posts the list's action: the same confirmation page, then the same audit.
    post = {ACTION_CHECKBOX_NAME: row.pk, "index": "0", "select_across": "0", "action": "requeue_selected"}
    page = staff.post(CHANGELIST, post)
    assert "Requeue <strong>1</strong> pending dead letter?" in page.content.decode()
    staff.post(CHANGELIST, {ACTION_CHECKBOX_NAME: row.pk, "action": "requeue_selected", "confirm": "yes"})
    row.refresh_from_db()
    assert row.status == DeadLetter.Status.REQUEUED
    assert row.events.filter(action="requeued", actor="admin:admin").exists()
    html = staff.get(reverse("admin:jobs_deadletter_change", args=[row.pk])).content.decode()
    assert 'id="dead-letter-actions"' not in html  # nothing left to act on


def test_requeueing_a_permanent_failure_is_warned_about_on_the_page_and_when_confirming(staff):
    row = DeadLetterFactory(reason=DeadLetter.Reason.PERMANENT_ERROR)
    html = staff.get(reverse("admin:jobs_deadletter_change", args=[row.pk])).content.decode()
    assert "failed with a permanent error" in html
    page = staff.post(CHANGELIST, {"action": "requeue_selected", ACTION_CHECKBOX_NAME: [row.pk]}).content.decode()
    assert "1 of the 1 failed with a permanent error" in page
    discard = staff.post(CHANGELIST, {"action": "discard_selected", ACTION_CHECKBOX_NAME: [row.pk]}).content.decode()
    assert "permanent error" not in discard  # discarding it is what it calls for


def test_redaction_reads_as_a_sentence(staff):
    kept = DeadLetterFactory(redacted=False)
    hidden = DeadLetterFactory(redacted=True)
    assert (
        "stored as the job had them"
        in staff.get(reverse("admin:jobs_deadletter_change", args=[kept.pk])).content.decode()
    )
    text = staff.get(reverse("admin:jobs_deadletter_change", args=[hidden.pk])).content.decode()
    assert "cannot be requeued as it was" in text


def test_a_dead_letter_links_the_row_its_job_was_about_and_that_row_links_back(staff):
    from mailer.models import Email

    email = Email.objects.create(from_email="a@example.com", template="welcome", subject="Hi", to=["b@example.com"])
    row = DeadLetterFactory(task_name="mailer.send_email", args=[email.pk], kwargs={})
    by_keyword = DeadLetterFactory(task_name="mailer.send_email", args=[], kwargs={"email_id": email.pk})
    DeadLetterFactory(task_name="mailer.send_email", args=[email.pk + 1])  # another email's
    html = staff.get(reverse("admin:jobs_deadletter_change", args=[row.pk])).content.decode()
    assert f'<a href="/admin/mailer/email/{email.pk}/change/">Email #{email.pk}</a>' in html

    back = staff.get(f"/admin/mailer/email/{email.pk}/change/").content.decode()
    assert f'href="/admin/jobs/deadletter/{row.pk}/change/"' in back
    assert f'href="/admin/jobs/deadletter/{by_keyword.pk}/change/"' in back
    import re

    assert len(re.findall(r'href="/admin/jobs/deadletter/\d+/change/"', back)) == 2  # not the other email's

    gone = DeadLetterFactory(task_name="mailer.send_email", args=[999_999])
    assert (
        "Email #999999 (deleted)" in staff.get(reverse("admin:jobs_deadletter_change", args=[gone.pk])).content.decode()
    )
    other = DeadLetterFactory(task_name="tests.unregistered", args=[1])
    assert (
        "The job&#x27;s object" in staff.get(reverse("admin:jobs_deadletter_change", args=[other.pk])).content.decode()
    )


def test_a_view_only_staff_user_cannot_run_or_stop_schedules(client, django_user_model):
    """django-celery-beat's actions (enable, disable, toggle, run now) declare no permission, so
    Django offered them to anyone who could see the list: here they take the change permission."""
    from django_celery_beat.models import IntervalSchedule, PeriodicTask

    every, _ = IntervalSchedule.objects.get_or_create(every=60, period=IntervalSchedule.SECONDS)
    task = PeriodicTask.objects.create(name="nightly", task="jobs.ping", interval=every)
    viewer = grant(
        django_user_model.objects.create_user("schedules", password="pw", is_staff=True),
        "django_celery_beat.view_periodictask",
    )
    client.force_login(viewer)
    url = "/admin/django_celery_beat/periodictask/"
    page = client.get(url)
    assert page.status_code == 200
    assert "nightly" in page.content.decode()
    assert 'value="disable_tasks"' not in page.content.decode()
    client.post(url, {"action": "disable_tasks", ACTION_CHECKBOX_NAME: [task.pk]})
    assert PeriodicTask.objects.get(pk=task.pk).enabled

    client.force_login(grant(viewer, "django_celery_beat.change_periodictask"))
    assert 'value="disable_tasks"' in client.get(url).content.decode()
    client.post(url, {"action": "disable_tasks", ACTION_CHECKBOX_NAME: [task.pk]})
    assert not PeriodicTask.objects.get(pk=task.pk).enabled


def test_a_hosts_own_schedules_admin_is_left_in_place():
    from django.contrib import admin
    from django_celery_beat.models import PeriodicTask

    from jobs.admin import PeriodicTaskAdmin, _guard_schedule_actions

    class HostAdmin(admin.ModelAdmin):
        pass

    assert type(admin.site.get_model_admin(PeriodicTask)) is PeriodicTaskAdmin
    admin.site.unregister(PeriodicTask)
    admin.site.register(PeriodicTask, HostAdmin)
    try:
        _guard_schedule_actions()
        assert type(admin.site.get_model_admin(PeriodicTask)) is HostAdmin
    finally:
        admin.site.unregister(PeriodicTask)
        admin.site.register(PeriodicTask, PeriodicTaskAdmin)


def test_the_schedule_form_offers_the_registered_tasks_and_explains_an_empty_crontab(admin_client):
    """A new user saw "Task (registered)" empty and "Translation: undefined" under the crontab."""
    html = admin_client.get("/admin/django_celery_beat/periodictask/add/").content.decode()
    select = html[html.index('name="regtask"') : html.index("</select>", html.index('name="regtask"'))]
    for name in ("jobs.heartbeat", "jobs.daily_report", "mailer.send_email", "thumbnails.generate"):
        assert f'value="{name}"' in select
    assert 'id="jobs-crontab-help"' in html  # the help without "undefined" (checked in Chromium too)
