"""Database metrics: the engines are django-prometheus's wrappers, and queries show on /metrics."""

from __future__ import annotations

import re

import pytest
from django.db import connection
from django.test.utils import CaptureQueriesContext
from prometheus_client import REGISTRY

from tests.config.test_settings import load_settings  # noqa: F401 - a fixture, used by name below


def db_executions(text: str) -> float:
    """`django_db_execute_total` of the default database in a /metrics page."""
    pattern = rf'django_db_execute_total\{{alias="default",vendor="{connection.vendor}"\}} (\S+)'
    match = re.search(pattern, text)
    return float(match.group(1)) if match else 0.0


def test_the_database_goes_through_the_prometheus_wrapper():
    assert connection.settings_dict["ENGINE"].startswith("django_prometheus.db.backends.")
    assert connection.vendor in {"sqlite", "postgresql"}  # unchanged: code that checks it still works


@pytest.mark.django_db
def test_a_query_made_by_a_request_is_counted_on_metrics(client):
    before_page = db_executions(client.get("/metrics").content.decode())
    labels = {"alias": "default", "vendor": connection.vendor}
    before = REGISTRY.get_sample_value("django_db_execute_total", labels) or 0.0
    with CaptureQueriesContext(connection) as queries:
        response = client.get("/api/thumbnails/987654321/")  # looked up in the database, then 404
    assert response.status_code == 404
    assert len(queries) >= 1
    assert REGISTRY.get_sample_value("django_db_execute_total", labels) - before == len(queries)
    text = client.get("/metrics").content.decode()
    assert db_executions(text) >= before_page + len(queries)
    assert re.search(r'django_db_query_duration_seconds_count\{alias="default",vendor="\w+"\} [1-9]', text)


@pytest.mark.django_db
def test_sqlite_keeps_wal_and_immediate_transactions_through_the_wrapper():
    if connection.vendor != "sqlite":
        pytest.skip("the suite runs on PostgreSQL")
    with connection.cursor() as cursor:
        cursor.execute("PRAGMA journal_mode")
        assert cursor.fetchone()[0] == "wal"
        cursor.execute("PRAGMA busy_timeout")
        assert cursor.fetchone()[0] == 20000
    assert connection.transaction_mode == "IMMEDIATE"


def test_every_engine_django_prometheus_wraps_is_switched_and_tuned(load_settings):  # noqa: F811
    s = load_settings("local")
    db = s.DATABASES["default"]
    assert db["ENGINE"] == "django_prometheus.db.backends.sqlite3"
    assert db["OPTIONS"]["transaction_mode"] == "IMMEDIATE"
    assert "journal_mode=WAL" in db["OPTIONS"]["init_command"]

    s = load_settings("local", DATABASE_URL="postgres://app:pw@db.internal:5432/app")
    db = s.DATABASES["default"]
    assert db["ENGINE"] == "django_prometheus.db.backends.postgresql"
    assert (db["CONN_MAX_AGE"], db["CONN_HEALTH_CHECKS"], db["OPTIONS"]["connect_timeout"]) == (60, True, 5)
    # A vanished database host fails a query within about 30 s instead of hanging it for 15 min.
    assert (db["OPTIONS"]["keepalives"], db["OPTIONS"]["tcp_user_timeout"]) == (1, 30_000)

    # Every wrapper the table names exists; an engine it does not know is left alone.
    import importlib.util

    for wrapper in s.PROMETHEUS_DB_ENGINES.values():
        assert importlib.util.find_spec(f"{wrapper}.base"), wrapper
    from config.settings import base

    tuned = base._tune_database({"ENGINE": "example.backends.custom", "NAME": "x"})
    assert tuned["ENGINE"] == "example.backends.custom"
