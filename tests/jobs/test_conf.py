"""jobs.conf: every setting `jobs` reads has a default, and a project's JOBS_ setting wins."""

from __future__ import annotations

import pytest
from django.conf import settings as django_settings
from django.test import override_settings

from jobs.conf import DEFAULTS, JobsSettings, jobs_settings


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


def test_the_lock_redis_is_the_broker_unless_named(settings, redis_server, monkeypatch):
    settings.JOBS_REDIS_URL = None
    assert jobs_settings.broker_is_redis
    assert jobs_settings.redis_url == redis_server.url  # the suite's broker
    settings.JOBS_REDIS_URL = "redis://elsewhere:6379/3"
    assert jobs_settings.redis_url == "redis://elsewhere:6379/3"
    settings.JOBS_REDIS_URL = None
    monkeypatch.setattr(JobsSettings, "broker_is_redis", property(lambda self: False))
    with pytest.raises(RuntimeError, match="JOBS_REDIS_URL"):
        jobs_settings.redis_url  # noqa: B018
