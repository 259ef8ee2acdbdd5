"""Background work of the thumbnails app."""

from __future__ import annotations

from celery import shared_task

from jobs.base import JobTask
from jobs.exceptions import InvalidTaskArguments
from jobs.ids import is_row_id
from jobs.outcomes import Job
from thumbnails import services
from thumbnails.exceptions import StorageUnavailable
from thumbnails.models import Image


class ThumbnailTask(JobTask):
    """`JobTask` whose give-up marks the image `failed` (a corrupt upload, a time limit, a pool
    process killed on every try), so no image stays `processing` with nothing left to move it."""

    # A corrupt upload is a UserError, a missing original or an image Pillow cannot process a
    # PermanentError: JobTask classifies those by their base class.
    transient_errors = (StorageUnavailable,)

    def on_give_up(self, job: Job, *, reason: str, error: str) -> None:
        image_id = job.argument(0, "image_id")
        if is_row_id(image_id):
            services.image_mark_failed(image_id=image_id, error=error)


@shared_task(base=ThumbnailTask, name="thumbnails.generate")
def generate(image_id: int) -> None:
    """Makes the thumbnails of one image; harmless when run twice."""
    if not is_row_id(image_id):
        raise InvalidTaskArguments(f"image_id must be a positive integer, not {image_id!r}")
    image = Image.objects.filter(pk=image_id).first()
    if image is None:  # never existed, or deleted after it was queued: nothing a retry could fix
        raise InvalidTaskArguments(f"image {image_id} does not exist")
    services.thumbnails_generate(image=image)
