"""The JSON shapes of the `jobs` API: its one error shape and its reading of a JSON body."""

from __future__ import annotations

import json
from typing import Any

from django.http import HttpRequest, JsonResponse


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
    if (request.content_type or "").strip().lower() == "application/json":
        return None
    return json_error(JSON_REQUIRED, 415)


def json_object(request: HttpRequest, shape: str) -> dict[str, Any] | JsonResponse:
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
