"""The email API: `POST /api/emails/` and `GET /api/emails/<id>/`; `POST /api/emails/purge/` and
`GET /api/emails/purge/<id>/` (a Django `@task` and its result); for staff only.

Staff authenticate with their session (the admin's login; a POST must then carry the CSRF token)
or with HTTP basic auth (scripts). Either way a write must be `application/json` and must not come
from another site (`Origin`, `Sec-Fetch-Site`): a browser attaches cached Basic credentials to a
cross-site form post too (`jobs.auth.staff_required`).
"""

from __future__ import annotations

from typing import Any

from django.http import HttpRequest, HttpResponse, JsonResponse
from django.urls import reverse
from django.views.decorators.http import require_GET, require_POST

from jobs.auth import permission_required, staff_required
from jobs.http import json_error, json_object
from jobs.tasks_compat import TaskResultDoesNotExist, TaskResultMismatch, TaskResultStatus
from mailer.exceptions import EmailRefused
from mailer.models import Email
from mailer.services import email_queue
from mailer.tasks import purge_sent_emails


def _email_json(email: Email) -> dict:
    return {
        "id": email.pk,
        "status": email.status,
        "attempts": email.attempts,
        "error": email.last_error or None,
        "delivery_status": email.delivery_status or None,
    }


@require_POST
@staff_required
@permission_required("mailer.add_email")
def email_create(request: HttpRequest) -> HttpResponse:
    body = json_object(request, '{"template", "to", "context"}')
    if isinstance(body, HttpResponse):
        return body
    template, to, context = body.get("template"), body.get("to"), body.get("context", {})
    if not isinstance(template, str):
        return json_error("template must be a string", 400, field="template")
    if not isinstance(to, list):
        return json_error("to must be a list of addresses", 400, field="to")
    if not isinstance(context, dict):
        return json_error("context must be an object", 400, field="context")
    try:
        email = email_queue(template=template, to=to, context=context, request_id=request.request_id)
    except EmailRefused as exc:
        return json_error(str(exc), 400, code=exc.code, field=exc.field)
    return JsonResponse({"id": email.pk, "status": email.status}, status=202)


@require_GET
@staff_required
@permission_required("mailer.view_email")
def email_detail(request: HttpRequest, email_id: int) -> HttpResponse:
    email = Email.objects.filter(pk=email_id).first()
    if email is None:
        return json_error("email not found", 404)
    return JsonResponse(_email_json(email))


#: `older_than_days` when the request names none.
PURGE_DEFAULT_DAYS = 90


def _purge_json(result: Any) -> dict[str, Any]:
    def when(value: Any) -> str | None:
        return value.isoformat() if value is not None else None

    return {
        "id": result.id,
        "status": str(result.status),
        "purged": result.return_value if result.status == TaskResultStatus.SUCCESSFUL else None,
        "attempts": result.attempts,
        "errors": [error.exception_class_path for error in result.errors],
        "enqueued_at": when(result.enqueued_at),
        "started_at": when(result.started_at),
        "finished_at": when(result.finished_at),
    }


@require_POST
@staff_required
@permission_required("mailer.delete_email")
def purge_create(request: HttpRequest) -> HttpResponse:
    """Enqueues `mailer.tasks.purge_sent_emails` (Django's Tasks API): 202 with its result's id."""
    body = json_object(request, '{"older_than_days": 90}')
    if isinstance(body, HttpResponse):
        return body
    days = body.get("older_than_days", PURGE_DEFAULT_DAYS)
    if not isinstance(days, int) or isinstance(days, bool) or not 1 <= days <= 36500:
        return json_error(
            "older_than_days must be a whole number of days from 1 to 36500", 400, field="older_than_days"
        )
    result = purge_sent_emails.enqueue(days)  # published once the request's transaction commits
    body = _purge_json(result)
    body["url"] = reverse("email-purge-detail", args=[result.id])
    return JsonResponse(body, status=202)


@require_GET
@staff_required
@permission_required("mailer.view_email")
def purge_detail(request: HttpRequest, result_id: str) -> HttpResponse:
    """What `get_result` says of a purge: status, how many went, attempts, errors, times."""
    try:
        result = purge_sent_emails.get_result(result_id)
    except (TaskResultDoesNotExist, TaskResultMismatch):
        return json_error("no purge with this id", 404)
    return JsonResponse(_purge_json(result))
