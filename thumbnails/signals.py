"""Files follow their rows: whichever way a row is deleted (a service, the admin's bulk delete,
a cascade), its file is removed from storage once the deletion is committed."""

from __future__ import annotations

from django.db.models.signals import post_delete
from django.dispatch import receiver

from thumbnails.models import Image, Thumbnail
from thumbnails.services import file_delete_on_commit


@receiver(post_delete, sender=Image, dispatch_uid="thumbnails.image_files")
def _image_deleted(sender, instance: Image, **kwargs) -> None:
    file_delete_on_commit(name=instance.original.name)


@receiver(post_delete, sender=Thumbnail, dispatch_uid="thumbnails.thumbnail_files")
def _thumbnail_deleted(sender, instance: Thumbnail, **kwargs) -> None:
    file_delete_on_commit(name=instance.file.name)
