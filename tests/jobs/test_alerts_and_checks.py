"""Alert digests and the system checks."""

from __future__ import annotations

import base64
import json
from datetime import datetime, timedelta

import pytest
from django.core import mail

from jobs import alerts, checks
from jobs.models import DeadLetter
from jobs.services import dead_letter_record
from jobs.tasks import dead_letter_digest
from tests.jobs.factories import DeadLetterFactory

pytestmark = pytest.mark.django_db


def _record(task_id="1", **kw):
    return dead_letter_record(
        task_name="t.x",
        task_id=task_id,
        queue="normal",
        args=[],
        kwargs={},
        exc_type="E",
        exc_message="m",
        traceback="",
        retries=0,
        reason="permanent_error",
        **kw,
    )


@pytest.fixture
def alerting(settings, redis_client):
    settings.JOBS_DEAD_LETTER_ALERT_EMAILS = ["ops@example.com"]
    return settings


def test_no_recipients_no_digest(settings, redis_client):
    settings.JOBS_DEAD_LETTER_ALERT_EMAILS = []
    _record()
    assert redis_client.llen("high") == 0


def test_first_dead_letter_schedules_one_digest_per_interval(alerting, redis_client):
    _record()
    _record()
    messages = [json.loads(m) for m in redis_client.lrange("high", 0, -1)]
    # A countdown message waits in the queue with its ETA; only one for the burst.
    assert [m["headers"]["task"] for m in messages] == ["jobs.dead_letter_digest"]
    assert messages[0]["headers"]["eta"]


def _scheduled(redis_client) -> list[dict]:
    """The digests waiting in the `high` queue, oldest first: their ETA and keyword arguments."""
    out = []
    for raw in reversed(redis_client.lrange("high", 0, -1)):  # kombu pushes on the left
        message = json.loads(raw)
        _args, kwargs, _embed = json.loads(base64.b64decode(message["body"]))
        out.append({"task": message["headers"]["task"], "eta": message["headers"]["eta"], "kwargs": kwargs})
    return out


def _window_ends(redis_client) -> None:
    """What Redis does when the alert window's lock times out."""
    alerts.cache.delete(alerts.LOCK_KEY)


def test_a_dead_letter_inside_the_alert_window_is_mailed_when_the_window_ends(alerting, redis_client):
    alerting.JOBS_DEAD_LETTER_ALERT_INTERVAL = 900
    _record(task_id="first")
    window = alerts.cache.get(alerts.LOCK_KEY)
    assert dead_letter_digest() == 1  # the first digest, a minute later
    _record(task_id="late-1")  # after the digest, inside the window: nothing else would send it
    _record(task_id="late-2")
    digests = _scheduled(redis_client)
    assert [d["kwargs"] for d in digests] == [{}, {"window": window}]  # one follow-up for the window
    end = datetime.fromisoformat(window) + timedelta(seconds=900)
    assert end <= datetime.fromisoformat(digests[1]["eta"]) <= end + timedelta(seconds=5)

    _window_ends(redis_client)
    assert dead_letter_digest(**digests[1]["kwargs"]) == 2
    assert len(mail.outbox) == 2
    assert mail.outbox[1].subject == "[jobs] 2 new dead letter(s)"


def test_the_follow_up_opens_the_next_window_so_a_storm_mails_once_per_interval(alerting, redis_client):
    _record(task_id="a")
    first_window = alerts.cache.get(alerts.LOCK_KEY)
    dead_letter_digest()
    _record(task_id="b")
    _window_ends(redis_client)
    assert dead_letter_digest(window=first_window) == 1
    second_window = alerts.cache.get(alerts.LOCK_KEY)
    assert second_window not in (None, first_window)  # the follow-up mailed, so a new window runs
    _record(task_id="c")  # waits for the second window's end, not for a mail a minute later
    assert [d["kwargs"] for d in _scheduled(redis_client)] == [{}, {"window": first_window}, {"window": second_window}]
    assert len(mail.outbox) == 2


def test_a_follow_up_with_nothing_new_closes_the_window(alerting, redis_client):
    _record(task_id="a")
    window = alerts.cache.get(alerts.LOCK_KEY)
    _record(task_id="b")  # arrives before the first digest ran: that digest reports it
    dead_letter_digest()
    _window_ends(redis_client)
    assert dead_letter_digest(window=window) == 0
    assert alerts.cache.get(alerts.LOCK_KEY) is None
    assert len(mail.outbox) == 1
    redis_client.delete("high")
    _record(task_id="c")  # the next dead letter gets a digest a minute later again
    assert [d["kwargs"] for d in _scheduled(redis_client)] == [{}]


def test_a_follow_up_that_runs_before_its_window_ends_waits_for_it(alerting, redis_client):
    _record(task_id="a")
    window = alerts.cache.get(alerts.LOCK_KEY)
    dead_letter_digest()
    _record(task_id="b")
    redis_client.delete("high")
    assert dead_letter_digest(window=window) == 0  # the window's lock is still held
    assert [d["kwargs"] for d in _scheduled(redis_client)] == [{"window": window}]
    assert alerts.cache.get(alerts.LOCK_KEY) == window
    assert len(mail.outbox) == 1


def test_a_follow_up_leaves_a_newer_window_to_its_own_digest(alerting, redis_client):
    _record(task_id="a")
    window = alerts.cache.get(alerts.LOCK_KEY)
    dead_letter_digest()
    _record(task_id="b")
    _window_ends(redis_client)
    _record(task_id="c")  # a new window, whose digest reports b and c a minute later
    redis_client.delete("high")
    assert dead_letter_digest(window=window) == 0
    assert redis_client.llen("high") == 0
    assert dead_letter_digest() == 2


def test_a_follow_up_that_cannot_mail_gives_the_window_back_for_its_retry(alerting, redis_client, monkeypatch):
    _record(task_id="a")
    window = alerts.cache.get(alerts.LOCK_KEY)
    dead_letter_digest()
    _record(task_id="b")
    _window_ends(redis_client)

    def smtp_down(*args, **kwargs):
        raise ConnectionRefusedError("smtp down")

    monkeypatch.setattr("django.core.mail.send_mail", smtp_down)
    with pytest.raises(ConnectionRefusedError):
        dead_letter_digest(window=window)
    assert alerts.cache.get(alerts.LOCK_KEY) is None
    monkeypatch.undo()
    assert dead_letter_digest(window=window) == 1  # the retry


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
    settings.JOBS_DEAD_LETTER_ALERT_EMAILS = []
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
    settings.JOBS_TASK_MAX_RETRIES = 10
    settings.CELERY_TASK_TIME_LIMIT = 7200
    settings.CELERY_TASK_SOFT_TIME_LIMIT = 7200
    settings.CELERY_WORKER_SOFT_SHUTDOWN_TIMEOUT = 0
    settings.JOBS_WORKER_LOST_LIMIT = 0
    settings.CELERY_ACCEPT_CONTENT = ["json", "pickle"]
    assert ids(settings) == {"jobs.W001", "jobs.W002", "jobs.W003", "jobs.W004", "jobs.W006", "jobs.E001"}


def test_a_task_whose_own_time_limit_outlasts_the_visibility_timeout_is_named(settings, monkeypatch):
    """W002 read only the global limit: a task's own `time_limit` past the timeout went unnoticed."""
    from jobs.tasks import dead_letter_digest

    settings.DEBUG = True
    settings.CELERY_BROKER_TRANSPORT_OPTIONS = {**settings.CELERY_BROKER_TRANSPORT_OPTIONS, "visibility_timeout": 3600}
    monkeypatch.setattr(dead_letter_digest, "time_limit", 4000)
    problems = [p for p in checks.check_task_settings() if p.id == "jobs.W002"]
    assert len(problems) == 1
    assert "jobs.dead_letter_digest" in problems[0].msg


def test_a_threads_pool_with_time_limits_is_reported(settings):
    settings.DEBUG = True
    settings.CELERY_TASK_TIME_LIMIT = 600
    settings.CELERY_WORKER_POOL = "threads"
    assert "jobs.W014" in ids(settings)
    settings.CELERY_WORKER_POOL = "prefork"
    assert "jobs.W014" not in ids(settings)


def test_flower_without_auth_outside_debug_is_reported_by_the_site(settings):
    from config.checks import check_flower_auth

    settings.DEBUG = False
    settings.FLOWER_BASIC_AUTH = ""
    assert [p.id for p in check_flower_auth()] == ["site.W001"]
    settings.FLOWER_BASIC_AUTH = "ops:secret"
    assert check_flower_auth() == []


def test_a_task_whose_own_retry_policy_reaches_the_visibility_timeout_is_named(settings, monkeypatch):
    from jobs.tasks import dead_letter_digest

    settings.DEBUG = True
    settings.CELERY_BROKER_TRANSPORT_OPTIONS = {**settings.CELERY_BROKER_TRANSPORT_OPTIONS, "visibility_timeout": 3600}
    monkeypatch.setattr(dead_letter_digest, "retry_limit", 8)  # 60 s doubling reaches 7680 s
    problems = [p for p in checks.check_task_settings() if p.id == "jobs.W001"]
    assert len(problems) == 1
    assert "jobs.dead_letter_digest" in problems[0].msg


def test_a_retry_delay_that_leaves_no_room_for_the_time_limit_is_reported(settings):
    """90 % of the visibility timeout used to pass: 3000 s of delay plus a 600 s run is past 3600 s."""
    settings.DEBUG = True
    settings.CELERY_BROKER_TRANSPORT_OPTIONS = {**settings.CELERY_BROKER_TRANSPORT_OPTIONS, "visibility_timeout": 3600}
    settings.CELERY_TASK_TIME_LIMIT = 600
    settings.JOBS_TASK_RETRY_BACKOFF_BASE = 200
    settings.JOBS_TASK_RETRY_BACKOFF_MAX = 3000
    settings.JOBS_TASK_MAX_RETRIES = 5  # 200 * 2**4 = 3200, capped at 3000 (+10 % jitter)
    assert "jobs.W001" in ids(settings)


def test_a_cap_the_retries_never_reach_is_not_a_risk(settings):
    settings.DEBUG = True
    settings.JOBS_TASK_RETRY_BACKOFF_MAX = 7200  # above the timeout, but 5 retries stop at 960 s
    assert "jobs.W001" not in ids(settings)


def test_retry_countdown_of_a_task_stays_below_the_visibility_timeout(settings, monkeypatch, request):
    from jobs.tasks import dead_letter_digest

    settings.CELERY_BROKER_TRANSPORT_OPTIONS = {**settings.CELERY_BROKER_TRANSPORT_OPTIONS, "visibility_timeout": 1000}
    monkeypatch.setattr(dead_letter_digest, "time_limit", 300)
    monkeypatch.setattr(dead_letter_digest, "backoff_base", 500)
    assert dead_letter_digest.retry_countdown(1) >= 500
    # 2000 s clipped so that the held retry, its 300 s time limit and a 100 s margin (10 % of the
    # timeout) fit in the 1000 s visibility timeout: 600 s.
    assert dead_letter_digest.retry_countdown(3) == pytest.approx(600)
    monkeypatch.setattr(dead_letter_digest, "time_limit", 500)  # a longer limit leaves less room
    assert dead_letter_digest.retry_countdown(3) == pytest.approx(400)
    request.getfixturevalue("rabbitmq_broker")
    assert dead_letter_digest.retry_countdown(3) >= 2000  # RabbitMQ has no visibility timeout to stay under
