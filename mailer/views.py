"""The email API: `POST /api/emails/` and `GET /api/emails/<id>/`, for staff only.

Staff authenticate with their session (the admin's login; a POST must then carry the CSRF token)
or with HTTP basic auth (scripts; no cookie is involved, so no CSRF check applies).
"""

from __future__ import annotations

import base64
import binascii
import json
from collections.abc import Callable
from functools import wraps

from django.contrib.auth import authenticate
from django.http import HttpRequest, HttpResponse, JsonResponse
from django.middleware.csrf import CsrfViewMiddleware
from django.views.decorators.csrf import csrf_exempt
from django.views.decorators.http import require_GET, require_POST

from jobs.middleware import json_error
from mailer.exceptions import EmailRefused
from mailer.models import Email
from mailer.services import email_queue

REALM = 'Basic realm="jobsite API", charset="UTF-8"'


def _unauthorized(message: str) -> JsonResponse:
    response = json_error(message, 401)
    response["WWW-Authenticate"] = REALM
    return response


def _basic_credentials(request: HttpRequest) -> tuple[str, str] | None:
    """(username, password) from an `Authorization: Basic` header; raises ValueError when the
    header is there but malformed; None when there is no basic auth header."""
    scheme, _, value = request.headers.get("Authorization", "").partition(" ")
    if scheme.lower() != "basic":
        return None
    try:
        decoded = base64.b64decode(value.strip(), validate=True).decode("utf-8")
    except (binascii.Error, UnicodeDecodeError) as exc:
        raise ValueError("malformed basic auth header") from exc
    username, sep, password = decoded.partition(":")
    if not sep:
        raise ValueError("malformed basic auth header")
    return username, password


def _csrf_failure(request: HttpRequest) -> HttpResponse | None:
    """Runs Django's CSRF check on a view that is exempt from the middleware's own check."""

    def no_view(_request: HttpRequest) -> HttpResponse:  # pragma: no cover - never called
        raise AssertionError

    check = CsrfViewMiddleware(no_view)
    check.process_request(request)
    return check.process_view(request, no_view, (), {})


def staff_api(view: Callable[..., HttpResponse]) -> Callable[..., HttpResponse]:
    """Lets staff in by basic auth or session: 401 (with `WWW-Authenticate`) without valid
    credentials, 403 for a user who is not staff, 403 for a session POST without CSRF token."""

    @csrf_exempt  # checked below for session users; basic auth carries no ambient credentials
    @wraps(view)
    def wrapper(request: HttpRequest, *args, **kwargs) -> HttpResponse:
        try:
            credentials = _basic_credentials(request)
        except ValueError:
            return _unauthorized("malformed basic auth header")
        if credentials is not None:
            user = authenticate(request, username=credentials[0], password=credentials[1])
            if user is None:
                return _unauthorized("invalid credentials")
            request.user = user
        else:
            user = request.user
            if not user.is_authenticated:
                return _unauthorized("authentication required")
            if request.method not in {"GET", "HEAD", "OPTIONS", "TRACE"}:
                failure = _csrf_failure(request)
                if failure is not None:
                    return json_error("CSRF verification failed", 403)
        if not (user.is_active and user.is_staff):
            return json_error("staff only", 403)
        return view(request, *args, **kwargs)

    return wrapper


def _email_json(email: Email) -> dict:
    return {
        "id": email.pk,
        "status": email.status,
        "attempts": email.attempts,
        "error": email.last_error or None,
        "delivery_status": email.delivery_status or None,
    }


@require_POST
@staff_api
def email_create(request: HttpRequest) -> HttpResponse:
    try:
        body = json.loads(request.body or b"null")
    except (json.JSONDecodeError, UnicodeDecodeError):
        return json_error("the body must be JSON", 400)
    if not isinstance(body, dict):
        return json_error('the body must be a JSON object {"template", "to", "context"}', 400)
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
@staff_api
def email_detail(request: HttpRequest, email_id: int) -> HttpResponse:
    email = Email.objects.filter(pk=email_id).first()
    if email is None:
        return json_error("email not found", 404)
    return JsonResponse(_email_json(email))
