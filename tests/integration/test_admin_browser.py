"""The dead-letter admin in a real headless Chromium: log in, select, requeue with confirmation,
discard, and requeue a group from the grouped view."""

from __future__ import annotations

import pytest

from jobs.models import DeadLetter
from tests.integration.conftest import admin_login
from tests.jobs.factories import DeadLetterFactory

pytestmark = [pytest.mark.django_db(transaction=True), pytest.mark.integration]


def test_requeue_and_discard_through_the_admin(browser, live_server, django_user_model, redis_client):
    django_user_model.objects.create_superuser("ops", "ops@example.com", "a-long-password-1")
    first, second = DeadLetterFactory.create_batch(2, task_name="mailer.send_email", exception_type="SMTPDataError")
    third = DeadLetterFactory(task_name="thumbnails.generate", exception_type="UnidentifiedImageError")

    page = browser.new_page()
    page.set_default_timeout(30_000)
    admin_login(page, live_server, "/admin/jobs/deadletter/", "ops", "a-long-password-1")
    page.wait_for_selector("#result_list")

    # Requeue two rows: the action asks first, then reports.
    page.check(f"input[name=_selected_action][value='{first.pk}']")
    page.check(f"input[name=_selected_action][value='{second.pk}']")
    page.select_option("select[name=action]", "requeue_selected")
    page.click("button[name=index]")
    page.wait_for_selector("text=Requeue 2 pending dead letters?")
    assert DeadLetter.objects.filter(status="pending").count() == 3
    page.click("input[value='Yes, requeue']")
    page.wait_for_selector("text=Requeued 2 dead letters.")
    assert redis_client.llen("normal") == 2
    assert set(DeadLetter.objects.filter(status="requeued").values_list("pk", flat=True)) == {first.pk, second.pk}

    # The grouped view requeues the remaining group in one click.
    page.click("text=Grouped view")
    page.wait_for_selector("#dead-letter-groups")
    assert "UnidentifiedImageError" in page.inner_text("#dead-letter-groups")
    page.click("input[value='Requeue 1']")
    page.wait_for_selector("text=Requeued 1 dead letter.")
    third.refresh_from_db()
    assert third.status == DeadLetter.Status.REQUEUED

    # Discard: a new failure, discarded from the list.
    fourth = DeadLetterFactory()
    page.goto(f"{live_server.url}/admin/jobs/deadletter/?status__exact=pending")
    page.check(f"input[name=_selected_action][value='{fourth.pk}']")
    page.select_option("select[name=action]", "discard_selected")
    page.click("button[name=index]")
    page.click("input[value='Yes, discard']")
    page.wait_for_selector("text=Discarded 1 dead letter.")
    fourth.refresh_from_db()
    assert fourth.status == DeadLetter.Status.DISCARDED


def test_the_jobs_page_cancels_with_confirmation_and_the_dashboard_pauses_a_queue(
    browser, live_server, django_user_model
):
    from datetime import timedelta

    from django.utils import timezone

    from jobs.models import JobAction, JobAttempt, OutboxMessage, PausedQueue
    from tests.integration.test_console_browser import screenshot
    from tests.jobs.test_job_api import add

    user = django_user_model.objects.create_user("op", password="a-long-password-1", is_staff=True)
    from tests.conftest import grant

    grant(user, "jobs.view_job", "jobs.change_job")
    now = timezone.now()
    add("invoice-42", OutboxMessage.State.SCHEDULED, not_before=now + timedelta(hours=3), args=[42])
    add("mail-7", OutboxMessage.State.RETRYABLE, not_before=now + timedelta(minutes=4), retries=2)
    JobAttempt.objects.create(
        task_id="mail-7", task_name="mailer.send_email", attempt=1, outcome="retried", error="SMTPServerDisconnected"
    )
    add("thumb-3", task_name="thumbnails.generate", options={"queue": "normal", "headers": {}})
    add(
        "report-1",
        OutboxMessage.State.EXECUTING,
        task_name="jobs.daily_report",
        lease_owner="worker1@web-2:311:a1",
        started_at=now - timedelta(minutes=2),
        lease_until=now + timedelta(seconds=15),
    )

    page = browser.new_page(viewport={"width": 1400, "height": 900})
    page.set_default_timeout(30_000)
    admin_login(page, live_server, "/admin/jobs/job/", "op", "a-long-password-1")
    page.wait_for_selector("#result_list")
    assert "SMTPServerDisconnected" in page.inner_text("#result_list")
    screenshot(page, "jobs")

    row = OutboxMessage.objects.get(task_id="invoice-42")
    page.check(f"input[name=_selected_action][value='{row.pk}']")
    page.select_option("select[name=action]", "cancel_selected")
    page.click("button[name=index]")
    page.wait_for_selector("text=Cancel 1 job?")
    assert OutboxMessage.objects.filter(task_id="invoice-42").exists()
    page.click("input[value='Yes, cancel']")
    page.wait_for_selector("text=Cancelled: 1 job.")
    assert not OutboxMessage.objects.filter(task_id="invoice-42").exists()
    assert JobAction.objects.get().actor == "admin:op"

    page.goto(f"{live_server.url}/admin/jobs/job/{OutboxMessage.objects.get(task_id='mail-7').pk}/change/")
    page.wait_for_selector("text=SMTPServerDisconnected")
    screenshot(page, "job")

    page.goto(f"{live_server.url}/admin/jobs/dashboard/")
    page.click("#pause-low")
    page.wait_for_selector("text=Queue low paused")
    assert PausedQueue.objects.get().queue == "low"

    # The schedule form: a crontab's meaning under its field, and no "undefined" for the empty choice.
    from django_celery_beat.models import CrontabSchedule

    crontab = CrontabSchedule.objects.create(minute="0", hour="7")
    grant(user, "django_celery_beat.add_periodictask", "django_celery_beat.view_periodictask")
    page.goto(f"{live_server.url}/admin/django_celery_beat/periodictask/add/")
    page.select_option("#id_crontab", str(crontab.pk))
    page.wait_for_selector(".field-crontab .help >> text=Translation: At 07:00")
    page.select_option("#id_crontab", "")
    assert "undefined" not in page.inner_text(".field-crontab .help")


def test_a_queue_paused_and_resumed_from_the_dashboard_while_a_worker_runs(
    browser, live_server, django_user_model, start_worker, redis_client
):
    import time
    import uuid

    from jobs.runtime.outbox import enqueue
    from tests.integration import tasks
    from tests.integration.conftest import wait_for

    django_user_model.objects.create_superuser("ops", "ops@example.com", "a-long-password-1")
    start_worker(concurrency=1)
    page = browser.new_page(viewport={"width": 1400, "height": 900})
    page.set_default_timeout(30_000)
    admin_login(page, live_server, "/admin/jobs/dashboard/", "ops", "a-long-password-1")
    page.click("#pause-low")
    page.wait_for_selector("text=Queue low paused")
    assert "paused by admin:ops" in page.inner_text("#queue-low")

    key = f"browser-pause-{uuid.uuid4().hex}"
    enqueue(tasks.record_order, args=[key, "low"], queue="low")
    enqueue(tasks.record_order, args=[key, "high"], queue="high")
    wait_for(lambda: redis_client.lrange(key, 0, -1) == [b"high"], timeout=20)
    time.sleep(2 * 2.0)  # two of the worker's reads of the paused queues
    assert redis_client.lrange(key, 0, -1) == [b"high"]

    page.click("#resume-low")
    page.wait_for_selector("text=Queue low resumed")
    wait_for(lambda: redis_client.lrange(key, 0, -1) == [b"high", b"low"], timeout=20)
