"""The benchmarks measure what ships (issue 19): the benchmarked task is declared the way an
application declares one, and the shipped side runs the project's worker with its defaults."""

from __future__ import annotations

import pytest
from celery import shared_task
from django.conf import settings

from bench import throughput
from bench.tasks import noop_shipped
from jobs.base import JobTask

#: What decides how a task runs and what it costs.
ATTRIBUTES = (
    "ignore_result",
    "store_errors_even_if_ignored",
    "track_started",
    "send_events",
    "acks_late",
    "acks_on_failure_or_timeout",
    "reject_on_worker_lost",
    "time_limit",
    "soft_time_limit",
    "rate_limit",
    "serializer",
    "Request",
    "backend",
)


@shared_task(base=JobTask, name="tests.bench.reference")
def reference(key: str, sent_at: float | None = None) -> None:
    """A task as an application declares it: a name and nothing else."""


@pytest.mark.parametrize("attribute", ATTRIBUTES)
def test_the_benchmarked_task_is_declared_like_an_applications_task(attribute):
    assert getattr(noop_shipped, attribute) == getattr(reference, attribute)


def test_the_benchmarked_task_keeps_history_and_sends_events():
    # The shipped defaults the first benchmark left out (it measured `ignore_result=True`).
    assert noop_shipped.ignore_result is False
    assert noop_shipped.track_started is True
    assert noop_shipped.send_events is True
    assert settings.CELERY_WORKER_SEND_TASK_EVENTS is True
    assert isinstance(noop_shipped._get_current_object(), JobTask)


def test_the_shipped_side_runs_the_project_worker_with_its_defaults():
    sides = throughput.sides(split=False)
    shipped, stock = sides["shipped"], sides["stock"]
    assert (shipped.app, shipped.producer, shipped.args) == ("config", "shipped", [])
    # Nothing but the log format and the production log level (the settings' default).
    assert shipped.env == {"LOG_LEVEL": "INFO", "LOG_FORMAT": "json"}
    # The baseline is stock Celery as a Flower user runs it: task events on.
    assert (stock.app, stock.args, stock.loglevel) == ("bench.plain_app", ["-E"], "INFO")
