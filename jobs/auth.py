"""Staff-only JSON endpoints: a Django session, an API token (`Authorization: Bearer <token>`, made
by an admin: cheap to check) or HTTP basic auth (kept for compatibility: it runs the password
hasher on every request, 0.5-0.65 s of CPU with Django 6's PBKDF2 rounds) with a staff account.

Writes (every method but GET, HEAD, OPTIONS and TRACE) refuse a cross-site request first, whatever
the authentication: a browser that once answered the basic auth prompt attaches those cached
credentials to every request to the site, another site's form posts and `no-cors` fetches
included, and SameSite (which protects the session cookie) does not cover them. A write is
refused, before any password is checked and with nothing done:

- 403 `{"error": "cross-site request refused"}` when `Sec-Fetch-Site` is there and is neither
  `same-origin` nor `none` (`same-site` is another site of the same registrable domain), or when
  `Origin` is there and is not the request's own origin (scheme and host as Django sees them, or
  one of `CSRF_TRUSTED_ORIGINS`, as Django's CSRF middleware decides; `Origin: null` never is);
- 415 when its Content-Type is not `application/json` (`jobs.http.not_json`), even when the
  body is empty: a cross-site form can send an empty `text/plain` body, so every write, one that
  takes no body too, must say `Content-Type: application/json`.

A request with neither header (curl, a server-side client) passes on to authentication. Session
requests also keep Django's CSRF token check on writes; API tokens and basic auth need no CSRF
token (a browser never attaches a bearer token by itself).
"""

from __future__ import annotations

import base64
import binascii
from collections.abc import Callable
from functools import wraps
from typing import Any

from django.contrib.auth import authenticate
from django.http import HttpRequest, HttpResponse, JsonResponse
from django.middleware.csrf import CsrfViewMiddleware
from django.views.decorators.csrf import csrf_exempt

from jobs.conf import jobs_settings
from jobs.http import json_error, not_json

SAFE_METHODS = frozenset({"GET", "HEAD", "OPTIONS", "TRACE"})
SAME_ORIGIN_FETCH_SITES = frozenset({"same-origin", "none"})  # `none`: typed or bookmarked by the user


def _unauthorized(message: str) -> JsonResponse:
    response = json_error(message, 401)
    realm = "".join(c for c in str(jobs_settings.API_REALM) if c.isprintable() and c not in '"\\')
    response["WWW-Authenticate"] = f'Basic realm="{realm}", charset="UTF-8"'
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


def _bearer_token(request: HttpRequest) -> str | None:
    """The token of an `Authorization: Bearer <token>` header (an API token an admin created:
    `jobs.models.ApiToken`), or None."""
    scheme, _, value = request.headers.get("Authorization", "").partition(" ")
    if scheme.lower() != "bearer":
        return None
    return value.strip()


def _no_view(_request: HttpRequest) -> HttpResponse:  # pragma: no cover - never called
    raise AssertionError


def _cross_site_header(request: HttpRequest) -> str | None:
    """The header that shows the request comes from another site (`Sec-Fetch-Site` or
    `Origin`), or None when neither does (same origin, or a client that sends neither)."""
    fetch_site = request.headers.get("Sec-Fetch-Site")
    if fetch_site is not None and fetch_site.strip().lower() not in SAME_ORIGIN_FETCH_SITES:
        return "Sec-Fetch-Site"
    origin = request.headers.get("Origin")
    if origin is None:
        return None
    # Django's own origin check: scheme and host as Django sees them, or CSRF_TRUSTED_ORIGINS
    # (`_origin_verified` is private, so django-stubs leaves it out).
    if origin.strip().lower() == "null" or not CsrfViewMiddleware(_no_view)._origin_verified(request):  # type: ignore[attr-defined]
        return "Origin"
    return None


def _cross_site_refusal(request: HttpRequest) -> HttpResponse | None:
    """403 or 415 for a write that may come from another site; None for a safe method or a
    same-origin JSON write."""
    if request.method in SAFE_METHODS:
        return None
    header = _cross_site_header(request)
    if header is not None:
        return json_error("cross-site request refused", 403, header=header)
    return not_json(request)


def _csrf_failure(request: HttpRequest) -> HttpResponse | None:
    """Runs Django's CSRF check on a view that is exempt from the middleware's own check."""
    check = CsrfViewMiddleware(_no_view)
    check.process_request(request)
    return check.process_view(request, _no_view, (), {})


def staff_required(view: Callable[..., HttpResponse]) -> Callable[..., HttpResponse]:
    """Lets staff in by API token, basic auth or session: first 403/415 for a write that may come from
    another site (see the module docstring), then 401 (with `WWW-Authenticate`) without valid
    credentials, 403 for a user who is not staff, 403 for a session write without CSRF token."""

    @csrf_exempt  # checked below for session users; cross-site basic auth writes are refused first
    @wraps(view)
    def wrapper(request: HttpRequest, *args: Any, **kwargs: Any) -> HttpResponse:
        refused = _cross_site_refusal(request)
        if refused is not None:
            return refused
        try:
            credentials = _basic_credentials(request)
        except ValueError:
            return _unauthorized("malformed basic auth header")
        token = _bearer_token(request)
        if token is not None:
            from jobs.services import api_token_user

            holder = api_token_user(token)
            if holder is None:
                return _unauthorized("invalid or revoked token")
            request.user = holder
        elif credentials is not None:
            authenticated = authenticate(request, username=credentials[0], password=credentials[1])
            if authenticated is None:
                return _unauthorized("invalid credentials")
            request.user = authenticated
        else:
            if not request.user.is_authenticated:
                return _unauthorized("authentication required")
            if request.method not in SAFE_METHODS:
                failure = _csrf_failure(request)
                if failure is not None:
                    return json_error("CSRF verification failed", 403)
        user = request.user  # the basic auth user just set, or the session's
        if not (user.is_active and user.is_staff):
            return json_error("staff only", 403)
        return view(request, *args, **kwargs)

    return wrapper


def permission_required(*permissions: str) -> Callable[[Callable[..., HttpResponse]], Callable[..., HttpResponse]]:
    """Under `staff_required`: 403, naming what is missing, for a staff user without each of
    `permissions` (`"app_label.codename"`), so that a view-only staff member reads and changes
    nothing beyond the model permissions the admin gives them."""

    def decorate(view: Callable[..., HttpResponse]) -> Callable[..., HttpResponse]:
        @wraps(view)
        def wrapper(request: HttpRequest, *args: Any, **kwargs: Any) -> HttpResponse:
            for permission in permissions:
                if not request.user.has_perm(permission):
                    return json_error(f"permission {permission} required", 403, permission=permission)
            return view(request, *args, **kwargs)

        return wrapper

    return decorate
