"""The staff API of jobs and dead letters.

Jobs (`jobs.view_job` to read, `jobs.change_job` to act): list by state and filter, one job with
its attempts, cancel, run now, retry; queues: list, pause, resume. Dead letters
(`jobs.view_deadletter`, `jobs.change_deadletter`, as the admin's actions): list, show, requeue
and discard, by id or by filter. Authentication is `jobs.auth.staff_required`: a session (writes carry the CSRF
token) or HTTP basic auth; writes must be JSON from the same site, whatever the authentication.
Every write goes through `jobs.services`, like the admin and `manage.py requeue_dead`, so it is
recorded with its actor (`api:<username>`) on the row's trail.
"""

from __future__ import annotations

from collections.abc import Callable
from functools import wraps
from typing import Any, overload

from django.db.models import QuerySet
from django.http import HttpRequest, HttpResponse, JsonResponse
from django.views.decorators.cache import never_cache
from django.views.decorators.http import require_GET, require_POST

from jobs.auth import permission_required, staff_required
from jobs.http import json_error, json_object
from jobs.ids import MAX_ROW_ID, is_row_id
from jobs.models import DeadLetter, JobAttempt, OutboxMessage
from jobs.redaction import redact
from jobs.selectors import (
    JobState,
    dead_letter_groups,
    dead_letters_select,
    job_attempts,
    job_counts,
    job_dead_letter,
    job_max_attempts,
    job_queue,
    job_request_id,
    job_state,
    job_waits_for,
    job_worker,
    jobs_select,
    parse_moment,
    paused_queues,
    queue_names,
)
from jobs.services import (
    JobsResult,
    UnknownQueue,
    dead_letters_discard,
    dead_letters_requeue,
    jobs_cancel,
    jobs_retry,
    jobs_run_now,
    queue_pause,
    queue_resume,
)

DEFAULT_LIMIT = 50
MAX_LIMIT = 500
MAX_BULK = 1000  # per call; larger or throttled runs: `manage.py requeue_dead --rate`
SELECTORS = ("task", "queue", "exception", "request_id", "since")

_ViewFunction = Callable[..., HttpResponse]


class BadRequest(ValueError):
    """A query or body the API refuses: answered 400 with `field`."""

    def __init__(self, message: str, field: str) -> None:
        super().__init__(message)
        self.field = field


def _permission(codename: str) -> Callable[[_ViewFunction], _ViewFunction]:
    """`jobs.<codename>` required (`jobs.auth.permission_required`), and a `BadRequest` answered 400."""

    def decorate(view: _ViewFunction) -> _ViewFunction:
        @wraps(view)
        def wrapper(request: HttpRequest, *args: Any, **kwargs: Any) -> HttpResponse:
            try:
                return view(request, *args, **kwargs)
            except BadRequest as exc:
                return json_error(str(exc), 400, field=exc.field)

        return permission_required(f"jobs.{codename}")(wrapper)

    return decorate


def _actor(request: HttpRequest) -> str:
    return f"api:{request.user.get_username()}"


def _summary(row: DeadLetter) -> dict[str, Any]:
    return {
        "id": row.pk,
        "status": row.status,
        "task_name": row.task_name,
        "task_id": row.task_id,
        "queue": row.queue,
        "reason": row.reason,
        "exception_type": row.exception_type,
        "exception_message": row.exception_message[:500],
        "failure_count": row.failure_count,
        "first_failed_at": row.first_failed_at.isoformat(),
        "failed_at": row.failed_at.isoformat(),
        "request_id": row.request_id or None,
    }


def _detail(row: DeadLetter) -> dict[str, Any]:
    return {
        **_summary(row),
        "exception_message": row.exception_message,
        "args": row.args,
        "kwargs": row.kwargs,
        "redacted": row.redacted,
        "retries": row.retries,
        "worker": row.worker,
        "traceback": row.traceback,
        "requeue_count": row.requeue_count,
        "requeued_task_id": row.requeued_task_id or None,
        "events": [
            {"action": e.action, "actor": e.actor, "at": e.at.isoformat(), "task_id": e.task_id or None, "note": e.note}
            for e in row.events.order_by("at", "pk")
        ],
    }


def _selection(values: dict[str, Any]) -> dict[str, Any]:
    """The selectors of a query string or a JSON body, checked."""
    selection: dict[str, Any] = {}
    for name in SELECTORS:
        value = values.get(name)
        if value in (None, ""):
            continue
        if not isinstance(value, str) or len(value) > 200:
            raise BadRequest(f"{name} must be a string of at most 200 characters", name)
        if "\x00" in value:  # PostgreSQL text cannot hold NUL: no row could match, and the query would fail
            raise BadRequest(f"{name} must not contain a NUL character", name)
        selection[name] = value
    if "since" in selection:
        moment = parse_moment(selection["since"])
        if moment is None:
            raise BadRequest("since must be an ISO 8601 date or date-time", "since")
        selection["since"] = moment
    return selection


@overload
def _int(values: dict[str, Any], name: str, default: int, low: int, high: int) -> int: ...
@overload
def _int(values: dict[str, Any], name: str, default: None, low: int, high: int) -> int | None: ...
def _int(values: dict[str, Any], name: str, default: int | None, low: int, high: int) -> int | None:
    value = values.get(name)
    if value is None or value == "":
        return default
    try:
        number = int(value)
    except (TypeError, ValueError):
        raise BadRequest(f"{name} must be a whole number", name) from None
    if isinstance(value, bool) or not low <= number <= high:
        raise BadRequest(f"{name} must be between {low} and {high}", name)
    return number


@never_cache
@require_GET
@staff_required
@_permission("view_deadletter")
def dead_letter_list(request: HttpRequest) -> HttpResponse:
    """`?status=&task=&queue=&exception=&request_id=&since=&limit=&before=`: newest first;
    `next` is the URL of the following page (keyset on the id, stable while rows arrive)."""
    query = request.GET
    status = query.get("status") or None
    if status is not None and status not in DeadLetter.Status.values:
        raise BadRequest(f"status must be one of {', '.join(DeadLetter.Status.values)}", "status")
    limit = _int(query, "limit", DEFAULT_LIMIT, 1, MAX_LIMIT)
    before = _int(query, "before", None, 1, MAX_ROW_ID)
    rows = dead_letters_select(status=status, **_selection(query)).order_by("-pk")
    if before is not None:
        rows = rows.filter(pk__lt=before)
    page = list(rows[: limit + 1])
    more = len(page) > limit
    page = page[:limit]
    next_url = None
    if more:
        params = query.copy()
        params["before"] = str(page[-1].pk)
        next_url = f"{request.path}?{params.urlencode()}"
    return JsonResponse({"results": [_summary(row) for row in page], "next": next_url})


@never_cache
@require_GET
@staff_required
@_permission("view_deadletter")
def dead_letter_groups_view(request: HttpRequest) -> HttpResponse:
    """Pending dead letters by task and exception type, largest group first."""
    groups = [
        {
            **group,
            "first_failed_at": group["first_failed_at"].isoformat(),
            "last_failed_at": group["last_failed_at"].isoformat(),
        }
        for group in dead_letter_groups()
    ]
    return JsonResponse({"groups": groups})


@never_cache
@require_GET
@staff_required
@_permission("view_deadletter")
def dead_letter_detail(request: HttpRequest, dead_letter_id: int) -> HttpResponse:
    row = DeadLetter.objects.filter(pk=dead_letter_id).first()
    if row is None:
        return json_error("dead letter not found", 404)
    return JsonResponse(_detail(row))


def _requeue(request: HttpRequest, rows: QuerySet[DeadLetter]) -> HttpResponse:
    result = dead_letters_requeue(dead_letters=rows, actor=_actor(request))
    body = {
        "requeued": [{"id": pk, "task_id": task_id} for pk, task_id in result.requeued],
        "skipped": [{"id": pk, "reason": why} for pk, why in result.skipped],
        "waiting": [{"id": pk, "task_id": task_id} for pk, task_id in result.waiting],
    }
    if result.error:  # the broker refused: `waiting` go out with the relay, later rows stay pending
        return json_error(result.error, 503, **body)
    return JsonResponse(body, status=202)


def _not_pending(dead_letter_id: int) -> HttpResponse:
    """404 for an unknown id, 409 naming the status of a row that is no longer pending."""
    status = DeadLetter.objects.filter(pk=dead_letter_id).values_list("status", flat=True).first()
    if status is None:
        return json_error("dead letter not found", 404)
    return json_error(f"dead letter {dead_letter_id} is {status}, not pending", 409, current_status=status)


@require_POST
@staff_required
@_permission("change_deadletter")
def dead_letter_requeue_one(request: HttpRequest, dead_letter_id: int) -> HttpResponse:
    rows = DeadLetter.objects.filter(pk=dead_letter_id, status=DeadLetter.Status.PENDING)
    if not rows.exists():
        return _not_pending(dead_letter_id)
    return _requeue(request, rows)


@require_POST
@staff_required
@_permission("change_deadletter")
def dead_letter_discard_one(request: HttpRequest, dead_letter_id: int) -> HttpResponse:
    rows = DeadLetter.objects.filter(pk=dead_letter_id)
    if not dead_letters_discard(dead_letters=rows, actor=_actor(request)):  # only a pending row is discarded
        return _not_pending(dead_letter_id)
    return JsonResponse({"id": dead_letter_id, "status": DeadLetter.Status.DISCARDED})


@require_POST
@staff_required
@_permission("change_deadletter")
def dead_letter_requeue_many(request: HttpRequest) -> HttpResponse:
    """JSON `{"ids": [...]}` or selectors (`task`, `queue`, `exception`, `request_id`, `since`,
    or `"all": true`), with optional `limit` (oldest first, at most 1000 per call)."""
    body = json_object(request, '{"ids": [...]} or selectors, e.g. {"task": "mailer.send_email"}')
    if isinstance(body, HttpResponse):
        return body
    ids = body.get("ids")
    selection = _selection(body)
    everything = body.get("all") is True
    if ids is not None:
        if not isinstance(ids, list) or not ids or not all(is_row_id(i) for i in ids):
            raise BadRequest("ids must be a non-empty list of dead letter ids", "ids")
        if selection or everything:
            raise BadRequest("give either ids or selectors, not both", "ids")
    elif not selection and not everything:
        raise BadRequest('nothing selected: give ids, selectors or "all": true', "ids")
    limit = _int(body, "limit", MAX_BULK, 1, MAX_BULK)

    rows = dead_letters_select(ids=ids, status=DeadLetter.Status.PENDING, **selection)
    if ids is not None:
        unknown = sorted(set(ids) - set(DeadLetter.objects.filter(pk__in=ids).values_list("pk", flat=True)))
        if unknown:
            return json_error("unknown dead letter ids; nothing was requeued", 404, ids=unknown)
    chosen = list(rows.values_list("pk", flat=True)[:limit])
    if not chosen:
        return json_error("no pending dead letters match; nothing was requeued", 404)
    return _requeue(request, DeadLetter.objects.filter(pk__in=chosen))


# --- jobs -----------------------------------------------------------------------------------------

JOB_SELECTORS = ("queue", "task", "request_id", "q")


def _moment(value: Any) -> str | None:
    return value.isoformat() if value is not None else None


def _latest_errors(task_ids: list[str]) -> dict[str, str]:
    """The error of each job's latest failed attempt, in one query."""
    errors: dict[str, str] = {}
    for task_id, error in (
        JobAttempt.objects.filter(task_id__in=task_ids).order_by("finished_at", "pk").values_list("task_id", "error")
    ):
        errors[task_id] = error
    return errors


def _job(row: OutboxMessage, errors: dict[str, str]) -> dict[str, Any]:
    state = job_state(row)
    waiting = state in (JobState.SCHEDULED, JobState.RETRYING, JobState.THROTTLED)
    return {
        "id": row.task_id,
        "task": row.task_name,
        "state": state,
        "queue": job_queue(row),
        "attempt": row.retries + 1,
        "max_attempts": job_max_attempts(row.task_name),
        "created_at": _moment(row.created_at),
        "due_at": _moment(row.not_before) if waiting else None,
        "started_at": _moment(row.started_at) if state == JobState.RUNNING else None,
        "lease_until": _moment(row.lease_until) if state == JobState.RUNNING else None,
        "worker": job_worker(row) or None,
        "last_error": (errors.get(row.task_id) or row.last_error or None),
        "request_id": job_request_id(row) or None,
    }


def _dead_job(row: DeadLetter) -> dict[str, Any]:
    return {
        "id": row.task_id,
        "task": row.task_name,
        "state": JobState.DEAD,
        "queue": row.queue,
        "attempt": row.retries + 1,
        "max_attempts": job_max_attempts(row.task_name),
        "created_at": _moment(row.first_failed_at),
        "due_at": None,
        "started_at": None,
        "lease_until": None,
        "worker": row.worker or None,
        "last_error": f"{row.exception_type}: {row.exception_message}"[:2000],
        "request_id": row.request_id or None,
        "dead_letter_id": row.pk,
    }


def _job_selection(values: dict[str, Any]) -> dict[str, Any]:
    selection: dict[str, Any] = {}
    for name in JOB_SELECTORS:
        value = values.get(name)
        if value in (None, ""):
            continue
        if not isinstance(value, str) or len(value) > 200 or "\x00" in value:
            raise BadRequest(f"{name} must be a string of at most 200 characters", name)
        selection["search" if name == "q" else name] = value
    return selection


def _next(request: HttpRequest, before: int) -> str:
    params = request.GET.copy()
    params["before"] = str(before)
    return f"{request.path}?{params.urlencode()}"


@never_cache
@require_GET
@staff_required
@_permission("view_job")
def job_list(request: HttpRequest) -> HttpResponse:
    """`?state=&queue=&task=&request_id=&q=&limit=&before=`: newest first, `next` the URL of the
    following page (keyset: stable while jobs come and go). `state=dead`: the pending dead letters."""
    query = request.GET
    state = query.get("state") or None
    if state is not None and state not in JobState.__members__.values():
        raise BadRequest(f"state must be one of {', '.join(JobState)}", "state")
    limit = _int(query, "limit", DEFAULT_LIMIT, 1, MAX_LIMIT)
    before = _int(query, "before", None, 1, MAX_ROW_ID)
    selection = _job_selection(query)
    if state == JobState.DEAD:
        letters = dead_letters_select(
            status=DeadLetter.Status.PENDING,
            queue=selection.get("queue"),
            task=selection.get("task"),
            request_id=selection.get("request_id"),
        )
        if "search" in selection:
            letters = letters.filter(task_id=selection["search"])
        letters = letters.order_by("-pk")
        if before is not None:
            letters = letters.filter(pk__lt=before)
        dead = list(letters[: limit + 1])
        more = len(dead) > limit
        dead = dead[:limit]
        return JsonResponse(
            {"results": [_dead_job(row) for row in dead], "next": _next(request, dead[-1].pk) if more else None}
        )
    rows = jobs_select(state=state, **selection).order_by("-pk")
    if before is not None:
        rows = rows.filter(pk__lt=before)
    page = list(rows[: limit + 1])
    more = len(page) > limit
    page = page[:limit]
    errors = _latest_errors([row.task_id for row in page])
    return JsonResponse(
        {"results": [_job(row, errors) for row in page], "next": _next(request, page[-1].pk) if more else None}
    )


@never_cache
@require_GET
@staff_required
@_permission("view_job")
def job_counts_view(request: HttpRequest) -> HttpResponse:
    """Jobs per state: exact up to 1 000, else estimated (`estimated` names those states)."""
    counts = job_counts()
    return JsonResponse(
        {
            "counts": {state: value.count for state, value in counts.items()},
            "estimated": sorted(state for state, value in counts.items() if value.estimated),
        }
    )


def _attempt(attempt: JobAttempt) -> dict[str, Any]:
    return {
        "attempt": attempt.attempt + 1,
        "started_at": _moment(attempt.started_at),
        "finished_at": _moment(attempt.finished_at),
        "worker": attempt.worker or None,
        "outcome": attempt.outcome,
        "error": attempt.error or None,
    }


def _valid_task_id(task_id: str) -> bool:
    return 0 < len(task_id) <= 64 and task_id.isprintable()


@never_cache
@require_GET
@staff_required
@_permission("view_job")
def job_detail(request: HttpRequest, task_id: str) -> HttpResponse:
    """One job (of the table, or dead) with its arguments, redacted, and its attempts."""
    row = OutboxMessage.objects.filter(task_id=task_id).first() if _valid_task_id(task_id) else None
    letter = job_dead_letter(task_id) if _valid_task_id(task_id) else None
    if row is not None:
        body = _job(row, _latest_errors([task_id]))
        args, _ = redact(list(row.args or ()))
        kwargs, _ = redact(dict(row.kwargs or {}))
    elif letter is not None and letter.status == DeadLetter.Status.PENDING:
        body = _dead_job(letter)
        args, kwargs = letter.args, letter.kwargs
    else:
        return json_error("job not found (finished, cancelled, or never accepted)", 404)
    attempts = [_attempt(attempt) for attempt in job_attempts(task_id)]
    return JsonResponse(
        {
            **body,
            "args": args,
            "kwargs": kwargs,
            "attempts": attempts,
            "waits_for": [{"limit": name, "key": key} for name, key in job_waits_for(task_id)],
            "dead_letter_id": letter.pk if letter is not None else None,
        }
    )


def _acted(task_id: str, result: JobsResult) -> HttpResponse:
    if task_id in result.done or task_id in result.stopping:
        return JsonResponse({})  # filled in by the caller
    why = dict(result.refused).get(task_id, "not done")
    status = 404 if why.startswith("no such job") else 409
    return json_error(f"job {task_id}: {why}", status)


def _job_action(
    task_id: str, act: Callable[[list[str]], JobsResult], state: Callable[[JobsResult], str]
) -> HttpResponse:
    if not _valid_task_id(task_id):
        return json_error("job not found", 404)
    result = act([task_id])
    answer = _acted(task_id, result)
    if answer.status_code != 200:
        return answer
    body: dict[str, Any] = {"id": task_id, "state": state(result)}
    if result.error:
        body["warning"] = result.error
    return JsonResponse(body)


@require_POST
@staff_required
@_permission("change_job")
def job_cancel(request: HttpRequest, task_id: str) -> HttpResponse:
    """The job never starts (kept as a discarded dead letter, `cancelled`); a running one is asked
    to stop (`state` stays `running` until it has)."""
    return _job_action(
        task_id,
        lambda ids: jobs_cancel(task_ids=ids, actor=_actor(request)),
        lambda result: "running" if result.stopping else "cancelled",
    )


@require_POST
@staff_required
@_permission("change_job")
def job_run_now(request: HttpRequest, task_id: str) -> HttpResponse:
    return _job_action(task_id, lambda ids: jobs_run_now(task_ids=ids, actor=_actor(request)), lambda _r: "queued")


@require_POST
@staff_required
@_permission("change_job")
def job_retry(request: HttpRequest, task_id: str) -> HttpResponse:
    """A dead job runs again (its dead letter requeued, under a new task id: `new_id`). It takes
    `jobs.change_job`, as the outer contract says for every action on jobs."""
    if not _valid_task_id(task_id):
        return json_error("job not found", 404)
    result, requeue = jobs_retry(task_ids=[task_id], actor=_actor(request))
    answer = _acted(task_id, result)
    if answer.status_code != 200:
        if requeue.error:
            return json_error(requeue.error, 503)
        return answer
    body = {"id": task_id, "state": "queued", "new_id": requeue.requeued[0][1] if requeue.requeued else None}
    if requeue.error:
        body["warning"] = requeue.error
    return JsonResponse(body)


# --- queues ---------------------------------------------------------------------------------------


@never_cache
@require_GET
@staff_required
@_permission("view_job")
def queue_list(request: HttpRequest) -> HttpResponse:
    paused = paused_queues()
    return JsonResponse(
        {
            "queues": [
                {
                    "queue": name,
                    "paused": name in paused,
                    "paused_by": paused[name].paused_by if name in paused else None,
                    "paused_at": _moment(paused[name].paused_at) if name in paused else None,
                }
                for name in queue_names()
            ]
        }
    )


def _queue_action(request: HttpRequest, queue: str, pause: bool) -> HttpResponse:
    act = queue_pause if pause else queue_resume
    try:
        act(queue=queue, actor=_actor(request))
    except UnknownQueue as exc:
        return json_error(str(exc), 404)
    return JsonResponse({"queue": queue, "paused": pause})


@require_POST
@staff_required
@_permission("change_job")
def queue_pause_view(request: HttpRequest, queue: str) -> HttpResponse:
    """No worker takes the queue's jobs (within `JOBS_PAUSE_SYNC_SECONDS`); they wait in it."""
    return _queue_action(request, queue, True)


@require_POST
@staff_required
@_permission("change_job")
def queue_resume_view(request: HttpRequest, queue: str) -> HttpResponse:
    return _queue_action(request, queue, False)
