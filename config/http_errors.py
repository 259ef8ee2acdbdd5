"""Error handlers: the project answers errors with JSON, never with an HTML error page."""

from __future__ import annotations

from django.http import HttpRequest, JsonResponse

from jobs.http import json_error


def bad_request(request: HttpRequest, exception: Exception | None = None) -> JsonResponse:
    return json_error("bad request", 400)


def permission_denied(request: HttpRequest, exception: Exception | None = None) -> JsonResponse:
    return json_error("forbidden", 403)


def page_not_found(request: HttpRequest, exception: Exception | None = None) -> JsonResponse:
    return json_error("not found", 404, path=request.path[:200])


def server_error(request: HttpRequest) -> JsonResponse:
    return json_error("internal server error", 500)
