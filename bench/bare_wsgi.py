"""The upload benchmark's baseline: the same project, view and upload handling (size limits,
image inspection, storage, the `Image` row), with the publishing step taken out: no outbox row,
no publish after commit. `gunicorn bench.bare_wsgi` against `gunicorn config.wsgi` shows what
enqueueing costs on the request path."""

from config.wsgi import application  # noqa: F401  (the WSGI callable gunicorn serves)
from thumbnails import services


def _no_enqueue(*args, **kwargs) -> str:
    return ""


services.enqueue = _no_enqueue
