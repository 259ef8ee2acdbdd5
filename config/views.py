"""The site's own pages (the apps have theirs)."""

from __future__ import annotations

from django.http import HttpRequest, HttpResponse
from django.shortcuts import render
from django.views.decorators.http import require_safe

#: The API as the front page lists it: (endpoint, who may call it, what it does).
ENDPOINTS = (
    ("POST /api/thumbnails/", "anyone", "upload an image (multipart field image): 202 with its id and url"),
    ("GET /api/thumbnails/<id>/", "anyone", "an image's status and its thumbnails"),
    ("POST /api/emails/", "staff", 'queue a templated email: {"template", "to": [...], "context": {...}}'),
    ("GET /api/emails/<id>/", "staff", "an email's status, attempts and error"),
    ("POST /api/emails/purge/", "staff", "purge old sent emails in the background (a Django @task)"),
    ("GET /api/emails/purge/<id>/", "staff", "what the purge did: status, count, attempts, errors"),
    ("GET /api/jobs/health/", "anyone", "worker and beat heartbeats; 503 when one is missing"),
    ("GET /api/jobs/stats/", "staff", "queue lengths, tasks by state over 24 h, dead letters, outbox backlog"),
    ("GET /api/jobs/dead-letters/", "staff", "dead letters, newest first, with filters; /<id>/ for one"),
    ("POST /api/jobs/dead-letters/<id>/requeue/", "staff", "replay a dead letter (or .../discard/)"),
    ("GET /healthz, /readyz", "anyone", "liveness, and readiness (database and broker)"),
    ("GET /metrics", "internal", "Prometheus metrics"),
)


@require_safe
def home(request: HttpRequest) -> HttpResponse:
    return render(request, "site/home.html", {"endpoints": ENDPOINTS})
