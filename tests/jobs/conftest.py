"""Fixtures shared by the jobs tests."""

from __future__ import annotations

import pytest

from tests.conftest import grant, reset_broker_pools


@pytest.fixture
def dead_broker(monkeypatch):
    """Points the Celery app at a port nothing listens on."""

    reset_broker_pools()
    monkeypatch.setenv("CELERY_BROKER_URL", "redis://127.0.0.1:1/0")
    yield
    monkeypatch.undo()
    reset_broker_pools()


@pytest.fixture
def publishes_in_transaction(monkeypatch) -> list[bool]:
    """For each message the outbox publishes, whether a transaction was open at that moment."""
    from django.db import connection

    from jobs.runtime import outbox

    seen: list[bool] = []
    original = outbox.publish

    def watching(message, **kwargs):
        seen.append(connection.in_atomic_block)
        return original(message, **kwargs)

    monkeypatch.setattr(outbox, "publish", watching)
    return seen


@pytest.fixture
def rabbitmq_broker(monkeypatch, settings, redis_server):
    """`jobs` told its broker cannot be read like Redis's (RabbitMQ's case) while messages still
    go to the suite's Redis, and `JOBS_REDIS_URL` naming that Redis, as a RabbitMQ site sets it."""
    from jobs.conf import JobsSettings

    monkeypatch.setattr(JobsSettings, "broker_is_redis", property(lambda self: False))
    settings.JOBS_REDIS_URL = redis_server.url


@pytest.fixture
def watcher(django_user_model, client):
    """A staff member who may look at jobs (`jobs.view_job`) and change nothing, logged in."""
    user = django_user_model.objects.create_user("watcher", password="pw", is_staff=True)
    grant(user, "jobs.view_job")
    client.force_login(user)
    return user
