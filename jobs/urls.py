"""Routes of the jobs machinery (included at the site root)."""

from django.urls import path

from jobs import api, views

urlpatterns = [
    path("healthz", views.healthz, name="healthz"),
    path("readyz", views.readyz, name="readyz"),
    path("metrics", views.metrics, name="metrics"),
    path("api/jobs/health/", views.jobs_health, name="jobs-health"),
    path("api/jobs/stats/", views.jobs_stats, name="jobs-stats"),
    path("api/jobs/jobs/", api.job_list, name="job-list"),
    path("api/jobs/jobs/counts/", api.job_counts_view, name="job-counts"),
    path("api/jobs/jobs/<str:task_id>/", api.job_detail, name="job-detail"),
    path("api/jobs/jobs/<str:task_id>/cancel/", api.job_cancel, name="job-cancel"),
    path("api/jobs/jobs/<str:task_id>/run-now/", api.job_run_now, name="job-run-now"),
    path("api/jobs/jobs/<str:task_id>/retry/", api.job_retry, name="job-retry"),
    path("api/jobs/queues/", api.queue_list, name="queue-list"),
    path("api/jobs/queues/<str:queue>/pause/", api.queue_pause_view, name="queue-pause"),
    path("api/jobs/queues/<str:queue>/resume/", api.queue_resume_view, name="queue-resume"),
    path("api/jobs/dead-letters/", api.dead_letter_list, name="dead-letter-list"),
    path("api/jobs/dead-letters/groups/", api.dead_letter_groups_view, name="dead-letter-groups"),
    path("api/jobs/dead-letters/requeue/", api.dead_letter_requeue_many, name="dead-letter-requeue-many"),
    path("api/jobs/dead-letters/<int:dead_letter_id>/", api.dead_letter_detail, name="dead-letter-detail"),
    path(
        "api/jobs/dead-letters/<int:dead_letter_id>/requeue/", api.dead_letter_requeue_one, name="dead-letter-requeue"
    ),
    path(
        "api/jobs/dead-letters/<int:dead_letter_id>/discard/", api.dead_letter_discard_one, name="dead-letter-discard"
    ),
]
