"""The daily task report: counts of tasks, retries and dead letters over a day, kept and mailed."""

from __future__ import annotations

from datetime import date, datetime, timedelta
from typing import TYPE_CHECKING, Any

from django.conf import settings
from django.core.cache import cache
from django.db.models import Count, DurationField, ExpressionWrapper, F
from django.utils import timezone

from jobs.conf import jobs_settings

if TYPE_CHECKING:
    from jobs.models import DailyReport
from jobs.logging import get_logger

logger = get_logger(__name__)

RETRIES_KEY = "jobs:stats:retries:{day}"


def retry_count_add(task_name: str) -> None:
    """Counts one retry of `task_name` for today's report (best effort)."""
    key = RETRIES_KEY.format(day=timezone.now().date().isoformat())
    try:
        counts = cache.get(key) or {}
        counts[task_name] = counts.get(task_name, 0) + 1
        cache.set(key, counts, timeout=3 * 24 * 3600)
    except Exception:
        logger.debug("report.retry_count_failed", exc_info=True)


def daily_report_build(*, end: datetime | None = None) -> dict[str, Any]:
    """Counts over the 24 hours before `end`: tasks by name and state (django-celery-results),
    retries, dead letters created, and the slowest tasks."""
    from django_celery_results.models import TaskResult

    from jobs.models import DeadLetter

    end = end or timezone.now()
    start = end - timedelta(hours=24)
    results = TaskResult.objects.filter(date_done__gte=start, date_done__lt=end)
    by_task: dict[str, dict[str, int]] = {}
    totals: dict[str, int] = {}
    for row in results.values("task_name", "status").annotate(n=Count("id")).order_by():
        name = row["task_name"] or "<unknown>"
        by_task.setdefault(name, {})[row["status"]] = row["n"]
        totals[row["status"]] = totals.get(row["status"], 0) + row["n"]
    # The ten longest runs, picked by the database (never a row per run in this process); ties
    # in the results' own order, latest done first.
    duration = ExpressionWrapper(F("date_done") - F("date_created"), output_field=DurationField())
    longest = (
        results.exclude(date_created__isnull=True)
        .annotate(duration=duration)
        .order_by("-duration", "-date_done", "-pk")
        .values("task_name", "task_id", "date_created", "date_done")[:10]
    )
    slowest = [
        {
            "task_name": row["task_name"],
            "task_id": row["task_id"],
            "seconds": round((row["date_done"] - row["date_created"]).total_seconds(), 3),
        }
        for row in longest
    ]
    retries: dict[str, int] = {}
    for day in {start.date(), end.date()}:
        for name, n in (cache.get(RETRIES_KEY.format(day=day.isoformat())) or {}).items():
            retries[name] = retries.get(name, 0) + n
    dead = DeadLetter.objects.filter(failed_at__gte=start, failed_at__lt=end)
    dead_by_task = {
        r["task_name"]: r["n"] for r in dead.values("task_name").annotate(n=Count("id")).order_by("task_name")
    }
    return {
        "start": start.isoformat(),
        "end": end.isoformat(),
        "totals": totals,
        "by_task": by_task,
        "retries": retries,
        "dead_letters_created": sum(dead_by_task.values()),
        "dead_letters_by_task": dead_by_task,
        "slowest": slowest,
    }


def daily_report_text(data: dict[str, Any]) -> str:
    lines = [f"Task report {data['start'][:16]} .. {data['end'][:16]} UTC", ""]
    totals = ", ".join(f"{state.lower()} {n}" for state, n in sorted(data["totals"].items())) or "no tasks"
    lines += [
        f"All tasks: {totals}",
        f"Retries: {sum(data['retries'].values())}",
        f"Dead letters created: {data['dead_letters_created']}",
        "",
        "By task:",
    ]
    for name, states in sorted(data["by_task"].items()):
        counts = ", ".join(f"{state.lower()} {n}" for state, n in sorted(states.items()))
        lines.append(f"  {name}: {counts}; retries {data['retries'].get(name, 0)}")
    if data["slowest"]:
        lines += ["", "Slowest:"]
        lines += [f"  {r['seconds']:>9.3f} s  {r['task_name']}  {r['task_id']}" for r in data["slowest"]]
    return "\n".join(lines)


def daily_report_create(*, day: date | None = None, mail: bool = True) -> DailyReport:
    """Builds, stores (one row per day, replaced when rebuilt) and mails the report."""
    from django.core.mail import send_mail

    from jobs.models import DailyReport

    now = timezone.now()
    day = day or (now - timedelta(minutes=5)).date()
    data = daily_report_build(end=now)
    text = daily_report_text(data)
    report, _ = DailyReport.objects.update_or_create(day=day, defaults={"data": data, "text": text})
    if mail and jobs_settings.DEAD_LETTER_ALERT_EMAILS:
        try:
            send_mail(
                subject=f"[jobs] daily task report {day.isoformat()}",
                message=text,
                from_email=settings.DEFAULT_FROM_EMAIL,
                recipient_list=jobs_settings.DEAD_LETTER_ALERT_EMAILS,
            )
        except Exception:
            logger.exception("report.mail_failed")
    logger.info("report.created", extra={"day": day.isoformat(), "dead_letters_created": data["dead_letters_created"]})
    return report
