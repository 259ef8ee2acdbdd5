"""An uploaded image and the thumbnails made from it in the background."""

from __future__ import annotations

from django.db import models


class Image(models.Model):
    """An upload: the original file, what it is, and where its thumbnails stand."""

    class Status(models.TextChoices):
        PENDING = "pending", "Pending"
        PROCESSING = "processing", "Processing"
        DONE = "done", "Done"
        FAILED = "failed", "Failed"

    original = models.FileField(
        max_length=255, help_text="The uploaded file, stored under a name the project generated."
    )
    format = models.CharField(max_length=10, editable=False, help_text="JPEG, PNG, WEBP or GIF, read from the content.")
    width = models.PositiveIntegerField(editable=False, help_text="Pixels, as displayed (EXIF orientation applied).")
    height = models.PositiveIntegerField(editable=False, help_text="Pixels, as displayed (EXIF orientation applied).")
    status = models.CharField(
        max_length=12, choices=Status.choices, default=Status.PENDING, editable=False, help_text="Thumbnail progress."
    )
    error = models.TextField(blank=True, editable=False, help_text="Why making the thumbnails failed.")
    request_id = models.CharField(
        max_length=128, blank=True, editable=False, help_text="X-Request-ID of the upload, for the logs."
    )
    created = models.DateTimeField(auto_now_add=True, help_text="When it was uploaded.")
    updated = models.DateTimeField(auto_now=True, help_text="When it last changed.")

    class Meta:
        ordering = ["-created", "-id"]
        indexes = [
            models.Index(fields=["status"], name="thumbnails_image_status"),
            models.Index(fields=["created"], name="thumbnails_image_created"),
        ]

    def __str__(self) -> str:
        return f"Image {self.pk} ({self.format} {self.width}x{self.height}, {self.status})"


class Thumbnail(models.Model):
    """One size of an image's thumbnails; at most one per image and size."""

    image = models.ForeignKey(Image, on_delete=models.CASCADE, related_name="thumbnails")
    size = models.PositiveIntegerField(help_text="The requested longest side, pixels (from THUMBNAIL_SIZES).")
    width = models.PositiveIntegerField(help_text="Pixels.")
    height = models.PositiveIntegerField(help_text="Pixels.")
    file = models.FileField(max_length=255, help_text="The encoded thumbnail (JPEG, or PNG when transparent).")
    updated = models.DateTimeField(auto_now=True)

    class Meta:
        ordering = ["image", "size"]
        constraints = [models.UniqueConstraint(fields=["image", "size"], name="thumbnails_unique_image_size")]

    def __str__(self) -> str:
        return f"{self.size}px thumbnail of image {self.image_id}"
