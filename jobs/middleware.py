"""HTTP middleware: the request id on every request and response, and JSON errors for the API."""

from __future__ import annotations

import json
import logging
from collections.abc import Callable

from django.core.exceptions import BadRequest, PermissionDenied, RequestDataTooBig, SuspiciousOperation
from django.http import Http404, HttpRequest, HttpResponse, JsonResponse

from jobs.context import new_request_id, request_id_var, sane_request_id

logger = logging.getLogger(__name__)


class RequestIdMiddleware:
    """Takes a sane incoming `X-Request-ID` or makes one, exposes it as `request.request_id`
    and in the logging context, and returns it on the response."""

    header = "X-Request-ID"

    def __init__(self, get_response: Callable[[HttpRequest], HttpResponse]) -> None:
        self.get_response = get_response

    def __call__(self, request: HttpRequest) -> HttpResponse:
        request_id = sane_request_id(request.headers.get(self.header)) or new_request_id()
        request.request_id = request_id
        token = request_id_var.set(request_id)
        try:
            response = self.get_response(request)
        finally:
            request_id_var.reset(token)
        response[self.header] = request_id
        return response


def json_error(message: str, status: int, **extra: object) -> JsonResponse:
    """The project's one error shape: `{"error": "...", ...}`."""
    return JsonResponse({"error": message, **extra}, status=status)


JSON_REQUIRED = "Content-Type: application/json required"


def not_json(request: HttpRequest) -> JsonResponse | None:
    """The 415 answer for a request whose Content-Type (parameters such as `; charset=utf-8`
    aside) is not `application/json`, a missing one included; None when it is JSON.

    A browser sends a cross-site form or a `no-cors` fetch only as `text/plain`,
    `application/x-www-form-urlencoded` or `multipart/form-data` (or with no type), never as
    `application/json`, so insisting on it keeps another site's page from driving the API."""
    if request.content_type.strip().lower() == "application/json":
        return None
    return json_error(JSON_REQUIRED, 415)


def json_object(request: HttpRequest, shape: str) -> dict | JsonResponse:
    """The request's body as a JSON object, or the answer saying why it is not one: 415 when the
    Content-Type is not `application/json` (see `not_json`), 400 when the body is not a JSON
    object (`shape` shows what is expected)."""
    refused = not_json(request)
    if refused is not None:
        return refused
    try:
        body = json.loads(request.body or b"null")
    except (json.JSONDecodeError, UnicodeDecodeError):
        return json_error("the body must be JSON", 400)
    if not isinstance(body, dict):
        return json_error(f"the body must be a JSON object {shape}", 400)
    return body


def _wants_json(request: HttpRequest) -> bool:
    return request.path.startswith("/api/") or "text/html" not in request.headers.get("Accept", "")


class JsonErrorMiddleware:
    """Turns Django's HTML error pages into JSON for the API and for every client that did not
    ask for HTML (probes, curl, scripts), in debug too, so a client never parses a debug page.
    Under `/api/` an unhandled exception also becomes a JSON 500."""

    def __init__(self, get_response: Callable[[HttpRequest], HttpResponse]) -> None:
        self.get_response = get_response

    def __call__(self, request: HttpRequest) -> HttpResponse:
        response = self.get_response(request)
        if (
            response.status_code >= 400
            and _wants_json(request)
            and not response.get("Content-Type", "").startswith("application/json")
        ):
            return json_error(_REASONS.get(response.status_code, "request failed"), response.status_code)
        return response

    def process_exception(self, request: HttpRequest, exception: Exception) -> HttpResponse | None:
        if not request.path.startswith("/api/"):
            return None
        if isinstance(exception, Http404):
            return json_error("not found", 404)
        if isinstance(exception, PermissionDenied):
            return json_error("forbidden", 403)
        if isinstance(exception, RequestDataTooBig):
            return json_error("request body too large", 413)
        if isinstance(exception, SuspiciousOperation | BadRequest):
            return json_error("bad request", 400)
        logger.exception("http.unhandled_exception", extra={"path": request.path})
        return json_error("internal server error", 500)


_REASONS = {
    400: "bad request",
    401: "authentication required",
    403: "forbidden",
    404: "not found",
    405: "method not allowed",
    413: "request body too large",
    500: "internal server error",
}


class ProbeMiddleware:
    """Answers `/healthz`, `/readyz` and `/metrics` before Django validates the Host header.

    Kubernetes probes and Prometheus address a pod by its IP (or a service name), which is not in
    DJANGO_ALLOWED_HOSTS; these views build no URL from the host, so host validation protects
    nothing there. Every other path goes through the full middleware stack.
    """

    def __init__(self, get_response: Callable[[HttpRequest], HttpResponse]) -> None:
        self.get_response = get_response

    def __call__(self, request: HttpRequest) -> HttpResponse:
        from jobs import views

        view = {"/healthz": views.healthz, "/readyz": views.readyz, "/metrics": views.metrics}.get(request.path)
        if view is None:
            return self.get_response(request)
        return view(request)
