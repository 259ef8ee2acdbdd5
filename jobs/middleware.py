"""HTTP middleware of `jobs`: the request id on every request and response, carried into every
task the request starts (`jobs.runtime.handlers`)."""

from __future__ import annotations

from collections.abc import Callable

from django.http import HttpRequest, HttpResponse

from jobs.context import new_request_id, request_id_var, sane_request_id


class RequestIdMiddleware:
    """Takes a sane incoming `X-Request-ID` or makes one, exposes it as `request.request_id`
    and in the logging context, and returns it on the response."""

    header = "X-Request-ID"

    def __init__(self, get_response: Callable[[HttpRequest], HttpResponse]) -> None:
        self.get_response = get_response

    def __call__(self, request: HttpRequest) -> HttpResponse:
        request_id = sane_request_id(request.headers.get(self.header)) or new_request_id()
        request.request_id = request_id  # type: ignore[attr-defined]  # read by views and logs
        token = request_id_var.set(request_id)
        try:
            response = self.get_response(request)
        finally:
            request_id_var.reset(token)
        response[self.header] = request_id
        return response
