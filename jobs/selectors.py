"""Reads of jobs and dead letters, shared by the admin, the commands, the API and the metrics."""

from __future__ import annotations

import enum
import json
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from django.db import connection
from django.db.models import Count, Max, Min, Q, QuerySet, TextField
from django.db.models.fields.json import KT
from django.db.models.functions import Cast
from django.utils import timezone
from django.utils.dateparse import parse_date, parse_datetime

from jobs.models import DeadLetter, Job, JobAttempt, LimitHold, OutboxMessage, PausedQueue
from jobs.redaction import SECRET_KEY_PATTERN


class JobState(enum.StrEnum):
    """A job's state as operators see it (the job table's own, in their words); a dead job is no
    row of the table any more but its dead letter."""

    SCHEDULED = "scheduled"  # waits in the table for its time (`due_at`)
    QUEUED = "queued"  # available: in its queue, or on its way there
    THROTTLED = "throttled"  # over a limit of its task (`jobs.limits`): waits in the table for it
    RUNNING = "running"  # a run holds its start lease
    RETRYING = "retrying"  # failed, waits in the table for its next attempt
    DEAD = "dead"  # given up: its pending dead letter


ROW_STATES: dict[JobState, str] = {
    JobState.SCHEDULED: OutboxMessage.State.SCHEDULED,
    JobState.QUEUED: OutboxMessage.State.AVAILABLE,
    JobState.THROTTLED: OutboxMessage.State.THROTTLED,
    JobState.RUNNING: OutboxMessage.State.EXECUTING,
    JobState.RETRYING: OutboxMessage.State.RETRYABLE,
}
_JOB_STATES = {row_state: state for state, row_state in ROW_STATES.items()}
#: Counts are exact up to this; a bigger one is the database planner's estimate (PostgreSQL), or
#: "more than COUNT_CAP" (elsewhere): a page reads them in constant time at a million rows too.
EXACT_UP_TO = 1_000
COUNT_CAP = 10_000


@dataclass(frozen=True)
class Tally:
    """A count as the jobs page shows it: exact, or estimated (`estimated`) when it is large."""

    count: int
    estimated: bool = False

    def __str__(self) -> str:
        if not self.estimated:
            return f"{self.count:,}"
        return f"≈ {self.count:,}" if connection.vendor == "postgresql" else f"more than {COUNT_CAP:,}"


def tally(rows: QuerySet[Any]) -> Tally:
    """How many rows `rows` holds: counted exactly up to `EXACT_UP_TO` (bounded by index), else
    PostgreSQL's estimate of the same query (no scan), else at most `COUNT_CAP + 1` counted."""
    rows = rows.order_by()
    exact = rows[: EXACT_UP_TO + 1].count()
    if exact <= EXACT_UP_TO:
        return Tally(exact)
    if connection.vendor == "postgresql":
        sql, params = rows.values("pk").query.sql_with_params()
        with connection.cursor() as cursor:
            cursor.execute(f"EXPLAIN (FORMAT JSON) {sql}", params)
            plan = cursor.fetchone()[0]
        plan = json.loads(plan) if isinstance(plan, str) else plan
        return Tally(max(int(plan[0]["Plan"]["Plan Rows"]), EXACT_UP_TO + 1), estimated=True)
    capped = rows[: COUNT_CAP + 1].count()
    return Tally(capped, estimated=capped > COUNT_CAP)


def job_state(row: OutboxMessage) -> JobState:
    return _JOB_STATES.get(row.state, JobState.QUEUED)


def job_queue(row: OutboxMessage) -> str:
    """The queue of a job (a row written before the column was: its options' or its route's)."""
    if row.queue:
        return row.queue
    from jobs.runtime.store import queue_of

    return queue_of(row.task_name, row.options)


def job_request_id(row: OutboxMessage) -> str:
    return str(((row.options or {}).get("headers") or {}).get("request_id") or "")


def job_max_attempts(task_name: str) -> int | None:
    """How many attempts the job's task allows (its retries plus the first), None when unknown."""
    from celery import current_app

    task = current_app.tasks.get(task_name)
    if task is None:
        return None
    allowed = getattr(task, "retries_allowed", None)
    retries = allowed() if callable(allowed) else getattr(task, "max_retries", None)
    return None if retries is None else int(retries) + 1


def job_worker(row: OutboxMessage) -> str:
    """The worker (and process) whose run holds the job's lease: `host:pid`."""
    if row.state != OutboxMessage.State.EXECUTING or not row.lease_owner:
        return ""
    return row.lease_owner.rsplit(":", 1)[0]


def jobs_select(
    *,
    state: str | None = None,
    queue: str | None = None,
    task: str | None = None,
    request_id: str | None = None,
    search: str | None = None,
) -> QuerySet[Job]:
    """Jobs of the table by state (not `dead`: see `dead_letters_select`), queue, task, request id,
    and a text searched for in the task id and the arguments."""
    rows = Job.objects.all()
    if state:
        rows = rows.filter(state=ROW_STATES[JobState(state)])
    if queue:
        rows = rows.filter(queue=queue)
    if task:
        rows = rows.filter(task_name=task)
    if request_id:
        rows = jobs_of_request(rows, request_id)
    if search:
        rows = jobs_search(rows, search)
    return rows


#: A JSON object key that `jobs.redaction` hides (a password, a token, an API key, ...), as the
#: arguments' JSON text shows it.
_SECRET_KEY_IN_JSON = rf'"[^"]*({SECRET_KEY_PATTERN})[^"]*"\s*:'


def jobs_search(rows: QuerySet[Any], term: str) -> QuerySet[Any]:
    """Jobs whose task id is `term`, or whose arguments hold it as text. Jobs whose arguments
    carry a secret (a key `jobs.redaction` hides) are found by their task id only: a search
    must not tell, letter by letter, what their pages show as `***`."""
    if rows.filter(task_id=term).exists():
        return rows.filter(task_id=term)
    texts = rows.alias(args_text=Cast("args", TextField()), kwargs_text=Cast("kwargs", TextField()))
    matching = texts.filter(Q(args_text__icontains=term) | Q(kwargs_text__icontains=term))
    found: QuerySet[Any] = matching.exclude(
        Q(args_text__iregex=_SECRET_KEY_IN_JSON) | Q(kwargs_text__iregex=_SECRET_KEY_IN_JSON)
    )
    return found


def jobs_of_request(rows: QuerySet[Any], request_id: str) -> QuerySet[Any]:
    """The jobs an HTTP request (or a job) started, by the index on their request id header."""
    if connection.vendor != "postgresql":
        # Django compiles the text of a key compared on SQLite into JSON_EXTRACT(<value>), which
        # refuses a plain string; SQLite is not where a million jobs wait anyway.
        return rows.filter(options__headers__request_id=request_id)
    found: QuerySet[Any] = rows.alias(header_request_id=KT("options__headers__request_id"))
    return found.filter(header_request_id=request_id)


def job_counts() -> dict[str, Tally]:
    """Jobs per state (the table's, and `dead`: pending dead letters), see `tally`."""
    counts = {str(state): tally(Job.objects.filter(state=row_state)) for state, row_state in ROW_STATES.items()}
    counts[JobState.DEAD] = tally(DeadLetter.objects.filter(status=DeadLetter.Status.PENDING))
    return counts


def job_counts_by_queue(queues: Iterable[str]) -> dict[str, dict[str, Tally]]:
    """Jobs per queue and state (of the table), see `tally`."""
    states = ROW_STATES.items()
    return {
        queue: {str(state): tally(Job.objects.filter(queue=queue, state=row_state)) for state, row_state in states}
        for queue in queues
    }


def job_waits_for(task_id: str) -> list[tuple[str, str]]:
    """The limits (name, key) a throttled job waits for."""
    rows = LimitHold.objects.filter(task_id=task_id, started_at__isnull=True).order_by("name")
    return list(rows.values_list("name", "key"))


def limit_use() -> list[Any]:
    """Every limit in use now (`jobs.runtime.limits.LimitUse`), by name."""
    from jobs.runtime.limits import limits_in_use

    return limits_in_use()


def job_attempts(task_id: str) -> list[JobAttempt]:
    return list(JobAttempt.objects.filter(task_id=task_id).order_by("finished_at", "pk")[:100])


def job_dead_letter(task_id: str) -> DeadLetter | None:
    """The dead letter of a job that was given up (its latest)."""
    return DeadLetter.objects.filter(task_id=task_id).order_by("-failed_at", "-pk").first()


def paused_queues() -> dict[str, PausedQueue]:
    return {row.queue: row for row in PausedQueue.objects.all()}


def parse_moment(value: str) -> datetime | None:
    """An ISO 8601 date or date-time (naive: the current time zone), or None when it is not one."""
    try:
        moment = parse_datetime(value)
        if moment is None:
            day = parse_date(value)
            zone = timezone.get_current_timezone()
            moment = None if day is None else datetime(day.year, day.month, day.day, tzinfo=zone)
    except ValueError:
        return None
    if moment is not None and timezone.is_naive(moment):
        moment = timezone.make_aware(moment)
    return moment


def dead_letters_select(
    *,
    ids: Iterable[int] | None = None,
    task: str | None = None,
    queue: str | None = None,
    since: datetime | None = None,
    exception: str | None = None,
    request_id: str | None = None,
    status: str | None = None,
) -> QuerySet[DeadLetter]:
    """Dead letters matching every filter given, oldest failure first."""
    rows = DeadLetter.objects.all()
    if ids is not None:
        rows = rows.filter(pk__in=list(ids))
    if task:
        rows = rows.filter(task_name=task)
    if queue:
        rows = rows.filter(queue=queue)
    if since:
        rows = rows.filter(failed_at__gte=since)
    if exception:
        rows = rows.filter(exception_type=exception)
    if request_id:
        rows = rows.filter(request_id=request_id)
    if status:
        rows = rows.filter(status=status)
    return rows.order_by("failed_at", "pk")


def dead_letter_groups(*, status: str = DeadLetter.Status.PENDING, limit: int | None = None) -> list[Mapping[str, Any]]:
    """Dead letters grouped by task and exception type, largest group first (the first `limit`):
    `task_name`, `exception_type`, `count`, `first_failed_at`, `last_failed_at`.

    Mapping, not dict: django-stubs 6 types `.values()` rows as a TypedDict, which is no dict[str, Any]."""
    groups = (
        DeadLetter.objects.filter(status=status)
        .values("task_name", "exception_type")
        .annotate(count=Count("id"), first_failed_at=Min("failed_at"), last_failed_at=Max("failed_at"))
        .order_by("-count", "task_name", "exception_type")
    )
    return list(groups if limit is None else groups[:limit])


def dead_letter_counts() -> dict[str, int]:
    """Rows per status, every status present (zero when none)."""
    counts = dict.fromkeys(DeadLetter.Status.values, 0)
    for row in DeadLetter.objects.values("status").annotate(n=Count("id")).order_by():
        counts[row["status"]] = row["n"]
    return counts


def dead_letter_oldest_pending_age() -> float:
    """Seconds since the oldest pending dead letter failed; 0 when there is none."""
    oldest = DeadLetter.objects.filter(status=DeadLetter.Status.PENDING).aggregate(m=Min("failed_at"))["m"]
    return max((timezone.now() - oldest).total_seconds(), 0.0) if oldest else 0.0


def queue_names() -> list[str]:
    """The queues the project declares (Celery's `task_queues`, in their order), else its default queue."""
    from celery import current_app as app

    declared = app.conf.task_queues or ()
    names = [queue if isinstance(queue, str) else queue.name for queue in declared]
    return names or [app.conf.task_default_queue]


#: Seconds a read of the broker may take to connect (a firewalled broker never refuses).
BROKER_TIMEOUT = 2


def queue_lengths(queues: Iterable[str] | None = None) -> dict[str, int]:
    """Messages waiting in each queue (by default every queue the project declares), read from the
    broker (Redis counts every priority sub-list; RabbitMQ reports the ready count). Raises when
    the broker does not answer."""
    from celery import current_app as app

    queues = queue_names() if queues is None else queues
    lengths = {}
    with app.connection_for_read(connect_timeout=BROKER_TIMEOUT) as conn:
        conn.ensure_connection(max_retries=0, timeout=BROKER_TIMEOUT)
        channel: Any = conn.default_channel
        if conn.transport.driver_type == "redis":
            # Every priority list, under the broker's `global_keyprefix` (kombu's passive declare
            # looks for the keys without it, and would find no queue).
            return {name: int(channel._size(name)) for name in queues}
        for name in queues:
            try:
                lengths[name] = channel.queue_declare(queue=name, passive=True).message_count
            except conn.channel_errors:  # the queue does not exist yet (RabbitMQ): nothing waits
                lengths[name] = 0
                channel = conn.channel()
    return lengths


def queue_heads(queues: Iterable[str]) -> dict[str, list[str]]:
    """For each queue, the task ids of the next messages a worker takes: on Redis, the oldest
    message of each of the queue's lists (kombu keeps one per priority step). Empty for a broker
    that cannot be looked into without taking messages (RabbitMQ). Raises when the broker does not
    answer."""
    from celery import current_app as app

    queues = list(queues)
    with app.connection_for_read(connect_timeout=BROKER_TIMEOUT) as conn:
        conn.ensure_connection(max_retries=0, timeout=BROKER_TIMEOUT)
        if conn.transport.driver_type != "redis":
            return {}
        channel: Any = conn.default_channel
        client = channel.client
        # kombu's prefixing client leaves LINDEX alone: the broker's key prefix is added here.
        prefixed = "LINDEX" in getattr(type(client), "PREFIXED_SIMPLE_COMMANDS", ())
        prefix = "" if prefixed else getattr(client, "global_keyprefix", "")
        keys = [(name, prefix + channel._q_for_pri(name, pri)) for name in queues for pri in channel.priority_steps]
        with client.pipeline(transaction=False) as pipe:
            for _, key in keys:
                pipe.lindex(key, -1)  # kombu pushes on the left and takes from the right
            raw = pipe.execute()
    from jobs.runtime.ledger import message_ids

    heads: dict[str, list[str]] = {name: [] for name in queues}
    for (name, _), message in zip(keys, raw, strict=True):
        if message:
            heads[name].extend(message_ids([message]))
    return heads


def dead_letter_failures() -> dict[tuple[str, str], int]:
    """Failures kept as dead letters, by (task name, reason): each row counts its failure_count."""
    from django.db.models import Sum

    rows = DeadLetter.objects.values("task_name", "reason").annotate(total=Sum("failure_count")).order_by()
    return {(row["task_name"], row["reason"]): row["total"] or 0 for row in rows}
