"""Routes of the jobs machinery (included at the site root)."""

from django.urls import path

from jobs import views

urlpatterns = [
    path("metrics", views.metrics, name="metrics"),
    path("api/jobs/health/", views.jobs_health, name="jobs-health"),
    path("api/jobs/stats/", views.jobs_stats, name="jobs-stats"),
]
