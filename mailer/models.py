"""A stored email: rendered once when queued, sent by a task that only carries its id."""

from __future__ import annotations

import uuid

from django.conf import settings
from django.core.serializers.json import DjangoJSONEncoder
from django.db import models
from django.utils import timezone


def new_message_id() -> str:
    """A Message-ID that stays the same across every attempt to send one email, so a message
    handed off twice (a worker lost mid hand-off) can be recognised as one by its recipients."""
    domain = settings.DEFAULT_FROM_EMAIL.rpartition("@")[2].strip("> ") or "localhost"
    return f"<{uuid.uuid4().hex}@{domain}>"


class Email(models.Model):
    """One email to one or more recipients, as rendered when it was queued."""

    class Status(models.TextChoices):
        QUEUED = "queued", "Queued"
        SENDING = "sending", "Sending"
        SENT = "sent", "Sent"
        FAILED = "failed", "Failed"

    class DeliveryStatus(models.TextChoices):
        UNKNOWN = "", "Unknown"
        DELIVERED = "delivered", "Delivered"
        BOUNCED = "bounced", "Bounced"
        COMPLAINED = "complained", "Complained"

    to = models.JSONField(default=list, help_text="Recipient addresses.")
    from_email = models.CharField(max_length=320, help_text="Sender, DEFAULT_FROM_EMAIL when queued.")
    template = models.CharField(max_length=100, db_index=True, help_text="Name under templates/mailer/.")
    context = models.JSONField(default=dict, blank=True, encoder=DjangoJSONEncoder, help_text="Template context.")
    subject = models.CharField(max_length=998)
    body_text = models.TextField(blank=True)
    body_html = models.TextField(blank=True)

    status = models.CharField(max_length=16, choices=Status.choices, default=Status.QUEUED)
    attempts = models.PositiveIntegerField(default=0, editable=False, help_text="Hand-offs started.")
    last_error = models.TextField(blank=True, editable=False)
    message_id = models.CharField(
        max_length=255, unique=True, default=new_message_id, editable=False, help_text="The Message-ID header."
    )
    provider_message_id = models.CharField(
        max_length=255, blank=True, editable=False, help_text="The id the backend gave the message, if any."
    )
    delivery_status = models.CharField(
        max_length=16,
        choices=DeliveryStatus.choices,
        default=DeliveryStatus.UNKNOWN,
        blank=True,
        editable=False,
        help_text="From the provider's status webhooks.",
    )
    delivery_detail = models.TextField(blank=True, editable=False)
    delivery_updated_at = models.DateTimeField(null=True, blank=True, editable=False)
    request_id = models.CharField(max_length=128, blank=True, db_index=True)
    resent_from = models.ForeignKey(
        "self", null=True, blank=True, on_delete=models.SET_NULL, related_name="resends", editable=False
    )

    created_at = models.DateTimeField(default=timezone.now, editable=False)
    updated_at = models.DateTimeField(auto_now=True)
    claimed_by = models.CharField(
        max_length=64, blank=True, editable=False, help_text="Task id of the attempt that holds the `sending` claim."
    )
    handed_off_at = models.DateTimeField(
        null=True, blank=True, editable=False, help_text="When the latest hand-off to the backend started."
    )
    sent_at = models.DateTimeField(null=True, blank=True, editable=False, help_text="When the backend accepted it.")

    class Meta:
        ordering = ["-created_at", "-id"]
        indexes = [
            models.Index(fields=["status", "-created_at"], name="email_status_created"),
            models.Index(fields=["template", "-created_at"], name="email_template_created"),
            models.Index(fields=["provider_message_id"], name="email_provider_message_id"),
            models.Index(fields=["delivery_status"], name="email_delivery_status"),
        ]

    def __str__(self) -> str:
        return f"{self.template} to {', '.join(self.to)}"


def attachment_path(instance: EmailAttachment, filename: str) -> str:
    return f"mailer/attachments/{timezone.now():%Y/%m/%d}/{uuid.uuid4().hex}/{filename}"


class EmailAttachment(models.Model):
    """A file sent with an email, kept in Django storage (never in the queue)."""

    email = models.ForeignKey(Email, on_delete=models.CASCADE, related_name="attachments")
    file = models.FileField(upload_to=attachment_path, max_length=500)
    filename = models.CharField(max_length=255, help_text="Name the recipient sees.")
    content_type = models.CharField(max_length=100)
    size = models.PositiveBigIntegerField(help_text="Bytes.")
    content_id = models.CharField(
        max_length=100, blank=True, help_text="Set for an inline image the HTML part shows as cid:<content_id>."
    )

    class Meta:
        ordering = ["id"]

    def __str__(self) -> str:
        return self.filename
