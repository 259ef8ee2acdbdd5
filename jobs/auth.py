"""Staff-only JSON endpoints: a Django session or HTTP basic auth with a staff account."""

from __future__ import annotations

import base64
import binascii
from collections.abc import Callable
from functools import wraps

from django.contrib.auth import authenticate
from django.http import HttpRequest, HttpResponse
from django.views.decorators.csrf import csrf_exempt

from jobs.middleware import json_error


def _basic_auth_user(request: HttpRequest):
    header = request.headers.get("Authorization", "")
    scheme, _, encoded = header.partition(" ")
    if scheme.lower() != "basic" or not encoded:
        return None
    try:
        username, sep, password = base64.b64decode(encoded, validate=True).decode().partition(":")
    except (binascii.Error, UnicodeDecodeError):
        return None
    if not sep:
        return None
    return authenticate(request, username=username, password=password)


def staff_required(view: Callable[..., HttpResponse]) -> Callable[..., HttpResponse]:
    """401 (with a Basic challenge) without credentials, 403 for a non-staff user.

    Session requests keep Django's CSRF protection; requests authenticated with HTTP basic auth
    carry their credentials in every request, so no cookie can be abused and CSRF does not apply.
    """

    @wraps(view)
    def wrapped(request: HttpRequest, *args, **kwargs) -> HttpResponse:
        user = None
        via_basic = "Authorization" in request.headers
        if via_basic:
            user = _basic_auth_user(request)
        elif request.user.is_authenticated:
            user = request.user
            if request.method not in ("GET", "HEAD", "OPTIONS"):
                from django.middleware.csrf import CsrfViewMiddleware

                reason = CsrfViewMiddleware(lambda r: None).process_view(request, None, (), {})
                if reason is not None:
                    return json_error("CSRF verification failed", 403)
        if user is None or not user.is_active:
            response = json_error("authentication required", 401)
            response["WWW-Authenticate"] = 'Basic realm="jobs", charset="UTF-8"'
            return response
        if not user.is_staff:
            return json_error("staff only", 403)
        request.user = user
        return view(request, *args, **kwargs)

    return csrf_exempt(wrapped)
