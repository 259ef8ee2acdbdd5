"""Health and stats API, metrics, probes, Flower settings and the beat lock."""

from __future__ import annotations

import base64
import json
import time
from datetime import timedelta
from io import StringIO

import pytest
from django.core.management import CommandError, call_command
from django.db import OperationalError
from django.utils import timezone
from django_celery_beat.models import PeriodicTask

from config.celery import app
from config.flower import FlowerConfigError, flower_options
from jobs.heartbeat import heartbeat_write, liveness_touch
from jobs.models import DeadLetter, OutboxMessage
from jobs.runtime import beat
from tests.conftest import grant
from tests.jobs.factories import DeadLetterFactory

pytestmark = pytest.mark.django_db


def basic(user, password):
    return {"HTTP_AUTHORIZATION": "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()}


def test_jobs_health_reflects_heartbeats(client, redis_client):
    response = client.get("/api/jobs/health/")
    assert response.status_code == 503  # an uptime check reading only the status sees the problem
    body = response.json()
    assert body == {
        "worker": {"ok": False, "last_heartbeat": None, "age_seconds": None},
        "beat": {"ok": False, "last_tick": None, "age_seconds": None},
    }
    heartbeat_write("worker")
    assert client.get("/api/jobs/health/").status_code == 503  # beat still missing
    heartbeat_write("beat")
    response = client.get("/api/jobs/health/")
    assert response.status_code == 200
    body = response.json()
    assert body["worker"]["ok"] is True
    assert body["worker"]["age_seconds"] < 5
    assert body["beat"]["ok"] is True
    assert body["beat"]["last_tick"].endswith("+00:00")


def test_the_password_prompt_names_the_hosts_realm(client, settings):
    """`jobs` names no site: the realm is the host's setting (default "jobs API"), kept to what a
    quoted header value can hold."""
    del settings.JOBS_API_REALM
    assert client.get("/api/jobs/stats/")["WWW-Authenticate"] == 'Basic realm="jobs API", charset="UTF-8"'
    settings.JOBS_API_REALM = 'Shop "ops"\r\nX-Injected: 1'
    assert client.get("/api/jobs/stats/")["WWW-Authenticate"] == 'Basic realm="Shop opsX-Injected: 1", charset="UTF-8"'


def test_stats_needs_staff(client, django_user_model):
    response = client.get("/api/jobs/stats/")
    assert response.status_code == 401
    assert response["WWW-Authenticate"].startswith("Basic")
    django_user_model.objects.create_user("plain", password="pw")
    grant(django_user_model.objects.create_user("ops", password="pw", is_staff=True))
    assert client.get("/api/jobs/stats/", **basic("plain", "pw")).status_code == 403
    assert client.get("/api/jobs/stats/", **basic("ops", "wrong")).status_code == 401
    assert client.get("/api/jobs/stats/", HTTP_AUTHORIZATION="Basic !!!").status_code == 401
    assert client.get("/api/jobs/stats/", HTTP_AUTHORIZATION="Bearer x").status_code == 401
    assert client.get("/api/jobs/stats/", **basic("ops", "pw")).status_code == 200


def test_stats_content(admin_client, redis_client):
    an_hour_ago = timezone.now() - timedelta(hours=1)
    DeadLetterFactory(failed_at=an_hour_ago)
    DeadLetterFactory()
    DeadLetterFactory(failed_at=an_hour_ago - timedelta(days=1), status=DeadLetter.Status.REQUEUED)  # not pending
    app.send_task("jobs.ping", queue="low")
    OutboxMessage.objects.create(task_name="jobs.ping", task_id="waiting-for-the-broker")
    body = admin_client.get("/api/jobs/stats/").json()
    assert body["queues"] == {"high": 0, "normal": 0, "low": 1}
    assert body["outbox_backlog"] == 1
    assert body["dead_letters"]["pending"] == 2
    assert 3600 <= body["dead_letters"]["oldest_pending_age_seconds"] < 3660  # the oldest pending one
    assert set(body["tasks_24h"]) == {"by_state", "by_task"}


def test_metrics_show_queue_lengths_and_dead_letters(client, redis_client):
    for _ in range(3):
        app.send_task("jobs.ping", queue="normal")
    app.send_task("jobs.ping", queue="high", priority=9)
    DeadLetterFactory()
    heartbeat_write("worker")
    text = client.get("/metrics").content.decode()
    assert 'celery_queue_length{queue="normal"} 3.0' in text
    assert 'celery_queue_length{queue="high"} 1.0' in text
    assert 'jobs_dead_letters{status="pending"} 1.0' in text
    assert 'jobs_dead_letters{status="discarded"} 0.0' in text
    assert "jobs_worker_last_heartbeat_timestamp_seconds " in text
    assert "django_http_requests_total_by_method_total" in text


def test_probe_command(settings, tmp_path):
    settings.JOBS_LIVENESS_DIR = tmp_path
    with pytest.raises(CommandError, match="no liveness file"):
        call_command("probe", "worker")
    liveness_touch("worker", hostname="w1")
    out = StringIO()
    call_command("probe", "worker", stdout=out)
    assert "worker: alive" in out.getvalue()
    data = json.loads((tmp_path / "worker.alive").read_text())
    data["at"] = time.time() - 120
    (tmp_path / "worker.alive").write_text(json.dumps(data))
    with pytest.raises(CommandError, match="stale"):
        call_command("probe", "worker")
    call_command("probe", "worker", "--max-age", "500", stdout=StringIO())
    (tmp_path / "beat.alive").write_text("garbage")
    with pytest.raises(CommandError, match="no liveness file"):
        call_command("probe", "beat")


@pytest.mark.parametrize(
    ("environ", "debug", "message"),
    [
        ({}, False, "must be set"),
        ({"FLOWER_BASIC_AUTH": "nopassword"}, True, "user:password"),
        ({"FLOWER_BASIC_AUTH": "a:b", "FLOWER_UNAUTHENTICATED_API": "true"}, False, "UNAUTHENTICATED"),
    ],
)
def test_flower_refuses_unsafe_settings(environ, debug, message, tmp_path):
    with pytest.raises(FlowerConfigError, match=message):
        flower_options(dict(environ), debug=debug, var_dir=tmp_path)


def test_flower_gets_persistent_state_unless_the_environment_says_otherwise(tmp_path):
    options = flower_options({"FLOWER_BASIC_AUTH": "ops:pw,admin:pw2"}, debug=False, var_dir=tmp_path)
    assert options["persistent"] is True
    assert options["db"] == str(tmp_path / "flower.db")
    assert flower_options({}, debug=True, var_dir=tmp_path)["persistent"] is True  # no auth needed in debug
    own = flower_options({"FLOWER_BASIC_AUTH": "a:b", "FLOWER_DB": "/data/f.db"}, debug=False, var_dir=tmp_path)
    assert "db" not in own  # Flower has already taken FLOWER_DB from the environment


def test_beat_lock_has_one_holder_and_expires(redis_server, redis_client):
    first = beat.BeatLock(redis_server.url, ttl=0.5)
    second = beat.BeatLock(redis_server.url, ttl=0.5)
    assert first.acquire_or_renew() is True
    assert second.acquire_or_renew() is False
    assert second.holder() == first.token
    assert first.acquire_or_renew() is True  # renewal
    time.sleep(0.7)  # the first beat "died": no renewal
    assert second.acquire_or_renew() is True
    assert first.acquire_or_renew() is False
    second.release()
    assert second.holder() is None
    assert first.acquire_or_renew() is True


def test_beat_lock_without_redis_never_leads():
    lock = beat.BeatLock("redis://127.0.0.1:1/0", ttl=1)
    lock.held = True
    assert lock.acquire_or_renew() is False


def test_time_zone_change_resets_last_run(settings, redis_client):
    from django.utils import timezone

    from jobs.schedules import schedules_setup

    schedules_setup()
    PeriodicTask.objects.update(last_run_at=timezone.now())
    settings.TIME_ZONE = "UTC"
    assert beat.reset_schedules_if_time_zone_changed() is False  # first sight: remembered
    assert beat.reset_schedules_if_time_zone_changed() is False
    settings.TIME_ZONE = "Europe/Berlin"
    assert beat.reset_schedules_if_time_zone_changed() is True
    assert not PeriodicTask.objects.exclude(last_run_at=None).exists()


def test_a_beat_tick_that_meets_a_broken_dependency_is_logged_not_fatal(redis_client, monkeypatch, caplog):
    """Celery's beat loop catches only KeyboardInterrupt and SystemExit: a Redis pause (the
    heartbeat write after the lock renewal) or a database error used to end beat."""
    from celery import current_app

    scheduler = beat.LockedDatabaseScheduler(app=current_app, lazy=True)

    def paused(name):
        raise ConnectionError("Redis is paused")

    monkeypatch.setattr(beat, "heartbeat_write", paused)
    monkeypatch.setattr(beat.LockedDatabaseScheduler, "_send_due", lambda self: 1.5)
    assert scheduler.tick() == 1.5  # the heartbeat is skipped, sending goes on
    assert "beat.heartbeat_write_failed" in caplog.text

    def database_restarting(self, *args, **kwargs):
        raise OperationalError("the database system is starting up")

    monkeypatch.setattr(beat.LockedDatabaseScheduler, "_send_due", database_restarting)
    assert scheduler.tick() == beat.RETRY_AFTER_ERROR
    assert "beat.tick_failed" in caplog.text


def test_a_worker_metrics_port_it_cannot_listen_on_is_logged_with_the_reason(caplog, monkeypatch):
    import socket

    import prometheus_client

    from jobs import metrics

    taken = socket.socket()
    taken.bind(("127.0.0.1", 0))
    taken.listen()
    port = taken.getsockname()[1]
    try:
        with caplog.at_level("WARNING", logger="jobs.metrics"):
            assert metrics.start_worker_metrics_server(port) is False
    finally:
        taken.close()
    (record,) = [r for r in caplog.records if r.msg == "metrics.server_not_started"]
    assert record.reason.startswith(f"port {port} is taken on 127.0.0.1 (another worker on this host?)")
    assert "WORKER_METRICS_PORT" in record.getMessage()  # in a host's plain format too

    listened = []
    monkeypatch.setattr(prometheus_client, "start_http_server", lambda port, addr: listened.append((port, addr)))
    assert metrics.start_worker_metrics_server(9999) is True
    assert listened == [(9999, "127.0.0.1")]  # loopback unless told otherwise
    assert metrics.start_worker_metrics_server(0) is False
