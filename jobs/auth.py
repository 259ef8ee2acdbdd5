"""Staff-only JSON endpoints: a Django session or HTTP basic auth with a staff account.

Session requests keep Django's CSRF protection on writes; requests authenticated with HTTP basic
auth carry their credentials in every request, so no ambient cookie can be abused and CSRF does
not apply.
"""

from __future__ import annotations

import base64
import binascii
from collections.abc import Callable
from functools import wraps

from django.contrib.auth import authenticate
from django.http import HttpRequest, HttpResponse, JsonResponse
from django.middleware.csrf import CsrfViewMiddleware
from django.views.decorators.csrf import csrf_exempt

from jobs.middleware import json_error

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


def staff_required(view: Callable[..., HttpResponse]) -> Callable[..., HttpResponse]:
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
