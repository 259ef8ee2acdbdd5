"""The site's own pages (the apps have theirs)."""

from __future__ import annotations

import functools
import io

from django.http import HttpRequest, HttpResponse
from django.shortcuts import render
from django.views.decorators.cache import cache_control
from django.views.decorators.http import require_safe

#: The API as the front page lists it: (endpoint, who may call it, what it does).
ENDPOINTS = (
    ("POST /api/thumbnails/", "anyone", "upload an image (multipart field image): 202 with its id and url"),
    ("GET /api/thumbnails/<id>/", "anyone", "an image's status and its thumbnails"),
    (
        "POST /api/emails/",
        "staff, mailer.add_email",
        'queue a templated email: {"template", "to": [...], "context": {...}}',
    ),
    ("GET /api/emails/<id>/", "staff, mailer.view_email", "an email's status, attempts and error"),
    (
        "POST /api/emails/purge/",
        "staff, mailer.delete_email",
        "purge old sent emails in the background (a Django @task)",
    ),
    ("GET /api/emails/purge/<id>/", "staff, mailer.view_email", "what the purge did: status, count, attempts, errors"),
    ("GET /api/jobs/health/", "anyone", "worker and beat heartbeats; 503 when one is missing"),
    (
        "GET /api/jobs/stats/",
        "staff, jobs.view_deadletter, django_celery_results.view_taskresult",
        "queue lengths, tasks by state over 24 h, dead letters, outbox backlog",
    ),
    (
        "GET /api/jobs/dead-letters/",
        "staff, jobs.view_deadletter",
        "dead letters, newest first, with filters; /<id>/ for one",
    ),
    (
        "POST /api/jobs/dead-letters/<id>/requeue/",
        "staff, jobs.change_deadletter",
        "replay a dead letter (or .../discard/)",
    ),
    ("GET /healthz, /readyz", "anyone", "liveness, and readiness (database and broker)"),
    ("GET /metrics", "internal", "Prometheus metrics"),
)


@require_safe
def home(request: HttpRequest) -> HttpResponse:
    return render(request, "site/home.html", {"endpoints": ENDPOINTS})


@functools.cache
def _favicon() -> bytes:
    """A 32 px icon (the admin's blue, a white bar: a queue), drawn once with Pillow."""
    from PIL import Image, ImageDraw

    image = Image.new("RGBA", (32, 32), (65, 118, 144, 255))
    ImageDraw.Draw(image).rectangle((6, 13, 25, 18), fill=(255, 255, 255, 255))
    buffer = io.BytesIO()
    image.save(buffer, format="ICO", sizes=[(32, 32)])
    return buffer.getvalue()


@require_safe
@cache_control(max_age=86400, public=True)
def favicon(request: HttpRequest) -> HttpResponse:
    """What every browser asks for on every page: a 404 in each page view's logs before."""
    return HttpResponse(_favicon(), content_type="image/x-icon")
