"""Alert digests and the system checks."""

from __future__ import annotations

import json

import pytest
from django.core import mail

from jobs import alerts, checks
from jobs.models import DeadLetter
from jobs.services import dead_letter_record
from jobs.tasks import dead_letter_digest
from tests.jobs.factories import DeadLetterFactory

pytestmark = pytest.mark.django_db


def _record(**kw):
    return dead_letter_record(
        task_name="t.x", task_id="1", queue="normal", args=[], kwargs={}, exc_type="E", exc_message="m",
        traceback="", retries=0, reason="permanent_error", **kw,
    )  # fmt: skip


@pytest.fixture
def alerting(settings, redis_client):
    settings.DEAD_LETTER_ALERT_EMAILS = ["ops@example.com"]
    return settings


def test_no_recipients_no_digest(settings, redis_client):
    settings.DEAD_LETTER_ALERT_EMAILS = []
    _record()
    assert redis_client.llen("high") == 0


def test_first_dead_letter_schedules_one_digest_per_interval(alerting, redis_client):
    _record()
    _record()
    messages = [json.loads(m) for m in redis_client.lrange("high", 0, -1)]
    # A countdown message waits in the queue with its ETA; only one for the burst.
    assert [m["headers"]["task"] for m in messages] == ["jobs.dead_letter_digest"]
    assert messages[0]["headers"]["eta"]


def test_a_dead_letter_of_the_alerting_task_never_alerts(alerting, redis_client):
    _record(alert=False)
    assert redis_client.llen("high") == 0
    assert dead_letter_digest.alert_on_dead_letter is False


def test_digest_groups_new_dead_letters(alerting, redis_client):
    DeadLetterFactory.create_batch(2, task_name="mailer.send_email", exception_type="SMTPDataError")
    DeadLetterFactory(task_name="thumbnails.generate", exception_type="UnidentifiedImageError")
    DeadLetterFactory(status=DeadLetter.Status.DISCARDED)
    assert dead_letter_digest() == 3
    assert len(mail.outbox) == 1
    body = mail.outbox[0].body
    assert mail.outbox[0].to == ["ops@example.com"]
    assert mail.outbox[0].subject == "[jobs] 3 new dead letter(s)"
    assert body.index("mailer.send_email") < body.index("thumbnails.generate")
    # Nothing new since: no second mail.
    assert dead_letter_digest() == 0
    assert len(mail.outbox) == 1


def test_digest_without_recipients_sends_nothing(settings):
    settings.DEAD_LETTER_ALERT_EMAILS = []
    DeadLetterFactory()
    assert alerts.dead_letter_digest_send() == 0


def test_schedule_failure_is_swallowed(alerting, monkeypatch):
    def broken(*a, **k):
        raise ConnectionError("cache down")

    monkeypatch.setattr(alerts.cache, "add", broken)
    assert alerts.dead_letter_alert_schedule() is False


def ids(settings_obj) -> set[str]:
    return {p.id for p in checks.check_task_settings()}


def test_defaults_pass_the_checks(settings):
    settings.DEBUG = True
    assert ids(settings) == set()


def test_risky_combinations_warn(settings):
    settings.DEBUG = False
    settings.FLOWER_BASIC_AUTH = ""
    settings.TASK_MAX_RETRIES = 10
    settings.CELERY_TASK_TIME_LIMIT = 7200
    settings.CELERY_TASK_SOFT_TIME_LIMIT = 7200
    settings.CELERY_WORKER_SOFT_SHUTDOWN_TIMEOUT = 0
    settings.JOBS_WORKER_LOST_LIMIT = 0
    settings.CELERY_ACCEPT_CONTENT = ["json", "pickle"]
    assert ids(settings) == {"jobs.W001", "jobs.W002", "jobs.W003", "jobs.W004", "jobs.W005", "jobs.W006", "jobs.E001"}


def test_a_task_whose_own_retry_policy_reaches_the_visibility_timeout_is_named(settings, monkeypatch):
    from jobs.tasks import dead_letter_digest

    settings.DEBUG = True
    settings.CELERY_VISIBILITY_TIMEOUT = 3600
    monkeypatch.setattr(dead_letter_digest, "retry_limit", 8)  # 60 s doubling reaches 7680 s
    problems = [p for p in checks.check_task_settings() if p.id == "jobs.W001"]
    assert len(problems) == 1
    assert "jobs.dead_letter_digest" in problems[0].msg


def test_a_cap_the_retries_never_reach_is_not_a_risk(settings):
    settings.DEBUG = True
    settings.TASK_RETRY_BACKOFF_MAX = 7200  # above the timeout, but 5 retries stop at 960 s
    assert "jobs.W001" not in ids(settings)


def test_retry_countdown_of_a_task_stays_below_the_visibility_timeout(settings, monkeypatch):
    from jobs.tasks import dead_letter_digest

    settings.CELERY_VISIBILITY_TIMEOUT = 600
    monkeypatch.setattr(dead_letter_digest, "backoff_base", 500)
    assert dead_letter_digest.retry_countdown(1) >= 500
    assert dead_letter_digest.retry_countdown(3) == pytest.approx(540)  # 2000 s clipped to 90 % of 600 s
    settings.BROKER_IS_REDIS = False  # RabbitMQ has no visibility timeout to stay under
    assert dead_letter_digest.retry_countdown(3) >= 2000
