"""Health endpoints, the request id and JSON errors."""

from __future__ import annotations

import json

import pytest

from jobs import health
from jobs.redaction import redact_text

pytestmark = pytest.mark.django_db


def test_healthz_answers_without_touching_anything(client, django_assert_num_queries):
    with django_assert_num_queries(0):
        response = client.get("/healthz")
    assert response.status_code == 200
    assert response.json() == {"status": "ok"}


def test_readyz_reports_database_and_broker(client):
    response = client.get("/readyz")
    assert response.status_code == 200
    body = response.json()
    assert body["status"] == "ok"
    assert body["checks"]["database"]["ok"] is True
    assert body["checks"]["broker"] == {**body["checks"]["broker"], "ok": True, "transport": "redis"}


def test_readyz_names_a_broker_that_does_not_answer(client, monkeypatch):
    # Celery reads CELERY_BROKER_URL from the environment before its settings.
    monkeypatch.setenv("CELERY_BROKER_URL", "redis://:hunter2@127.0.0.1:1/0")
    response = client.get("/readyz")
    assert response.status_code == 503
    body = response.json()
    assert body["status"] == "unavailable"
    assert body["checks"]["database"]["ok"] is True
    assert body["checks"]["broker"]["ok"] is False
    assert "hunter2" not in json.dumps(body)


def test_readyz_names_a_database_that_does_not_answer(client, monkeypatch):
    real = health.check_database
    monkeypatch.setattr(health, "check_database", lambda: real(alias="no-such-database"))
    response = client.get("/readyz")
    assert response.status_code == 503
    assert response.json()["checks"]["database"]["ok"] is False
    assert "no-such-database" in response.json()["checks"]["database"]["error"]


@pytest.mark.parametrize(
    ("url", "expected"),
    [
        ("redis://:secret@host:6379/0", "redis://:***@host:6379/0"),
        ("amqp://guest:guest@rabbit:5672//", "amqp://guest:***@rabbit:5672//"),
        ("redis://host:6379/0", "redis://host:6379/0"),
        ("Error connecting to host:6379", "Error connecting to host:6379"),
    ],
)
def test_redact_text_on_broker_urls(url, expected):
    assert redact_text(url) == expected


def test_redact_text_never_raises_on_garbage():
    assert redact_text("http://[::1") == "http://[::1"


def test_request_id_is_echoed_when_sane(client):
    response = client.get("/healthz", HTTP_X_REQUEST_ID="req-1.A_b")
    assert response["X-Request-ID"] == "req-1.A_b"


@pytest.mark.parametrize("bad", ["", "has space", "x" * 129, "semi;colon", "new\nline"])
def test_insane_request_id_is_replaced(client, bad):
    response = client.get("/healthz", HTTP_X_REQUEST_ID=bad)
    assert response["X-Request-ID"] != bad
    assert len(response["X-Request-ID"]) == 32


def test_every_response_carries_a_request_id(client):
    assert client.get("/no/such/page").has_header("X-Request-ID")
    assert client.post("/healthz").has_header("X-Request-ID")


def test_errors_are_json(client):
    response = client.get("/api/nothing-here/")
    assert response.status_code == 404
    assert response.json()["error"] == "not found"
    response = client.post("/healthz")
    assert response.status_code == 405
    assert response.json() == {"error": "method not allowed"}


def test_browsers_asking_for_html_get_django_pages(client):
    response = client.post("/healthz", HTTP_ACCEPT="text/html")
    assert response.status_code == 405
    assert not response["Content-Type"].startswith("application/json")


def test_disallowed_host_is_a_json_400(client):
    response = client.get("/api/jobs/health/", HTTP_HOST="evil.example.com")
    assert response.status_code == 400
    assert response.json() == {"error": "bad request"}


@pytest.mark.parametrize("path", ["/healthz", "/readyz", "/metrics"])
def test_probes_answer_whatever_the_host(client, path):
    # Kubernetes and Prometheus address pods by IP, which is not an allowed host.
    response = client.get(path, HTTP_HOST="10.1.2.3:8000")
    assert response.status_code == 200
    assert response.has_header("X-Request-ID")


def test_probe_paths_still_refuse_other_methods(client):
    assert client.post("/healthz", HTTP_HOST="10.1.2.3").status_code == 405


@pytest.mark.urls("tests.jobs.error_urls")
@pytest.mark.parametrize(
    ("path", "status", "error"),
    [
        ("/api/missing/", 404, "not found"),
        ("/api/denied/", 403, "forbidden"),
        ("/api/too-big/", 413, "request body too large"),
        ("/api/suspicious/", 400, "bad request"),
        ("/api/broken/", 500, "internal server error"),
    ],
)
def test_api_exceptions_become_json(client, path, status, error):
    client.raise_request_exception = False
    response = client.get(path)
    assert response.status_code == status
    assert response.json()["error"] == error


@pytest.mark.urls("tests.jobs.error_urls")
def test_non_api_server_error_uses_the_json_handler(client):
    client.raise_request_exception = False
    response = client.get("/page/broken/")
    assert response.status_code == 500
    assert response.json() == {"error": "internal server error"}


def test_metrics_endpoint_serves_prometheus_text(client):
    response = client.get("/metrics")
    assert response.status_code == 200
    assert b"django_http_requests" in response.content


def test_media_files_are_served_from_media_root(client, settings):
    (settings.MEDIA_ROOT / "thumbnails").mkdir()
    (settings.MEDIA_ROOT / "thumbnails" / "1.jpg").write_bytes(b"jpeg bytes")
    response = client.get("/media/thumbnails/1.jpg")
    assert response.status_code == 200
    assert b"".join(response.streaming_content) == b"jpeg bytes"
    # Paths that leave MEDIA_ROOT are refused (400 suspicious path, or 404), never served.
    assert client.get("/media/../config/settings/base.py").status_code in (400, 404)
    assert client.get("/media/%2e%2e/manage.py").status_code in (400, 404)
    assert client.get("/media/thumbnails/..%2f..%2fmanage.py").status_code in (400, 404)
