"""The operator's dashboard (`/admin/jobs/dashboard/`): what the project already measures, on one
page.

It only reads: the broker (queue depths; on Redis, the oldest message of each queue), the task
history (django-celery-results' rows: throughput), the ledger, the dead letters, django-celery-beat's
schedules, the heartbeats, and one broadcast to the workers. Nothing is written per task to feed it.
Each section is read on its own: a broker that does not answer empties the sections it feeds and
says why, the rest of the page stays.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

from django.db.models import Count, Q
from django.db.models.functions import Coalesce, TruncHour, TruncMinute
from django.utils import timezone
from django.utils.dateparse import parse_datetime
from django.utils.html import format_html
from django.utils.safestring import SafeString

from jobs.logging import get_logger
from jobs.models import DeadLetter, OutboxMessage
from jobs.redaction import redact_text

logger = get_logger("jobs.dashboard")

#: Throughput is counted per minute over this many minutes.
THROUGHPUT_MINUTES = 60
#: Dead letters are counted per hour over this many hours.
TREND_HOURS = 24
#: How long the workers are given to answer the dashboard's broadcast (seconds).
INSPECT_TIMEOUT = 1.0
#: How often the page reads itself again (seconds).
REFRESH_SECONDS = 10
#: Groups of dead letters and schedules shown (the admin lists have the rest).
MAX_ROWS = 30
#: How far before a schedule's saved last run its outcome is looked for (beat saves
#: `last_run_at` every few minutes, not at each run).
LAST_OUTCOME_SLACK = timedelta(hours=1)
#: A queue's jobs finished with a task name no route maps to a declared queue.
OTHER = "other"


@dataclass
class Read:
    """One section of the page: its value, or why it could not be read."""

    value: Any = None
    error: str = ""
    hidden: str = ""  # why this user does not see it (a permission they lack)


def _read(what: str, reader: Callable[[], Any]) -> Read:
    try:
        return Read(value=reader())
    except Exception as exc:  # noqa: BLE001 - one section down never takes the page with it
        logger.warning("dashboard.read_failed", extra={"section": what, "error": f"{type(exc).__name__}: {exc}"})
        return Read(error=redact_text(f"{type(exc).__name__}: {exc}")[:300])


# --- charts --------------------------------------------------------------------------------------


def bar_chart(
    series: Sequence[tuple[str, Sequence[int], str]],
    labels: Sequence[str],
    *,
    width: int = 240,
    height: int = 40,
    title: str = "",
) -> SafeString:
    """A small stacked bar chart as inline SVG: `series` is (name, one value per bar, CSS colour),
    stacked in that order; `labels` names each bar, shown on hover with its values. The server
    draws it: no script, no build step."""
    bars = len(labels)
    totals = [sum(values[i] for _, values, _ in series) for i in range(bars)]
    top = max(totals, default=0) or 1
    step = width / max(bars, 1)
    gap = 1.0 if step > 3 else 0.0
    shapes = []
    for i, label in enumerate(labels):
        x = f"{i * step:.1f}"
        y = float(height)
        parts = []
        for name, values, colour in series:
            if not values[i]:
                continue
            h = max(values[i] / top * (height - 2), 1.0)
            y -= h
            shapes.append(
                format_html(
                    '<rect x="{}" y="{}" width="{}" height="{}" style="fill:{}"/>',
                    x,
                    f"{y:.1f}",
                    f"{step - gap:.1f}",
                    f"{h:.1f}",
                    colour,
                )
            )
            parts.append(f"{values[i]} {name}")
        # A transparent bar of full height carries the hover text, an empty one too.
        shapes.append(
            format_html(
                '<rect x="{}" y="0" width="{}" height="{}" class="hover"><title>{}: {}</title></rect>',
                x,
                f"{step:.1f}",
                height,
                label,
                ", ".join(parts) or "none",
            )
        )
    return format_html(
        '<svg class="chart" role="img" viewBox="0 0 {w} {h}" width="{w}" height="{h}" aria-label="{t}">'
        '<title>{t}</title><line x1="0" y1="{h}" x2="{w}" y2="{h}" class="axis"/>{body}</svg>',
        w=width,
        h=height,
        t=title,
        body=SafeString("".join(shapes)),
    )


# --- the sections --------------------------------------------------------------------------------


@dataclass
class QueueRow:
    name: str
    depth: int | None = None
    oldest_waiting: float | None = None  # seconds; None: empty, or not known
    succeeded: list[int] = field(default_factory=list)
    failed: list[int] = field(default_factory=list)
    chart: SafeString | None = None

    @property
    def done(self) -> int:
        return sum(self.succeeded) + sum(self.failed)


def _minutes(now: datetime, count: int) -> list[datetime]:
    """The start of each of the last `count` minutes (UTC), oldest first, the current one last."""
    this = now.astimezone(UTC).replace(second=0, microsecond=0)
    return [this - timedelta(minutes=count - 1 - i) for i in range(count)]


def _hours(now: datetime, count: int) -> list[datetime]:
    this = now.astimezone(UTC).replace(minute=0, second=0, microsecond=0)
    return [this - timedelta(hours=count - 1 - i) for i in range(count)]


def _bucket(moment: datetime | None) -> datetime | None:
    return None if moment is None else moment.astimezone(UTC)


def queue_of(task_name: str | None, queues: Iterable[str]) -> str:
    """The declared queue a task's jobs go to by default: its route (`task_routes`), else its own
    `queue`, else the default queue; a Django task's queue from its priority and `queue_name`.
    A job sent elsewhere by hand (`apply_async(queue=...)`) is counted under its route."""
    from celery import current_app as app

    declared = set(queues)
    if not task_name:
        return OTHER
    _import_task_modules()
    task = app.tasks.get(task_name)
    django_task = getattr(task, "django_task", None)
    queue: Any = None
    try:
        if callable(django_task):
            from jobs.tasks_compat import task_backends

            found = django_task()
            queue = task_backends[found.backend].queue_for(found)  # type: ignore[attr-defined] # a CeleryBackend
        else:
            own = getattr(task, "queue", None)
            routed = app.amqp.router.route({"queue": own} if own else {}, task_name)
            queue = routed.get("queue")
            queue = getattr(queue, "name", queue) or app.conf.task_default_queue
    except Exception:  # noqa: BLE001 - a task gone from the code, a route that needs the arguments
        queue = None
    return queue if queue in declared else OTHER


_imported = False


def _import_task_modules() -> None:
    """Imports the project's task modules as a worker does (Celery's autodiscovery is lazy, and a
    web process may not have imported them): a task's own queue and a Django task's priority are
    known only once its module is."""
    global _imported
    if _imported:
        return
    from celery import current_app as app

    try:
        app.loader.import_default_modules()
    except Exception:
        logger.warning("dashboard.import_failed", exc_info=True)
    _imported = True


def queues_overview(now: datetime) -> dict[str, Any]:
    """Each declared queue: depth and oldest waiting job (from the broker), and the jobs finished
    in each of the last `THROUGHPUT_MINUTES` minutes, succeeded and failed (from the task history)."""
    from celery import states
    from django_celery_results.models import TaskResult

    from jobs.selectors import queue_heads, queue_lengths, queue_names

    names = queue_names()
    rows = {name: QueueRow(name=name) for name in names}
    broker = _read("broker", lambda: (queue_lengths(names), queue_heads(names)))
    if not broker.error:
        depths, heads = broker.value
        oldest = oldest_ages(heads, now)
        for name, row in rows.items():
            row.depth = depths.get(name)
            row.oldest_waiting = oldest.get(name)

    minutes = _minutes(now, THROUGHPUT_MINUTES)
    index = {minute: i for i, minute in enumerate(minutes)}
    history = (
        TaskResult.objects.filter(date_done__gte=minutes[0], status__in=states.READY_STATES)
        .annotate(minute=TruncMinute("date_done", tzinfo=UTC))
        .values("task_name", "status", "minute")
        .annotate(n=Count("id"))
        .order_by()
    )
    routes: dict[str | None, str] = {}
    for entry in history:
        i = index.get(_bucket(entry["minute"]))  # type: ignore[arg-type]
        if i is None:
            continue
        name = entry["task_name"]
        if name not in routes:
            routes[name] = queue_of(name, names)
        row = rows.setdefault(routes[name], QueueRow(name=routes[name]))
        if not row.succeeded:
            row.succeeded, row.failed = [0] * len(minutes), [0] * len(minutes)
        target = row.succeeded if entry["status"] == states.SUCCESS else row.failed
        target[i] += entry["n"]
    labels = [f"{minute.astimezone(timezone.get_current_timezone()):%H:%M}" for minute in minutes]
    for row in rows.values():
        if not row.succeeded:
            row.succeeded, row.failed = [0] * len(minutes), [0] * len(minutes)
        row.chart = bar_chart(
            [("succeeded", row.succeeded, "var(--jobs-ok)"), ("failed", row.failed, "var(--jobs-bad)")],
            labels,
            title=f"Jobs of {row.name} finished per minute, last {THROUGHPUT_MINUTES} minutes",
        )
    ordered = [rows[name] for name in names] + [row for name, row in rows.items() if name not in names]
    from jobs.selectors import paused_queues

    return {"rows": ordered, "broker_error": broker.error, "minutes": THROUGHPUT_MINUTES, "paused": paused_queues()}


def workers_overview() -> list[dict[str, Any]]:
    """The workers that answered a broadcast within `INSPECT_TIMEOUT`: pool, concurrency, queues,
    what they run now. Raises when the broker does not answer."""
    from celery import current_app as app

    from jobs.selectors import BROKER_TIMEOUT

    def ask(method: str) -> dict[str, Any]:
        # A connection of its own, refused fast: the app's pooled one retries connecting for
        # `broker_connection_timeout` and would stall the page on a broker that is down.
        with app.connection_for_write(connect_timeout=BROKER_TIMEOUT) as conn:
            conn.ensure_connection(max_retries=0, timeout=BROKER_TIMEOUT)
            return getattr(app.control.inspect(timeout=INSPECT_TIMEOUT, connection=conn), method)() or {}

    with ThreadPoolExecutor(max_workers=3, thread_name_prefix="dashboard-inspect") as pool:
        asked = {method: pool.submit(ask, method) for method in ("stats", "active", "active_queues")}
        stats, active, queues = (asked[m].result() for m in ("stats", "active", "active_queues"))
    now = datetime.now(UTC).timestamp()
    workers = []
    for name in sorted(set(stats) | set(active)):
        info = stats.get(name) or {}
        pool_info = info.get("pool") or {}
        implementation = str(pool_info.get("implementation") or "")
        running: list[dict[str, Any]] = []
        for job in active.get(name) or []:
            started = job.get("time_start")
            running.append(
                {
                    "name": job.get("name") or job.get("type") or "?",
                    "id": job.get("id") or "",
                    "for_seconds": max(now - started, 0.0) if isinstance(started, int | float) else None,
                }
            )
        workers.append(
            {
                "name": name,
                "pool": implementation.rsplit(":", 1)[0].rsplit(".", 1)[-1] or "?",
                "concurrency": pool_info.get("max-concurrency"),
                "processes": len(pool_info.get("processes") or []),
                "uptime": info.get("uptime"),
                "done": sum((info.get("total") or {}).values()),
                "queues": sorted(q.get("name", "?") for q in queues.get(name) or []),
                "active": sorted(running, key=lambda job: -(job["for_seconds"] or 0)),
            }
        )
    return workers


def dead_letter_overview(now: datetime) -> dict[str, Any]:
    """Counts by status, new dead letters per hour over `TREND_HOURS` hours, and the pending ones
    grouped by cause (task and exception), each with its own trend."""
    from jobs.selectors import dead_letter_counts, dead_letter_groups

    hours = _hours(now, TREND_HOURS)
    index = {hour: i for i, hour in enumerate(hours)}
    per_cause: dict[tuple[str, str], list[int]] = {}
    total = [0] * len(hours)
    rows = (
        DeadLetter.objects.filter(failed_at__gte=hours[0])
        .annotate(hour=TruncHour("failed_at", tzinfo=UTC))
        .values("task_name", "exception_type", "hour")
        .annotate(n=Count("id"))
        .order_by()
    )
    for entry in rows:
        i = index.get(_bucket(entry["hour"]))  # type: ignore[arg-type]
        if i is None:
            continue
        counts = per_cause.setdefault((entry["task_name"], entry["exception_type"]), [0] * len(hours))
        counts[i] += entry["n"]
        total[i] += entry["n"]
    labels = [f"{hour.astimezone(timezone.get_current_timezone()):%d %b %H:%M}" for hour in hours]
    groups = []
    all_groups = dead_letter_groups(limit=MAX_ROWS + 1)
    for group in all_groups[:MAX_ROWS]:
        trend = per_cause.get((group["task_name"], group["exception_type"]), [0] * len(hours))
        groups.append(
            {
                **group,
                "recent": sum(trend),
                "permanent": 0,
                "chart": bar_chart(
                    [("failed", trend, "var(--jobs-bad)")], labels, width=120, height=24, title="Failed per hour"
                ),
            }
        )
    _count_permanent(groups)
    return {
        "counts": dead_letter_counts(),
        "groups": groups,
        "more_groups": len(all_groups) > MAX_ROWS,
        "recent": sum(total),
        "hours": TREND_HOURS,
        "chart": bar_chart(
            [("new dead letters", total, "var(--jobs-bad)")],
            labels,
            width=480,
            height=48,
            title=f"New dead letters per hour, last {TREND_HOURS} hours",
        ),
    }


def _count_permanent(groups: list[dict[str, Any]]) -> None:
    """How many pending dead letters of each group failed with a permanent error (they will fail
    again if requeued as they are)."""
    if not groups:
        return
    causes = Q()
    for group in groups:
        causes |= Q(task_name=group["task_name"], exception_type=group["exception_type"])
    counts = (
        DeadLetter.objects.filter(causes, status=DeadLetter.Status.PENDING, reason=DeadLetter.Reason.PERMANENT_ERROR)
        .values("task_name", "exception_type")
        .annotate(n=Count("id"))
        .order_by()
    )
    found = {(row["task_name"], row["exception_type"]): row["n"] for row in counts}
    for group in groups:
        group["permanent"] = found.get((group["task_name"], group["exception_type"]), 0)


def schedules_overview(now: datetime) -> dict[str, Any]:
    """django-celery-beat's schedules: what, when next, when last, and how the last run ended
    (the task history row beat's run left, found by the schedule's name)."""
    from django_celery_beat.models import PeriodicTask
    from django_celery_results.models import TaskResult

    tasks = list(
        PeriodicTask.objects.select_related("interval", "crontab", "solar", "clocked").order_by("-enabled", "name")[
            : MAX_ROWS + 1
        ]
    )
    rows = []
    for task in tasks[:MAX_ROWS]:
        runs = [
            _run(row)
            # A bounded read: the history of a schedule that runs every few seconds is long.
            for row in TaskResult.objects.filter(periodic_task_name=task.name, date_done__gte=now - LAST_RUNS_WINDOW)
            .order_by("-date_done")
            .values("status", "date_started", "date_done", "task_id", "meta")[:LAST_RUNS]
        ]
        last = None
        if task.last_run_at is not None and runs and runs[0]["date_done"] >= task.last_run_at - LAST_OUTCOME_SLACK:
            last = runs[0]  # the run beat saved last, not an older one
        rows.append(
            {
                "task": task,
                "schedule": _describe_schedule(task),
                "next_run": _next_run(task, now),
                "last_outcome": last,
                "runs": runs,
            }
        )
    return {"rows": rows, "more": len(tasks) > MAX_ROWS}


#: A schedule's runs the dashboard shows on its row, from its history of the last two days.
LAST_RUNS = 3
LAST_RUNS_WINDOW = timedelta(days=2)


def _run(row: Mapping[str, Any]) -> dict[str, Any]:
    """One run of a schedule from its task history row, with its lateness: its start minus the
    beat tick that found it due (`meta.due_at`, written by `jobs.runtime.beat`), None if unknown."""
    lateness = None
    try:
        due = parse_datetime(str(json.loads(row.get("meta") or "{}").get("due_at") or ""))
    except (ValueError, TypeError, AttributeError):
        due = None
    if due is not None and row.get("date_started") is not None:
        lateness = max((row["date_started"] - due).total_seconds(), 0.0)
    return {**row, "lateness": lateness}


def _describe_schedule(task: Any) -> str:
    for kind in ("interval", "crontab", "solar", "clocked"):
        value = getattr(task, kind, None)
        if value is not None:
            return str(value)
    return "-"


def _next_run(task: Any, now: datetime) -> datetime | None:
    """When beat runs `task` next, worked out as django-celery-beat's `ModelEntry` does (None:
    disabled, expired, a one-off already run, or a schedule that cannot tell). From the last run
    beat saved, so an hourly task shows its next hour, not a moment that moves on every read."""
    if not task.enabled or (task.one_off and task.total_run_count):
        return None
    if task.expires is not None and now >= task.expires:
        return None
    if task.clocked is not None:
        clocked: datetime = task.clocked.clocked_time
        return clocked
    try:
        if task.start_time is not None and now < task.start_time:
            start: datetime = task.due_start_time(now.tzinfo)
            return start
        since = task.last_run_at
        if since is None:
            # Never run: beat counts from the last change, or runs at once when a start time passed.
            since = task.date_changed or now
            if task.start_time is not None:
                since -= timedelta(days=365 * 30)
        remaining = max(task.schedule.remaining_estimate(since), timedelta(0))  # from the schedule's now
    except Exception:  # noqa: BLE001 - a schedule beat itself would refuse
        return None
    moment: datetime = (timezone.now() + remaining + timedelta(milliseconds=500)).replace(microsecond=0)
    return moment


def ledger_overview() -> dict[str, Any]:
    """The ledger of unfinished jobs: by state, the outbox backlog (due, not published) and the
    oldest job due."""
    from jobs.runtime.ledger import ledger_counts, ledger_oldest_age
    from jobs.runtime.outbox import outbox_backlog
    from jobs.selectors import ROW_STATES, job_counts, limit_use

    counts = ledger_counts()
    backlog = outbox_backlog()
    states = job_counts()
    return {
        **counts,
        "states": [(str(state), states[str(state)]) for state in ROW_STATES],
        "total": sum(counts.values()),
        "backlog": backlog,
        "waiting_for_time": counts["unpublished"] - backlog,  # not published, and not due yet
        "oldest_age": ledger_oldest_age(),
        "limits": limit_use(),
    }


def ledger_due_times(task_ids: Iterable[str]) -> dict[str, datetime]:
    """When each of the jobs `task_ids` became due (accepted, or the time it waited for), as the
    ledger knows it; jobs not in the ledger are left out."""
    ids = [task_id for task_id in task_ids if task_id]
    if not ids:
        return {}
    rows = (
        OutboxMessage.objects.filter(task_id__in=ids)
        .annotate(due=Coalesce("not_before", "created_at"))
        .values_list("task_id", "due")
    )
    return dict(rows)


#: The sections a staff member sees only with a permission: (permission, what it shows).
PERMISSIONS = {
    "dead_letters": ("jobs.view_deadletter", "dead letters"),
    "schedules": ("django_celery_beat.view_periodictask", "periodic tasks"),
    "ledger": ("jobs.view_job", "jobs"),
}


def snapshot(user: Any) -> dict[str, Read]:
    """Every section of the dashboard as `user` may see it, each read on its own."""
    from jobs.health import jobs_health_report

    now = timezone.now()
    sections = {
        "now": Read(value=now),
        "health": _read("health", jobs_health_report),
        "queues": _read("queues", lambda: queues_overview(now)),
    }
    broker_error = sections["queues"].error or (sections["queues"].value or {}).get("broker_error")
    if broker_error:  # asking the workers would only wait on the same broker
        sections["workers"] = Read(error=f"the broker did not answer: {broker_error}")
    else:
        sections["workers"] = _read("workers", workers_overview)
    readers: dict[str, Callable[[], Any]] = {
        "dead_letters": lambda: dead_letter_overview(now),
        "schedules": lambda: schedules_overview(now),
        "ledger": ledger_overview,
    }
    for name, reader in readers.items():
        permission, what = PERMISSIONS.get(name, ("", ""))
        if permission and not user.has_perm(permission):
            sections[name] = Read(hidden=f"Seeing {what} takes the permission {permission}.")
        else:
            sections[name] = _read(name, reader)
    return sections


def oldest_ages(first_ids: Mapping[str, Sequence[str]], now: datetime) -> dict[str, float | None]:
    """For each queue, the age of its oldest message among `first_ids` (the task ids at the head of
    each of its lists), from the ledger's due times; None when none of them is in the ledger."""
    due = ledger_due_times(task_id for ids in first_ids.values() for task_id in ids)
    ages: dict[str, float | None] = {}
    for queue, ids in first_ids.items():
        times = [due[task_id] for task_id in ids if task_id in due]
        ages[queue] = max((now - min(times)).total_seconds(), 0.0) if times else None
    return ages
