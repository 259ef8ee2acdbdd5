"""A storage backend standing in for a remote one (S3) that times out."""

from __future__ import annotations

from django.core.files.storage import FileSystemStorage


class TimingOutStorage(FileSystemStorage):
    """Reads time out, as a remote object store does when the network misbehaves."""

    def open(self, name, mode="rb"):
        raise TimeoutError("read timed out")
