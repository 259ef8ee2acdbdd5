"""Fixtures for the whole suite.

Every test runs against a throw-away Redis started here on a free port, never against the Redis
a developer or an operator runs; PostgreSQL is used when DATABASE_URL points at one.
"""

from __future__ import annotations

import os
import re

import pytest
from django.conf import settings
from django.test import override_settings

from devtools.localredis import LocalRedis

#: What the site's operators hold for the staff API: queue and read emails, purge them, read the stats.
OPERATOR_PERMISSIONS = (
    "mailer.add_email",
    "mailer.view_email",
    "mailer.delete_email",
    "jobs.view_deadletter",
    "django_celery_results.view_taskresult",
)


def grant(user, *permissions: str):
    """Gives `user` the model permissions named `"app_label.codename"` (default: an operator's) and
    returns it reloaded (Django caches a user's permissions on the object)."""
    from django.contrib.auth.models import Permission

    for name in permissions or OPERATOR_PERMISSIONS:
        app_label, codename = name.split(".", 1)
        user.user_permissions.add(Permission.objects.get(content_type__app_label=app_label, codename=codename))
    return type(user)._default_manager.get(pk=user.pk)


def results_table(response) -> str:
    """The HTML of an admin changelist's result table ("" when the list is empty)."""
    content = response.content.decode()
    if 'id="result_list"' not in content:
        return ""
    start = content.index('id="result_list"')
    return content[start : content.index("</table>", start)]


def reset_broker_pools() -> None:
    """Makes the Celery app connect afresh, to whatever broker URL is configured now."""
    from config.celery import app
    from jobs.runtime.outbox import publish_breaker

    app._pool = None
    app.amqp._producer_pool = None
    publish_breaker.close()


@pytest.fixture(scope="session", autouse=True)
def redis_server():
    """A private Redis for the whole run; broker, cache and child processes all point at it."""
    server = LocalRedis().start()
    os.environ["REDIS_URL"] = server.url
    os.environ["CELERY_BROKER_URL"] = server.url
    caches = {"default": {**settings.CACHES["default"], "LOCATION": server.url}}
    override = override_settings(
        REDIS_URL=server.url, JOBS_REDIS_URL=server.url, CELERY_BROKER_URL=server.url, CACHES=caches
    )
    override.enable()

    from config.celery import app

    app.conf.broker_url = server.url
    reset_broker_pools()
    yield server
    override.disable()
    server.stop()


@pytest.fixture
def redis_client(redis_server):
    """A client of the private Redis, emptied before and after the test."""
    import redis

    client = redis.Redis.from_url(redis_server.url)
    client.flushall()  # whatever an earlier test's processes left (a test file runs after any other)
    yield client
    client.flushall()


@pytest.fixture(autouse=True)
def _media_root(tmp_path, settings):
    """Uploads and thumbnails of one test land in its own temporary directory."""
    settings.MEDIA_ROOT = tmp_path / "media"
    settings.TEMP_ROOT = settings.JOBS_TEMP_ROOT = tmp_path / "tmp"
    settings.MEDIA_ROOT.mkdir()
    settings.TEMP_ROOT.mkdir()


@pytest.fixture(autouse=True)
def _publish_breaker_closed():
    """A broker one test made fail must not keep the next test's publishes off it."""
    from jobs.runtime.outbox import publish_breaker

    publish_breaker.close()
    yield
    publish_breaker.close()


@pytest.fixture(autouse=True)
def _lease_keeper_in_the_test(monkeypatch):
    """The job table's keeper (jobs.runtime.store) works in a thread of its own in a worker; in
    the test process a test drives it (`flush_pending`) in its own thread and transaction, and
    nothing kept leaks into the next test."""
    from jobs.runtime import store

    monkeypatch.setattr(store.Keeper, "_ensure_thread", lambda self: None)
    monkeypatch.setattr(store, "_keeper_instance", None)


# --- no silent skips in CI ----------------------------------------------------------------------

ALLOWED_SKIPS_VARIABLE = "TEST_ALLOWED_SKIPS"


def unexpected_skips(reports, allowed: str) -> list[str]:
    """The skip reasons of `reports` that match none of the `allowed` patterns (regular
    expressions, one per line)."""
    patterns = [re.compile(line.strip()) for line in allowed.splitlines() if line.strip()]
    reasons = []
    for report in reports:
        longrepr = report.longrepr
        reason = longrepr[2] if isinstance(longrepr, tuple) else str(longrepr)
        if not any(pattern.search(reason) for pattern in patterns):
            reasons.append(f"{report.nodeid}: {reason}")
    return reasons


def pytest_sessionfinish(session, exitstatus):
    """With TEST_ALLOWED_SKIPS set (`.ci/run` sets it), a skip whose reason it does not allow
    fails the run: a RabbitMQ, browser or TLS test that stops running is a failure in CI, not a
    line in the summary."""
    allowed = os.environ.get(ALLOWED_SKIPS_VARIABLE)
    reporter = session.config.pluginmanager.get_plugin("terminalreporter")
    if allowed is None or reporter is None or exitstatus not in (0, 1):
        return
    unexpected = unexpected_skips(reporter.stats.get("skipped", []), allowed)
    if unexpected:
        reporter.ensure_newline()
        reporter.write_line(
            f"{len(unexpected)} unexpected skip(s) ({ALLOWED_SKIPS_VARIABLE} allows them not):", red=True
        )
        for line in unexpected:
            reporter.write_line(f"  {line}", red=True)
        session.exitstatus = 1
