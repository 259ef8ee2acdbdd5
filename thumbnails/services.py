"""Writes of the thumbnails app: accepting an upload, making its thumbnails, regenerating them.

Files go through Django's storage API (`default_storage`) only, so S3 or any other
django-storages backend works by configuration alone.
"""

from __future__ import annotations

import hashlib
import logging
import uuid
from collections.abc import Iterable, Iterator
from contextlib import contextmanager

from django.conf import settings
from django.core.files.base import ContentFile
from django.core.files.storage import default_storage
from django.core.files.uploadedfile import UploadedFile
from django.db import transaction
from django.utils import timezone

from jobs.publish import enqueue
from thumbnails import processing, tasks
from thumbnails.exceptions import CorruptImage, OriginalMissing, StorageUnavailable, UnprocessableImage, UploadTooLarge
from thumbnails.models import Image, Thumbnail

logger = logging.getLogger("thumbnails")


# Raised by storage backends when they cannot be reached (the local disk never does). Remote
# backends bring their own classes (botocore's and urllib3's are not the built-in ones): known
# by name, so this module needs none of those libraries.
_STORAGE_TRANSIENT = (TimeoutError, ConnectionError)
_STORAGE_TRANSIENT_NAMES = frozenset(
    {
        "ReadTimeoutError",
        "ConnectTimeoutError",
        "EndpointConnectionError",
        "ConnectionClosedError",
        "ProtocolError",
        "ConnectionError",
        "Timeout",
    }
)


# What an S3-compatible store answers when it is overloaded or failing (botocore's ClientError
# after its own retries): worth another try later, unlike a missing bucket or refused credentials.
_STORAGE_TRANSIENT_CODES = frozenset(
    {"SlowDown", "ServiceUnavailable", "InternalError", "RequestTimeout", "Throttling", "ThrottlingException"}
)


def _storage_transient(exc: BaseException) -> bool:
    if isinstance(exc, _STORAGE_TRANSIENT) or any(
        cls.__name__ in _STORAGE_TRANSIENT_NAMES for cls in type(exc).__mro__
    ):
        return True
    response = getattr(exc, "response", None)  # botocore's ClientError carries the parsed reply
    if not isinstance(response, dict):
        return False
    code = str((response.get("Error") or {}).get("Code", ""))
    status = (response.get("ResponseMetadata") or {}).get("HTTPStatusCode") or 0
    return code in _STORAGE_TRANSIENT_CODES or status == 429 or status >= 500


@contextmanager
def _storage_errors(doing: str) -> Iterator[None]:
    """Turns a storage failure worth another try (a timeout, an overloaded store) into
    `StorageUnavailable`, which the task retries; any other error passes through."""
    try:
        yield
    except Exception as exc:
        if _storage_transient(exc):
            raise StorageUnavailable(f"{doing} failed: {exc}") from exc
        raise


def _overwrites_whole(storage) -> bool:
    """Whether saving over an existing name replaces it in one step, as an object store's PUT
    does (django-storages' S3 and GCS backends with `file_overwrite`): a reader then sees the old
    object or the new one, never a missing or partial one. Django's FileSystemStorage
    (`allow_overwrite` truncates the file in place) does not."""
    return getattr(storage, "file_overwrite", False) is True


def _original_name(info: processing.ImageInfo) -> str:
    """A name of our own: nothing the client sent (its file name) reaches the storage path."""
    return f"originals/{timezone.now():%Y/%m}/{uuid.uuid4().hex}.{info.extension}"


def thumbnail_name(*, image_id: int, size: int, extension: str, data: bytes) -> str:
    """Named by content: a redelivered task makes the same bytes, hence the same name, and a row
    only ever switches from one complete file to another (never to one being rewritten)."""
    digest = hashlib.sha256(data).hexdigest()[:16]
    return f"thumbnails/{image_id}/{size}-{digest}.{extension}"


def image_create(*, upload: UploadedFile, request_id: str | None = None) -> Image:
    """Validates an upload, stores it and queues its thumbnails once the transaction commits.

    Raises `UploadTooLarge` or a `processing.ImageError` (not an image, unsupported format,
    too many pixels), or `StorageUnavailable` when the storage backend cannot be reached;
    nothing is stored or queued then.
    """
    limit = settings.MAX_UPLOAD_BYTES
    if upload.size is None or upload.size > limit:
        raise UploadTooLarge(upload.size or 0, limit)
    upload.seek(0)
    data = upload.read(limit + 1)
    if len(data) > limit:
        raise UploadTooLarge(len(data), limit)
    info = processing.inspect(data, max_pixels=settings.MAX_IMAGE_PIXELS)

    with _storage_errors("storing the original"):
        stored = default_storage.save(_original_name(info), ContentFile(data))
    try:
        with transaction.atomic():
            image = Image.objects.create(
                original=stored,
                format=info.format,
                width=info.width,
                height=info.height,
                request_id=request_id or "",
            )
            enqueue(tasks.generate, args=[image.pk], request_id=request_id)
    except BaseException:
        default_storage.delete(stored)
        raise
    logger.info("thumbnails.image_created", extra={"image_id": image.pk, "format": info.format, "bytes": len(data)})
    return image


def _read_original(image: Image) -> bytes:
    try:
        with _storage_errors("reading the original"), default_storage.open(image.original.name, "rb") as handle:
            return handle.read()
    except FileNotFoundError as exc:
        raise OriginalMissing(f"the original file {image.original.name!r} is missing") from exc


def _write(name: str, data: bytes) -> str:
    """Writes `data` under exactly `name`, replacing what a previous attempt left there."""
    with _storage_errors(f"writing {name!r}"):
        # On a disk a crashed attempt may have left half a file: remove it, then create the name
        # afresh. An object store never shows a partial object and replaces one whole, so there
        # the write goes straight over it (no moment without the file a committed row names).
        if not _overwrites_whole(default_storage) and default_storage.exists(name):
            default_storage.delete(name)
        saved = default_storage.save(name, ContentFile(data))
        if saved != name:
            # A concurrent run of the same task wrote `name` in between; it holds the same bytes.
            default_storage.delete(saved)
        return name


def thumbnails_generate(*, image: Image) -> list[Thumbnail]:
    """Makes the thumbnails of `image` for every size in THUMBNAIL_SIZES and marks it done.

    Idempotent and atomic: files are named by their content and rows are replaced per size in
    one transaction, so running it again (a redelivered task, a regenerate) gives the same files
    and no duplicate rows, and a reader sees either the previous complete file or the new one.
    A file a row already points at is complete and is not written again; anything else under
    the name (what a crashed attempt left half-written) is replaced before a row points at it.

    Raises `CorruptImage` or `OriginalMissing` (permanent) and `StorageUnavailable` (transient).
    """
    sizes = list(settings.THUMBNAIL_SIZES)
    Image.objects.filter(pk=image.pk).update(status=Image.Status.PROCESSING, updated=timezone.now())
    data = _read_original(image)
    try:
        thumbs = processing.make_thumbnails(data, sizes, max_pixels=settings.MAX_IMAGE_PIXELS)
    except (processing.CorruptImage, processing.NotAnImage) as exc:
        raise CorruptImage(str(exc)) from exc  # the uploader's file: a user error
    except processing.ImageError as exc:
        raise UnprocessableImage(str(exc)) from exc  # allowed at upload, refused now: the system's

    current = set(image.thumbnails.values_list("file", flat=True))
    written = {}
    for thumb in thumbs:
        name = thumbnail_name(image_id=image.pk, size=thumb.size, extension=thumb.extension, data=thumb.data)
        written[thumb.size] = (thumb, name if name in current else _write(name, thumb.data))

    rows = []
    with transaction.atomic():
        locked = Image.objects.select_for_update().filter(pk=image.pk).first()
        if locked is None:  # deleted while we worked: its files go with it
            for _thumb, name in written.values():
                default_storage.delete(name)
            return []
        previous = {row.size: row for row in locked.thumbnails.all()}
        for size, (thumb, name) in written.items():
            old = previous.pop(size, None)
            if old is not None and old.file.name != name:
                _delete_after_commit(old.file.name)
            row, _created = Thumbnail.objects.update_or_create(
                image=locked, size=size, defaults={"width": thumb.width, "height": thumb.height, "file": name}
            )
            rows.append(row)
        for stale in previous.values():  # a size no longer in THUMBNAIL_SIZES
            stale.delete()
        locked.status = Image.Status.DONE
        locked.error = ""
        locked.save(update_fields=["status", "error", "updated"])
    image.status, image.error = locked.status, locked.error
    logger.info("thumbnails.generated", extra={"image_id": image.pk, "sizes": sorted(written)})
    return rows


def image_mark_failed(*, image_id: int, error: str) -> bool:
    """Records that the thumbnails of an image cannot be made (its job was given up). An image
    made after all (a second run finished) stays done. False when nothing changed."""
    updated = (
        Image.objects.filter(pk=image_id)
        .exclude(status=Image.Status.DONE)
        .update(status=Image.Status.FAILED, error=error[:2000], updated=timezone.now())
    )
    if updated:
        logger.warning("thumbnails.failed", extra={"image_id": image_id, "error": error[:500]})
    return bool(updated)


def images_regenerate(*, images: Iterable[Image]) -> int:
    """Queues the thumbnails of `images` again (status back to pending); returns how many."""
    ids = [image.pk for image in images]
    with transaction.atomic():
        Image.objects.filter(pk__in=ids).update(status=Image.Status.PENDING, error="", updated=timezone.now())
        for image_id in ids:
            enqueue(tasks.generate, args=[image_id])
    return len(ids)


def image_delete(*, image: Image) -> None:
    """Deletes an image, its thumbnails and (once committed) all their files."""
    image.delete()


def _delete_after_commit(name: str) -> None:
    if name:
        transaction.on_commit(lambda: default_storage.delete(name))


def file_delete_on_commit(*, name: str) -> None:
    """Deletes a stored file once the surrounding transaction commits (never for a rollback)."""
    _delete_after_commit(name)
