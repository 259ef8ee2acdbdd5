"""Background work of the thumbnails app."""

from __future__ import annotations

from celery import shared_task

from jobs.base import JobTask
from jobs.exceptions import InvalidTaskArguments
from thumbnails import services
from thumbnails.exceptions import CorruptImage, OriginalMissing, StorageUnavailable
from thumbnails.models import Image


@shared_task(
    bind=True,
    base=JobTask,
    name="thumbnails.generate",
    transient_errors=(StorageUnavailable,),
    permanent_errors=(CorruptImage, OriginalMissing),
)
def generate(self: JobTask, image_id: int) -> None:
    """Makes the thumbnails of one image; harmless when run twice."""
    if not isinstance(image_id, int) or isinstance(image_id, bool) or image_id < 1:
        raise InvalidTaskArguments(f"image_id must be a positive integer, not {image_id!r}")
    image = Image.objects.filter(pk=image_id).first()
    if image is None:  # never existed, or deleted after it was queued: nothing a retry could fix
        raise InvalidTaskArguments(f"image {image_id} does not exist")
    try:
        services.thumbnails_generate(image=image)
    except Exception as exc:
        # Failing for good (not a transient error with retries left): say so on the image too;
        # JobTask writes the dead letter.
        if self.classify(exc) != "transient" or self.request.retries >= self.retries_allowed():
            services.image_mark_failed(image=image, error=f"{type(exc).__name__}: {exc}")
        raise
