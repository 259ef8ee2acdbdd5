"""Dead-letter services against the real test database and the suite's Redis broker."""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
import threading
from datetime import timedelta

import pytest
from django.db import InterfaceError, OperationalError, close_old_connections, connection
from django.utils import timezone

from config.env import BASE_DIR
from jobs import services
from jobs.models import DeadLetter, DeadLetterPurge
from jobs.services import dead_letter_record, dead_letters_discard, dead_letters_purge, dead_letters_requeue
from jobs.signals import dead_letter_created
from tests.jobs.factories import DeadLetterFactory

pytestmark = pytest.mark.django_db


def record(**overrides):
    fields = {
        "task_name": "tests.permanent",
        "task_id": "tid-1",
        "queue": "normal",
        "args": ["k"],
        "kwargs": {"token": "s3cret", "n": 1},
        "exc_type": "PermanentError",
        "exc_message": "nope",
        "traceback": "Traceback ...",
        "retries": 0,
        "reason": DeadLetter.Reason.PERMANENT_ERROR,
        "request_id": "rid-1",
        "worker": "w1@host",
    }
    return dead_letter_record(**{**fields, **overrides})


def test_record_creates_a_row_with_redacted_arguments_and_an_event(caplog):
    received = []
    dead_letter_created.connect(lambda **kw: received.append(kw), weak=False, dispatch_uid="t1")
    try:
        with caplog.at_level(logging.ERROR, logger="jobs.dead_letters"):
            row = record()
    finally:
        dead_letter_created.disconnect(dispatch_uid="t1")
    assert row.kwargs == {"token": "***", "n": 1}
    assert row.redacted is True
    assert row.status == DeadLetter.Status.PENDING
    assert list(row.events.values_list("action", flat=True)) == ["failed"]
    assert received[0]["dead_letter"] == row
    assert received[0]["created"] is True
    line = next(r for r in caplog.records if r.msg == "dead_letter.created")
    assert line.dead_letter_id == row.pk
    assert "s3cret" not in caplog.text


def test_record_with_a_dead_letter_id_reuses_the_row():
    first = record()
    DeadLetter.objects.filter(pk=first.pk).update(status=DeadLetter.Status.REQUEUED)
    again = record(task_id="tid-2", exc_message="still nope", dead_letter_id=str(first.pk))
    assert again.pk == first.pk
    assert again.failure_count == 2
    assert again.status == DeadLetter.Status.PENDING
    assert again.task_id == "tid-2"
    assert DeadLetter.objects.count() == 1


def test_a_repeated_report_of_the_same_attempt_is_folded_into_its_row():
    first = record(exc_type="SoftTimeLimitExceeded")
    again = record(exc_type="TimeLimitExceeded")
    assert again.pk == first.pk
    assert again.failure_count == 1
    assert again.exception_type == "TimeLimitExceeded"
    assert DeadLetter.objects.count() == 1


def test_record_with_an_unknown_dead_letter_id_creates_a_row():
    row = record(dead_letter_id="not-a-number")
    assert row.failure_count == 1


def test_record_falls_back_to_a_log_line_when_the_database_fails(monkeypatch, caplog):
    def broken(*args, **kwargs):
        raise OperationalError("database is down")

    monkeypatch.setattr(DeadLetter.objects, "create", broken)
    with caplog.at_level(logging.ERROR, logger="jobs.dead_letters"):
        assert record() is None
    line = next(r for r in caplog.records if r.msg == "dead_letter.unsaved")
    assert line.dead_letter["task_name"] == "tests.permanent"
    assert line.dead_letter["args"] == ["k"]
    assert line.dead_letter["kwargs"] == {"token": "***", "n": 1}
    assert line.exc_info is not None


def test_record_falls_back_to_a_log_line_when_the_connection_is_gone(monkeypatch, caplog):
    # "connection already closed" is an InterfaceError, which is not a DatabaseError.
    def closed(*args, **kwargs):
        raise InterfaceError("connection already closed")

    monkeypatch.setattr(DeadLetter.objects, "create", closed)
    with caplog.at_level(logging.ERROR, logger="jobs.dead_letters"):
        assert record() is None
    assert any(r.msg == "dead_letter.unsaved" for r in caplog.records)


def test_requeue_publishes_and_marks_rows(redis_client):
    rows = DeadLetterFactory.create_batch(3)
    result = dead_letters_requeue(dead_letters=DeadLetter.objects.all(), actor="admin:ops")
    assert result.count == 3
    assert redis_client.llen("normal") == 3
    message = json.loads(redis_client.lindex("normal", 0))
    assert message["headers"]["task"] == "tests.permanent"
    assert int(message["headers"]["dead_letter_id"]) in {r.pk for r in rows}
    for row in DeadLetter.objects.all():
        assert row.status == DeadLetter.Status.REQUEUED
        assert row.requeue_count == 1
        assert row.requeued_by == "admin:ops"
        assert row.events.filter(action="requeued", actor="admin:ops", task_id=row.requeued_task_id).exists()


def test_requeue_skips_rows_that_are_not_pending_or_were_redacted(redis_client):
    DeadLetterFactory(status=DeadLetter.Status.DISCARDED)
    redacted = DeadLetterFactory(redacted=True)
    ok = DeadLetterFactory()
    result = dead_letters_requeue(dead_letters=DeadLetter.objects.all(), actor="t", batch_size=1)
    assert result.requeued == [(ok.pk, result.requeued[0][1])]
    assert result.skipped == [(redacted.pk, "arguments were redacted when stored")]
    assert redis_client.llen("normal") == 1


def test_requeue_dry_run_changes_nothing(redis_client):
    DeadLetterFactory.create_batch(2)
    result = dead_letters_requeue(dead_letters=DeadLetter.objects.all(), actor="t", dry_run=True)
    assert result.count == 2
    assert redis_client.llen("normal") == 0
    assert DeadLetter.objects.filter(status="pending").count() == 2


def test_requeue_reports_progress(redis_client):
    DeadLetterFactory.create_batch(5)
    seen = []
    dead_letters_requeue(dead_letters=DeadLetter.objects.all(), actor="t", batch_size=2, progress=seen.append)
    assert seen == [2, 4, 5]


def test_requeue_while_the_broker_is_down_keeps_the_jobs_in_the_outbox(dead_broker, django_capture_on_commit_callbacks):
    """The first batch is written to the ledger before anything is published: the broker being down
    loses nothing; the relay publishes those jobs later. The run stops there: later batches stay
    pending, and no publish ever happens inside the batch's transaction."""
    from jobs.models import OutboxMessage

    DeadLetterFactory.create_batch(3)
    result = dead_letters_requeue(dead_letters=DeadLetter.objects.all(), actor="t", batch_size=2)
    assert "publishing failed" in result.error
    assert result.count == 2
    assert [pk for pk, _ in result.waiting] == [pk for pk, _ in result.requeued]
    assert DeadLetter.objects.filter(status="pending").count() == 1
    waiting = OutboxMessage.objects.filter(task_id__in=[task_id for _, task_id in result.waiting])
    assert waiting.count() == 2
    assert all(row.published_at is None for row in waiting)
    assert {row.options["headers"]["dead_letter_id"] for row in waiting} == {pk for pk, _ in result.requeued}


@pytest.mark.django_db(transaction=True)
def test_requeue_never_publishes_inside_its_transaction(redis_client, publishes_in_transaction):
    """SQLite holds its write lock for the whole transaction: a publish inside it would make every
    other writer wait on the broker."""
    DeadLetterFactory.create_batch(2)
    assert dead_letters_requeue(dead_letters=DeadLetter.objects.all(), actor="t").count == 2
    assert publishes_in_transaction == [False, False]


@pytest.mark.django_db(transaction=True)
def test_two_operators_requeueing_at_once_publish_each_row_once(redis_client):
    DeadLetterFactory.create_batch(40)
    results = []
    barrier = threading.Barrier(2)

    def operator(name):
        close_old_connections()
        try:
            barrier.wait()
            results.append(dead_letters_requeue(dead_letters=DeadLetter.objects.all(), actor=name, batch_size=10))
        finally:
            close_old_connections()

    threads = [threading.Thread(target=operator, args=(f"op{i}",)) for i in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    assert sum(r.count for r in results) == 40
    assert redis_client.llen("normal") == 40
    assert set(DeadLetter.objects.values_list("requeue_count", flat=True)) == {1}


def test_discard_marks_only_pending_rows():
    pending = DeadLetterFactory.create_batch(2)
    DeadLetterFactory(status=DeadLetter.Status.REQUEUED)
    assert dead_letters_discard(dead_letters=DeadLetter.objects.all(), actor="admin:ops") == 2
    for row in pending:
        row.refresh_from_db()
        assert row.status == DeadLetter.Status.DISCARDED
        assert row.discarded_by == "admin:ops"
        assert row.events.filter(action="discarded").count() == 1


def test_purge_deletes_only_old_finished_rows():
    old = timezone.now() - timedelta(days=40)
    DeadLetterFactory(status=DeadLetter.Status.REQUEUED, failed_at=old)
    DeadLetterFactory(status=DeadLetter.Status.DISCARDED, failed_at=old)
    keep_pending = DeadLetterFactory(failed_at=old)
    keep_recent = DeadLetterFactory(status=DeadLetter.Status.DISCARDED)
    assert dead_letters_purge(older_than=timedelta(days=30), actor="t", dry_run=True) == 2
    assert DeadLetter.objects.count() == 4
    assert not DeadLetterPurge.objects.exists()  # a dry run leaves no trace
    assert dead_letters_purge(older_than=timedelta(days=30), actor="t") == 2
    assert set(DeadLetter.objects.values_list("pk", flat=True)) == {keep_pending.pk, keep_recent.pk}
    purge = DeadLetterPurge.objects.get()
    assert (purge.actor, purge.count, purge.older_than) == ("t", 2, timedelta(days=30))
    assert purge.statuses == ["discarded", "requeued"]


@pytest.mark.django_db(transaction=True)
def test_throttled_requeue_waits_between_committed_batches(redis_client, monkeypatch):
    """`--rate` must not sleep inside a transaction: that would hold row locks (and SQLite's
    write lock) for the whole pause, and web and worker writes would time out behind it."""
    DeadLetterFactory.create_batch(5)
    pauses = []

    def sleep(seconds):
        assert not connection.in_atomic_block, "slept while holding the batch's locks"
        assert DeadLetter.objects.filter(status="requeued").count() == 2 * (len(pauses) + 1)
        pauses.append(seconds)

    monkeypatch.setattr(services.time, "sleep", sleep)
    result = dead_letters_requeue(dead_letters=DeadLetter.objects.all(), actor="t", rate=2)
    assert result.count == 5
    assert len(pauses) == 2  # batches of 2, 2 and 1; no pause after the last
    assert all(0 < p <= 1 for p in pauses)


def test_importing_the_jobs_modules_publishes_nothing(redis_server):
    """Setting Django up and importing every `jobs` module (what a web or worker process does at
    start) sends no task: counted with Celery's own publish signal, connected before anything."""
    code = (
        "import pkgutil, importlib\n"
        "from celery import signals\n"
        "sent = []\n"
        "signals.before_task_publish.connect(lambda **kw: sent.append(kw.get('sender')), weak=False)\n"
        "import django\n"
        "django.setup()\n"
        "import jobs\n"
        "for module in pkgutil.walk_packages(jobs.__path__, 'jobs.'):\n"
        "    if '.migrations' not in module.name:\n"
        "        importlib.import_module(module.name)\n"
        "print('published', sent)\n"
    )
    env = {**os.environ, "DJANGO_SETTINGS_MODULE": "config.settings.test", "CELERY_BROKER_URL": redis_server.url}
    done = subprocess.run(
        [sys.executable, "-c", code], cwd=BASE_DIR, env=env, capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.strip().splitlines()[-1] == "published []"
