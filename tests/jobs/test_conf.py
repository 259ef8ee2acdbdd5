"""jobs.conf: every setting `jobs` reads has a default, and a project's JOBS_ setting wins."""

from __future__ import annotations

import pytest
from django.conf import settings as django_settings
from django.test import override_settings

from jobs.conf import DEFAULTS, jobs_settings


def test_a_project_that_sets_nothing_gets_the_defaults():
    names = [f"JOBS_{name}" for name in DEFAULTS]
    with override_settings(**dict.fromkeys(names, None)):
        for name in names:
            delattr(django_settings, name)  # as in a project that never heard of them
        assert jobs_settings.TASK_MAX_RETRIES == 5
        assert jobs_settings.TASK_RETRY_BACKOFF_BASE == 60.0
        assert jobs_settings.DEAD_LETTER_ALERT_EMAILS == []
        assert jobs_settings.TEMP_ROOT is None
        assert str(jobs_settings.LIVENESS_DIR).endswith("jobs-liveness")


def test_the_projects_setting_wins(settings):
    settings.JOBS_TASK_MAX_RETRIES = 2
    assert jobs_settings.TASK_MAX_RETRIES == 2


def test_an_unknown_name_is_an_error_that_names_the_setting():
    with pytest.raises(AttributeError, match="JOBS_TASK_MAX_RETRYS"):
        jobs_settings.TASK_MAX_RETRYS  # noqa: B018


def test_the_lock_redis_is_jobs_redis_url_else_a_plain_redis_broker(settings, monkeypatch):
    # Celery reads CELERY_BROKER_URL from the environment before its configuration.
    settings.JOBS_REDIS_URL = None
    monkeypatch.setenv("CELERY_BROKER_URL", "redis://broker:6379/2")
    assert jobs_settings.broker_is_redis
    assert jobs_settings.redis_url == "redis://broker:6379/2"
    settings.JOBS_REDIS_URL = "redis://elsewhere:6379/3"
    assert jobs_settings.redis_url == "redis://elsewhere:6379/3"

    settings.JOBS_REDIS_URL = None
    monkeypatch.setenv("CELERY_BROKER_URL", "sentinel://sentinel-1:26379")
    assert jobs_settings.broker_is_redis  # Redis behind Sentinel: queues are read like Redis's
    with pytest.raises(RuntimeError, match="JOBS_REDIS_URL"):
        jobs_settings.redis_url  # noqa: B018 - but kombu's form of a Sentinel URL names no master
    settings.JOBS_REDIS_URL = "sentinel://sentinel-1:26379,sentinel-2:26379/mymaster/1"
    assert jobs_settings.redis_url == settings.JOBS_REDIS_URL  # jobs.redis_client opens it
    settings.JOBS_REDIS_URL = None

    monkeypatch.setenv("CELERY_BROKER_URL", "amqp://guest:guest@rabbit:5672//")
    assert not jobs_settings.broker_is_redis
    with pytest.raises(RuntimeError, match="JOBS_REDIS_URL"):
        jobs_settings.redis_url  # noqa: B018


def test_celerys_own_options_are_read_with_celerys_defaults(settings):
    del settings.CELERY_BROKER_TRANSPORT_OPTIONS
    del settings.CELERY_TASK_TIME_LIMIT
    del settings.CELERY_TASK_DEFAULT_QUEUE
    assert jobs_settings.visibility_timeout == 3600.0  # kombu's Redis default
    assert jobs_settings.task_time_limit == 0.0
    assert jobs_settings.default_queue == "celery"
    settings.CELERY_BROKER_TRANSPORT_OPTIONS = {"visibility_timeout": 120}
    settings.CELERY_TASK_TIME_LIMIT = 60
    settings.CELERY_TASK_DEFAULT_QUEUE = "normal"
    assert (jobs_settings.visibility_timeout, jobs_settings.task_time_limit, jobs_settings.default_queue) == (
        120.0,
        60.0,
        "normal",
    )


def test_the_queues_are_the_ones_the_project_declares(monkeypatch):
    from celery import current_app
    from kombu import Queue

    from jobs.selectors import queue_names

    assert queue_names() == ["high", "normal", "low"]  # this site's CELERY_TASK_QUEUES, in order
    monkeypatch.setitem(current_app.conf, "task_queues", [Queue("emails"), Queue("reports")])
    assert queue_names() == ["emails", "reports"]
    monkeypatch.setitem(current_app.conf, "task_queues", None)
    monkeypatch.setitem(current_app.conf, "task_default_queue", "celery")
    assert queue_names() == ["celery"]  # a project that declares none has Celery's default queue
