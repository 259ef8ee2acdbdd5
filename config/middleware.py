"""The site's own middleware: JSON errors for the API and for clients that did not ask for HTML,
and the probes answered before Django validates the Host header."""

from __future__ import annotations

import logging
from collections.abc import Callable

from django.core.exceptions import BadRequest, PermissionDenied, RequestDataTooBig, SuspiciousOperation
from django.http import Http404, HttpRequest, HttpResponse

from jobs.http import json_error

logger = logging.getLogger(__name__)


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
