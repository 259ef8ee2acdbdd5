"""How the thumbnails app sorts its failures for `JobTask` (see jobs.exceptions)."""

from __future__ import annotations

from jobs.exceptions import PermanentError, TransientError


class UploadTooLarge(ValueError):
    """The upload is bigger than MAX_UPLOAD_BYTES."""

    def __init__(self, size: int, limit: int) -> None:
        super().__init__(f"the file has {size} bytes; at most {limit} are allowed")
        self.size = size
        self.limit = limit


class StorageUnavailable(TransientError):
    """The storage backend timed out or could not be reached; worth another try."""


class OriginalMissing(PermanentError):
    """The original file of an image is gone from storage."""


class CorruptImage(PermanentError):
    """The stored original cannot be turned into thumbnails (broken, truncated, not allowed)."""
