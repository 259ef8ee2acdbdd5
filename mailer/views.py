"""The email API: `POST /api/emails/` and `GET /api/emails/<id>/`, for staff only.

Staff authenticate with their session (the admin's login; a POST must then carry the CSRF token)
or with HTTP basic auth (scripts). Either way a write must be `application/json` and must not come
from another site (`Origin`, `Sec-Fetch-Site`): a browser attaches cached Basic credentials to a
cross-site form post too (`jobs.auth.staff_required`).
"""

from __future__ import annotations

from django.http import HttpRequest, HttpResponse, JsonResponse
from django.views.decorators.http import require_GET, require_POST

from jobs.auth import staff_required
from jobs.http import json_error, json_object
from mailer.exceptions import EmailRefused
from mailer.models import Email
from mailer.services import email_queue


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
def email_detail(request: HttpRequest, email_id: int) -> HttpResponse:
    email = Email.objects.filter(pk=email_id).first()
    if email is None:
        return json_error("email not found", 404)
    return JsonResponse(_email_json(email))
