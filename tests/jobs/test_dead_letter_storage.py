"""What a dead letter keeps: arguments that replay as their original types, and rows kept by
retention as long as they were active recently (failed, requeued or discarded)."""

from __future__ import annotations

import base64
import json
import uuid
from datetime import UTC, datetime, timedelta
from decimal import Decimal

import pytest
from django.utils import timezone
from kombu.utils import json as kombu_json

from jobs.models import DeadLetter
from jobs.services import dead_letter_record, dead_letters_purge
from tests.jobs.factories import DeadLetterFactory

pytestmark = pytest.mark.django_db


def record(**overrides):
    fields = {
        "task_name": "tests.permanent",
        "task_id": "tid-1",
        "queue": "normal",
        "args": [],
        "kwargs": {},
        "exc_type": "PermanentError",
        "exc_message": "nope",
        "traceback": "",
        "retries": 0,
        "reason": DeadLetter.Reason.PERMANENT_ERROR,
        "alert": False,
    }
    return dead_letter_record(**{**fields, **overrides})


def test_stored_arguments_reach_the_task_again_as_their_original_types(redis_client):
    from config.celery import app

    when = datetime(2024, 5, 1, 12, 30, tzinfo=UTC)
    ident = uuid.UUID("5f2b7c1e-8a3d-4e6f-9b0a-1c2d3e4f5a6b")
    row = record(args=[when, Decimal("9.99"), b"\x00\x01"], kwargs={"order": ident, "day": when.date()})
    row.refresh_from_db()  # what the JSONField gives back
    assert row.redacted is False

    app.send_task(row.task_name, args=row.args, kwargs=row.kwargs, queue="normal")
    message = json.loads(redis_client.lindex("normal", 0))
    assert message["content-type"] == "application/json"
    args, kwargs, _embed = kombu_json.loads(base64.b64decode(message["body"]))  # as the worker decodes it
    assert args == [when, Decimal("9.99"), b"\x00\x01"]
    assert kwargs == {"order": ident, "day": when.date()}


def test_an_argument_that_cannot_be_stored_makes_the_row_unreplayable():
    row = record(args=[{1, 2}])
    assert row.redacted is True
    assert row.args == ["{1, 2}"]


def test_purge_ages_rows_by_their_latest_activity():
    now = timezone.now()
    weeks_ago, days = now - timedelta(days=40), timedelta(days=30)
    requeued_today = DeadLetterFactory(status=DeadLetter.Status.REQUEUED, failed_at=weeks_ago, requeued_at=now)
    discarded_today = DeadLetterFactory(status=DeadLetter.Status.DISCARDED, failed_at=weeks_ago, discarded_at=now)
    requeued_long_ago = DeadLetterFactory(
        status=DeadLetter.Status.REQUEUED, failed_at=weeks_ago, requeued_at=now - timedelta(days=35)
    )
    discarded_long_ago = DeadLetterFactory(
        status=DeadLetter.Status.DISCARDED, failed_at=weeks_ago, discarded_at=now - timedelta(days=31)
    )
    no_dates = DeadLetterFactory(status=DeadLetter.Status.DISCARDED, failed_at=weeks_ago)  # nulls: failed_at counts
    # Requeued long ago, failed again recently (requeued_at older than failed_at): kept.
    failed_again = DeadLetterFactory(
        status=DeadLetter.Status.REQUEUED, failed_at=now - timedelta(days=1), requeued_at=weeks_ago
    )

    assert dead_letters_purge(older_than=days, actor="t", dry_run=True) == 3
    assert dead_letters_purge(older_than=days, actor="t") == 3
    assert set(DeadLetter.objects.values_list("pk", flat=True)) == {
        requeued_today.pk,
        discarded_today.pk,
        failed_again.pk,
    }
    assert not DeadLetter.objects.filter(pk__in=[requeued_long_ago.pk, discarded_long_ago.pk, no_dates.pk]).exists()


def test_a_job_requeued_today_that_dies_again_keeps_its_row_through_retention():
    first = record(task_id="tid-1")
    DeadLetter.objects.filter(pk=first.pk).update(
        status=DeadLetter.Status.REQUEUED,
        failed_at=timezone.now() - timedelta(days=40),
        requeued_at=timezone.now(),
    )
    assert dead_letters_purge(older_than=timedelta(days=30), actor="retention") == 0

    again = record(task_id="tid-2", dead_letter_id=str(first.pk))  # the requeued job fails again
    assert again.pk == first.pk
    assert again.failure_count == 2
    assert DeadLetter.objects.count() == 1
