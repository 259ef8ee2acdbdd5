"""The dead-letter API, for staff: list, show, requeue and discard, by id or by filter.

Reads need the `jobs.view_deadletter` permission, writes `jobs.change_deadletter` (the same as the
admin's actions). Authentication is `jobs.auth.staff_required`: a session (writes carry the CSRF
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
from jobs.models import DeadLetter
from jobs.selectors import dead_letter_groups, dead_letters_select, parse_moment
from jobs.services import dead_letters_discard, dead_letters_requeue

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
