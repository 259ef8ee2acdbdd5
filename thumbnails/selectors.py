"""Reads of the thumbnails app."""

from __future__ import annotations

from thumbnails.models import Image


def image_get(*, image_id: int) -> Image | None:
    """One image with its thumbnails, or None."""
    return Image.objects.prefetch_related("thumbnails").filter(pk=image_id).first()


def images_latest(*, limit: int) -> list[Image]:
    """The latest uploads, newest first, with their thumbnails."""
    return list(Image.objects.prefetch_related("thumbnails").order_by("-created", "-id")[:limit])
