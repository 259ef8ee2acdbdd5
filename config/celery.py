"""The Celery application, configured from Django settings (the ``CELERY_`` namespace).

Celery's standard Django setup, as any project adopting `jobs` has it; `jobs` installs its worker
parts itself (`jobs.runtime.handlers`), and Flower reads its settings from `flowerconfig.py`.
What is left here prepares the `celery worker` and `celery beat` processes before Celery prints
its first line, which no Celery signal precedes: the web's metrics directory is not theirs, and
with LOG_FORMAT=json everything they print becomes a JSON log line.
"""

import os
import sys
from pathlib import Path

from celery import Celery, signals

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "config.settings.local")

_program = Path(sys.argv[0])
#: Run as `celery ...` or `python -m celery ...` (not imported by gunicorn or manage.py).
CELERY_PROGRAM = "celery" in {_program.name, _program.parent.name}
if CELERY_PROGRAM:
    # The web's prometheus_client multiprocess directory is for gunicorn's workers only: a worker
    # or beat that inherited it would write metric files nobody reads or cleans (and fail on every
    # database connection when the directory is missing). The worker serves its own /metrics.
    os.environ.pop("PROMETHEUS_MULTIPROC_DIR", None)
    os.environ.pop("prometheus_multiproc_dir", None)
    if "prometheus_client.values" in sys.modules:  # imported already by Celery's CLI plugins (Flower's)
        from prometheus_client import values

        values.ValueClass = values.get_value_class()

app = Celery("config", task_cls="jobs.base:MeteredTask")
app.config_from_object("django.conf:settings", namespace="CELERY")
app.autodiscover_tasks()


@signals.setup_logging.connect
def _use_django_logging(**kwargs) -> None:
    """This site's LOGGING (config/settings) already configured every logger, Celery's included,
    at django.setup(): connecting here stops Celery from installing its own handlers beside them.
    The site's choice: `jobs` leaves a host's Celery logging as Celery sets it up."""


def _json_only_output() -> None:
    """`celery worker` and `celery beat` with LOG_FORMAT=json: Celery's banners and any print()
    become JSON log lines, so a log shipper never meets a line that is not JSON."""
    if not CELERY_PROGRAM or not {"worker", "beat"} & set(sys.argv[1:]):
        return
    from django.conf import settings

    if settings.LOG_FORMAT == "json":
        import django

        from config.logging import capture_stdio

        capture_stdio()
        django.setup()  # logging configured now, before Celery prints or fails at start


_json_only_output()
