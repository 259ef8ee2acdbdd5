from django.apps import AppConfig


class JobsConfig(AppConfig):
    name = "jobs"
    verbose_name = "Background jobs"
    default_auto_field = "django.db.models.BigAutoField"

    def ready(self) -> None:
        from jobs import checks  # noqa: F401 - registers the system checks
        from jobs.runtime import handlers  # noqa: F401 - connects the Celery signal handlers
        from jobs.runtime.broker import reuse_redis_clients

        reuse_redis_clients()
