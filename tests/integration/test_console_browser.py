"""The newcomer's and the operator's pages in a real headless Chromium: the front page, the
dead-letter page and the dashboard. Screenshots of what the tests saw go to var/screenshots/ (the
README's, in docs/screenshots/, are of a `make run` site with real work: `make screenshots`)."""

from __future__ import annotations

from pathlib import Path

import pytest
from django.core.management import call_command

from config.env import BASE_DIR
from jobs.heartbeat import heartbeat_read
from jobs.models import DeadLetter
from jobs.tasks import heartbeat
from mailer.models import Email
from tests.integration import tasks
from tests.integration.conftest import admin_login, wait_for
from tests.jobs.factories import DeadLetterFactory

pytestmark = [pytest.mark.django_db(transaction=True), pytest.mark.integration]

SCREENSHOTS = BASE_DIR / "var/screenshots"


def screenshot(page, name: str) -> Path:
    SCREENSHOTS.mkdir(parents=True, exist_ok=True)
    path = SCREENSHOTS / f"{name}.png"
    page.screenshot(path=str(path), full_page=True)
    return path


def test_a_newcomer_finds_the_upload_page_the_admin_and_the_api_from_the_front_page(browser, live_server):
    page = browser.new_page(viewport={"width": 1280, "height": 900})
    page.set_default_timeout(30_000)
    page.goto(f"{live_server.url}/")
    assert page.inner_text("h1") == "jobsite"
    assert page.is_visible("#api")
    assert "POST /api/thumbnails/" in page.inner_text("table")
    assert screenshot(page, "front-page").stat().st_size > 10_000
    page.click("nav a[href='/thumbnails/']")
    page.wait_for_selector("#upload-form")
    page.go_back()
    page.click("nav a[href='/admin/']")
    page.wait_for_selector("#id_username")  # the admin's login, branded
    assert "jobsite administration" in page.content()


def test_an_operator_acts_on_a_dead_letter_from_its_page(browser, live_server, django_user_model, redis_client):
    django_user_model.objects.create_superuser("ops", "ops@example.com", "a-long-password-1")
    email = Email.objects.create(
        from_email="a@example.com",
        template="welcome",
        subject="Hi",
        to=["b@example.com"],
        body_html="<h1>Welcome</h1>" + "<p>A paragraph.</p>" * 40,
    )
    dead = DeadLetterFactory(
        task_name="mailer.send_email",
        args=[email.pk],
        exception_type="SMTPDataError",
        exception_message="(554, b'message rejected')",
        reason=DeadLetter.Reason.PERMANENT_ERROR,
    )
    page = browser.new_page(viewport={"width": 1400, "height": 1000})
    page.set_default_timeout(30_000)
    admin_login(page, live_server, f"/admin/jobs/deadletter/{dead.pk}/change/", "ops", "a-long-password-1")
    page.wait_for_selector("#dead-letter-actions")
    assert page.locator("input[name=_save]").count() == 0  # read-only: nothing to save
    assert "failed with a permanent error" in page.inner_text("#dead-letter-actions")
    assert page.is_visible(f"a[href='/admin/mailer/email/{email.pk}/change/']")
    screenshot(page, "dead-letter")

    page.click("#requeue-button")
    page.wait_for_selector("text=Requeue 1 pending dead letter?")
    assert "permanent error" in page.content()
    page.click("input[value='Yes, requeue']")
    page.wait_for_selector("text=Requeued 1 dead letter.")
    dead.refresh_from_db()
    assert dead.status == DeadLetter.Status.REQUEUED
    assert redis_client.llen("high") + redis_client.llen("normal") == 1

    # The email's page links back to it.
    page.goto(f"{live_server.url}/admin/mailer/email/{email.pk}/change/")
    assert page.is_visible(f"a[href='/admin/jobs/deadletter/{dead.pk}/change/']")
    preview = page.locator("iframe[title='HTML part']").bounding_box()
    assert preview["height"] >= 400  # the email's HTML preview is not cut to 300 px


def test_the_admin_lists_fit_a_1400_pixel_screen(browser, live_server, django_user_model):
    """Long task names, messages and addresses are cut in the lists, not the page widened."""
    django_user_model.objects.create_superuser("ops", "ops@example.com", "a-long-password-1")
    long = "x" * 300
    DeadLetterFactory(task_name="mailer.send_email_with_a_rather_long_name", exception_message=long)
    Email.objects.create(
        from_email="a@example.com", template="welcome", subject="S" * 300, to=[f"{'r' * 60}@example.com"] * 5
    )
    page = browser.new_page(viewport={"width": 1400, "height": 900})
    page.set_default_timeout(30_000)
    admin_login(page, live_server, "/admin/", "ops", "a-long-password-1")
    page.wait_for_selector("#content-main")
    wide = {}
    for path in (
        "/admin/jobs/deadletter/",
        "/admin/mailer/email/",
        "/admin/thumbnails/image/",
        "/admin/django_celery_results/taskresult/",
        "/admin/django_celery_beat/periodictask/",
        "/admin/jobs/job/",
    ):
        page.goto(f"{live_server.url}{path}")
        page.wait_for_selector("#content-main")
        width = page.evaluate("document.documentElement.scrollWidth")
        if width > 1400:
            wide[path] = width
    screenshot(page, "admin-list")
    assert wide == {}


def test_the_dashboard_shows_a_live_system_reads_itself_again_and_acts_on_a_cause(
    browser, live_server, django_user_model, start_worker, monkeypatch
):
    from jobs import dashboard

    monkeypatch.setattr(dashboard, "REFRESH_SECONDS", 2)  # the live server runs in this process
    django_user_model.objects.create_superuser("ops", "ops@example.com", "a-long-password-1")
    call_command("setup_schedules", verbosity=0)
    worker = start_worker()
    tasks.slow.delay("dashboard", 60)  # still running when the page asks the worker
    for key in ("a", "b"):
        tasks.permanent.delay(f"dashboard-{key}")
    heartbeat.delay()  # the worker's heartbeat, as beat would send it
    wait_for(lambda: DeadLetter.objects.filter(task_name="tests.permanent").count() == 2)
    wait_for(lambda: heartbeat_read("worker"))

    page = browser.new_page(viewport={"width": 1400, "height": 1000})
    page.set_default_timeout(30_000)
    admin_login(page, live_server, "/admin/", "ops", "a-long-password-1")
    page.click("a[href='/admin/jobs/dashboard/']")  # listed in the admin index
    page.wait_for_selector("#dashboard #workers")
    assert "Worker heartbeat\n" in page.inner_text("#health")
    assert page.locator("#health b.ok").first.inner_text().endswith("s ago")  # fresh: the worker ran it
    workers = page.inner_text("#workers")
    assert worker.name.split("@")[0] in workers
    assert "prefork (2 processes)" in workers
    assert "tests.slow" in workers  # what it runs now
    assert "1 / 2" in workers
    assert "tests.permanent" in page.inner_text("#dead-letter-causes")
    assert "jobs.heartbeat" in page.inner_text("#schedules")
    assert page.evaluate("document.documentElement.scrollWidth") <= 1400

    # It reads itself again: a new cause shows up without a reload.
    DeadLetterFactory(task_name="thumbnails.generate", exception_type="OSError")
    page.wait_for_selector("#dead-letter-causes >> text=thumbnails.generate", timeout=15_000)
    assert int(page.get_attribute("#dashboard", "data-reads")) >= 1
    screenshot(page, "dashboard")

    # One cause discarded in one click (and a confirmation).
    page.once("dialog", lambda dialog: dialog.accept())
    page.click("#dead-letter-causes tr:has-text('tests.permanent') button[value=discard]")
    page.wait_for_selector("text=Discarded 2 dead letters.")
    assert set(DeadLetter.objects.filter(task_name="tests.permanent").values_list("status", flat=True)) == {
        DeadLetter.Status.DISCARDED
    }
