"""The project's default periodic schedules, and the service that seeds them."""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

from django.db import transaction
from django_celery_beat.models import CrontabSchedule, IntervalSchedule, PeriodicTask, PeriodicTasks


@dataclass(frozen=True)
class DefaultSchedule:
    name: str
    task: str
    description: str
    every_seconds: int | None = None
    crontab: dict[str, str] | None = None
    expire_seconds: int | None = None


DEFAULT_SCHEDULES = (
    DefaultSchedule(
        name="jobs: heartbeat",
        task="jobs.heartbeat",
        every_seconds=30,
        expire_seconds=25,
        description="Records that a worker consumes; read by /api/jobs/health/.",
    ),
    DefaultSchedule(
        name="jobs: outbox relay",
        task="jobs.outbox_relay",
        every_seconds=10,
        expire_seconds=10,
        description="Publishes jobs waiting in the outbox; republishes jobs the broker lost (jobs.runtime.ledger).",
    ),
    DefaultSchedule(
        name="jobs: temporary file cleanup",
        task="jobs.cleanup_temp_files",
        crontab={"minute": "7"},
        description="Removes temporary files older than CLEANUP_MAX_AGE_HOURS.",
    ),
    DefaultSchedule(
        name="jobs: dead letter retention",
        task="jobs.dead_letter_retention",
        crontab={"minute": "17", "hour": "3"},
        description="Purges requeued and discarded dead letters older than JOBS_DEAD_LETTER_RETENTION_DAYS.",
    ),
    DefaultSchedule(
        name="jobs: daily task report",
        task="jobs.daily_report",
        crontab={"minute": "5", "hour": "0"},
        description="Counts by task and state, retries, dead letters and slowest tasks of the last day.",
    ),
    DefaultSchedule(
        name="celery: result cleanup",
        task="celery.backend_cleanup",
        crontab={"minute": "0", "hour": "4"},
        description="Deletes task results older than CELERY_RESULT_EXPIRES.",
    ),
)


def _schedule_fields(default: DefaultSchedule) -> dict[str, Any]:
    if default.every_seconds is not None:
        interval, _ = IntervalSchedule.objects.get_or_create(
            every=default.every_seconds, period=IntervalSchedule.SECONDS
        )
        return {"interval": interval, "crontab": None, "solar": None, "clocked": None}
    fields = {"minute": "*", "hour": "*", "day_of_week": "*", "day_of_month": "*", "month_of_year": "*"}
    fields.update(default.crontab or {})
    crontab = CrontabSchedule.objects.filter(**fields, timezone="UTC").first()
    if crontab is None:
        crontab = CrontabSchedule.objects.create(**fields, timezone="UTC")
    return {"interval": None, "crontab": crontab, "solar": None, "clocked": None}


def schedules_setup(*, reset: bool = False) -> dict[str, list[str]]:
    """Creates each default schedule that is missing; keeps the ones that exist as staff left them,
    unless `reset`, which puts the defaults back. A default is found by its name, or else by its
    task (staff may have renamed it: a second copy would run the task twice). Returns names by
    outcome."""
    outcome: dict[str, list[str]] = {"created": [], "kept": [], "reset": []}
    with transaction.atomic():
        for default in DEFAULT_SCHEDULES:
            existing = (
                PeriodicTask.objects.filter(name=default.name).first()
                or PeriodicTask.objects.filter(task=default.task).order_by("pk").first()
            )
            if existing is not None and not reset:
                outcome["kept"].append(default.name)
                continue
            values = {
                "task": default.task,
                "description": default.description,
                "enabled": True,
                "args": json.dumps([]),
                "kwargs": json.dumps({}),
                "queue": None,
                "expire_seconds": default.expire_seconds,
                "one_off": False,
                **_schedule_fields(default),
            }
            if existing is None:
                PeriodicTask.objects.create(name=default.name, **values)
                outcome["created"].append(default.name)
            else:
                for name, value in values.items():
                    setattr(existing, name, value)
                existing.name = default.name
                existing.last_run_at = None
                existing.save()
                outcome["reset"].append(default.name)
        if outcome["created"] or outcome["reset"]:
            PeriodicTasks.update_changed()
    return outcome
