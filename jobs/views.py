"""Health endpoints for load balancers and Kubernetes probes."""

from __future__ import annotations

from django.http import HttpRequest, HttpResponse, JsonResponse
from django.views.decorators.cache import never_cache
from django.views.decorators.http import require_GET

from jobs.auth import permission_required, staff_required
from jobs.health import jobs_health_report, jobs_stats_report, readiness


@never_cache
@require_GET
def healthz(request: HttpRequest) -> JsonResponse:
    """Liveness: the process answers. Touches nothing else, so a database outage does not make
    Kubernetes restart healthy web pods."""
    return JsonResponse({"status": "ok"})


@never_cache
@require_GET
def readyz(request: HttpRequest) -> JsonResponse:
    """Readiness: database and broker answer; 503 names the failing check."""
    ok, checks = readiness()
    return JsonResponse({"status": "ok" if ok else "unavailable", "checks": checks}, status=200 if ok else 503)


@never_cache
@require_GET
def metrics(request: HttpRequest) -> HttpResponse:
    """Prometheus text: django-prometheus's metrics (of every gunicorn worker, see
    jobs.prometheus_multiprocess) plus queue lengths, dead letters and heartbeats computed at
    scrape time. Keep it internal (deploy behind the network edge)."""
    from jobs.prometheus_multiprocess import metrics_page

    body, content_type = metrics_page()
    return HttpResponse(body, content_type=content_type)


@never_cache
@require_GET
def jobs_health(request: HttpRequest) -> JsonResponse:
    """Worker and beat liveness from their heartbeats (cheap: two cache reads): 200 when both are
    fresh, else 503 with the same body, so an uptime check that reads only the status sees it."""
    report = jobs_health_report()
    healthy = all(part["ok"] for part in report.values())
    return JsonResponse(report, status=200 if healthy else 503)


@never_cache
@require_GET
@staff_required
@permission_required("jobs.view_deadletter", "django_celery_results.view_taskresult")
def jobs_stats(request: HttpRequest) -> JsonResponse:
    """Queue lengths, task counts by state over the last 24 h, dead letters by status."""
    return JsonResponse(jobs_stats_report())
