"""The Celery application, configured from Django settings (the ``CELERY_`` namespace)."""

import os
import sys

from celery import Celery

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "config.settings.local")

app = Celery("config", task_cls="jobs.base:MeteredTask")
app.config_from_object("django.conf:settings", namespace="CELERY")
app.autodiscover_tasks()


def _add_worker_steps() -> None:
    from jobs.worker import LivenessStep, ZeroIsNoLimitStep

    app.steps["worker"].add(ZeroIsNoLimitStep)
    app.steps["consumer"].add(LivenessStep)


_add_worker_steps()


def _configure_flower() -> None:
    """`celery -A config flower`: auth required outside debug, state kept on disk."""
    if "flower" not in sys.argv[1:]:
        return
    import django
    from django.conf import settings

    from jobs.flower import flower_environment

    django.setup()
    flower_environment(os.environ, debug=settings.DEBUG, var_dir=settings.VAR_DIR)


_configure_flower()
