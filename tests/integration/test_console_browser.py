"""The newcomer's and the operator's pages in a real headless Chromium: the front page and the
dead-letter page. Screenshots go to var/screenshots/ (docs/screenshots/ with UPDATE_SCREENSHOTS=1:
the ones kept in docs/ are made this way)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from config.env import BASE_DIR
from jobs.models import DeadLetter
from mailer.models import Email
from tests.integration.conftest import admin_login
from tests.jobs.factories import DeadLetterFactory

pytestmark = [pytest.mark.django_db(transaction=True), pytest.mark.integration]

SCREENSHOTS = BASE_DIR / ("docs/screenshots" if os.environ.get("UPDATE_SCREENSHOTS") else "var/screenshots")


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
    email = Email.objects.create(from_email="a@example.com", template="welcome", subject="Hi", to=["b@example.com"])
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
        "/admin/jobs/outboxmessage/",
    ):
        page.goto(f"{live_server.url}{path}")
        page.wait_for_selector("#content-main")
        width = page.evaluate("document.documentElement.scrollWidth")
        if width > 1400:
            wide[path] = width
    screenshot(page, "admin-list")
    assert wide == {}
