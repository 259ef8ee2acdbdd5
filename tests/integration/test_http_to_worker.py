"""From an HTTP request to the worker: one request id everywhere, and no task lost when the
broker is down at request time."""

from __future__ import annotations

import json
import logging
import time

import pytest

from devtools.localredis import LocalRedis
from jobs.models import OutboxMessage
from jobs.runtime.outbox import outbox_relay
from tests.conftest import reset_broker_pools
from tests.integration.conftest import wait_for
from tests.thumbnails import images
from thumbnails.models import Image

pytestmark = [pytest.mark.django_db(transaction=True), pytest.mark.integration]


def upload(client, **headers):
    from django.core.files.uploadedfile import SimpleUploadedFile

    photo = SimpleUploadedFile("photo.jpg", images.jpeg((640, 480)), content_type="image/jpeg")
    return client.post("/api/thumbnails/", {"image": photo}, **headers)


def test_request_id_from_the_api_reaches_the_worker_log(client, start_worker, settings, caplog):
    from config.logging import JsonFormatter
    from jobs.logging import ContextFilter

    worker = start_worker(extra_env={"MEDIA_ROOT": str(settings.MEDIA_ROOT)})
    with caplog.at_level(logging.INFO):
        response = upload(client, HTTP_X_REQUEST_ID="req-http-42")
    assert response.status_code == 202
    assert response["X-Request-ID"] == "req-http-42"
    image_id = response.json()["id"]

    # The web process's own lines, as the JSON formatter writes them.
    web_lines = []
    for record in caplog.records:
        ContextFilter().filter(record)
        web_lines.append(json.loads(JsonFormatter().format(record)))
    assert any(line.get("request_id") == "req-http-42" for line in web_lines)

    wait_for(lambda: Image.objects.get(pk=image_id).status == Image.Status.DONE, timeout=60)
    assert Image.objects.get(pk=image_id).request_id == "req-http-42"
    worker_lines = [json.loads(line) for line in worker.log().splitlines() if line.strip()]
    task_lines = [line for line in worker_lines if line.get("task_name") == "thumbnails.generate"]
    assert task_lines
    assert {line.get("request_id") for line in task_lines} == {"req-http-42"}


def test_upload_while_the_broker_is_down_returns_at_once_and_runs_later(client, start_worker, settings, monkeypatch):
    broker = LocalRedis().start()
    port = broker.port
    broker.stop()  # the broker is down when the request comes in
    reset_broker_pools()
    monkeypatch.setenv("CELERY_BROKER_URL", broker.url)
    try:
        started = time.monotonic()
        response = upload(client)
        elapsed = time.monotonic() - started
        assert response.status_code == 202
        assert elapsed < 5, elapsed
        image_id = response.json()["id"]
        assert OutboxMessage.objects.filter(task_name="thumbnails.generate", attempts=1).count() == 1

        broker = LocalRedis(port=port).start()  # the broker is back
        reset_broker_pools()
        start_worker(extra_env={"MEDIA_ROOT": str(settings.MEDIA_ROOT), "CELERY_BROKER_URL": broker.url})
        # The worker relays the outbox when it starts; the relay task would too.
        wait_for(lambda: not OutboxMessage.objects.exists() or outbox_relay()["waiting"] == 0, timeout=30)
        wait_for(lambda: Image.objects.get(pk=image_id).status == Image.Status.DONE, timeout=60)
        assert Image.objects.get(pk=image_id).thumbnails.count() == len(settings.THUMBNAIL_SIZES)
    finally:
        broker.stop()
        monkeypatch.undo()
        reset_broker_pools()


def test_one_request_id_in_the_json_lines_of_a_real_web_process_and_the_worker(start_service, start_worker, tmp_path):
    """gunicorn as the image runs it (JSON log config, access log on stdout) and a worker: every
    line either writes is one JSON object, and the request's id is in both."""
    import requests

    from config.env import BASE_DIR
    from devtools.localredis import free_port

    port = free_port()
    media = {"MEDIA_ROOT": str(tmp_path / "media"), "LOG_FORMAT": "json"}
    web = start_service(
        [
            "gunicorn",
            "config.wsgi",
            "--config",
            str(BASE_DIR / "config" / "gunicorn.py"),
            "--bind",
            f"127.0.0.1:{port}",
            "--workers",
            "2",
            "--no-control-socket",
            "--log-config-json",
            str(BASE_DIR / "docker" / "gunicorn-logging.json"),
            "--access-logfile",
            "-",
        ],
        extra_env={**media, "PROMETHEUS_MULTIPROC_DIR": str(tmp_path / "prometheus")},
    )
    worker = start_worker(extra_env=media)
    base = f"http://127.0.0.1:{port}"

    def up():
        assert web.process.poll() is None, web.log()[-3000:]
        try:
            return requests.get(f"{base}/healthz", timeout=5).status_code == 200
        except requests.ConnectionError:
            return False

    wait_for(up, timeout=30)
    response = requests.post(
        f"{base}/api/thumbnails/",
        files={"image": ("photo.jpg", images.jpeg((640, 480)), "image/jpeg")},
        headers={"X-Request-ID": "req-web-7"},
        timeout=30,
    )
    assert response.status_code == 202, response.text
    assert response.headers["X-Request-ID"] == "req-web-7"
    image_id = response.json()["id"]
    wait_for(lambda: Image.objects.get(pk=image_id).status == Image.Status.DONE, timeout=60)

    web_lines = [json.loads(line) for line in web.log().splitlines() if line.strip()]
    assert any(line.get("request_id") == "req-web-7" for line in web_lines)
    worker_lines = [json.loads(line) for line in worker.log().splitlines() if line.strip()]
    task_lines = [line for line in worker_lines if line.get("task_name") == "thumbnails.generate"]
    assert task_lines
    assert {line.get("request_id") for line in task_lines} == {"req-web-7"}
