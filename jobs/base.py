"""The task base classes a project builds its tasks on: `@shared_task(base=JobTask)`.

They live in `jobs.runtime.task` with the rest of the Celery-facing runtime; this is their public
address.
"""

from jobs.runtime.task import JobTask, MeteredTask

__all__ = ["JobTask", "MeteredTask"]
