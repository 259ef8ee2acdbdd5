"""A storage backend standing in for a remote one (S3) that times out."""

from __future__ import annotations

from django.core.files.storage import FileSystemStorage


class TimingOutStorage(FileSystemStorage):
    """Reads time out, as a remote object store does when the network misbehaves."""

    def open(self, name, mode="rb"):
        raise TimeoutError("read timed out")


class ReadTimeoutError(Exception):
    """Named as botocore's: a remote backend's own exception class, not a built-in one."""


class RemoteTimingOutStorage(FileSystemStorage):
    """Writes fail the way django-storages' S3 backend fails when S3 does not answer."""

    def _save(self, name, content):
        raise ReadTimeoutError("Read timeout on endpoint URL")
