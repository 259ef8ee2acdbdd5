"""How the thumbnails app sorts its failures for `JobTask` (see jobs.exceptions)."""

from __future__ import annotations

from jobs.exceptions import PermanentError, TransientError, UserError


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


class UnprocessableImage(PermanentError):
    """An image the upload check let in that this release cannot process (a format or a size the
    settings no longer allow): the system's matter, a dead letter."""


class CorruptImage(UserError):
    """The stored original cannot be turned into thumbnails (broken, truncated, not allowed): the
    uploader's file, not the system, so the image ends failed with a message for them and no
    dead letter pages an operator."""

    USER_MESSAGE = "This file cannot be read as an image: it may be damaged, cut short, or not an image at all."

    def __init__(self, message: str) -> None:
        super().__init__(message, user_message=self.USER_MESSAGE)
