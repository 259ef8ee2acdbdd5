"""The providers' status webhooks: anymail's views, refused unless a webhook secret is set,
and the receiver that records what they report on the email."""

from __future__ import annotations

import logging
from collections.abc import Callable
from functools import wraps
from typing import Any

from anymail.signals import AnymailTrackingEvent
from django.conf import settings
from django.http import HttpRequest, HttpResponse
from django.urls import URLPattern

from jobs.http import json_error
from mailer.models import Email
from mailer.services import email_delivery_record

logger = logging.getLogger("mailer.webhooks")

#: anymail's normalized event types that change an email's delivery status.
EVENT_STATUS = {
    "delivered": Email.DeliveryStatus.DELIVERED,
    "bounced": Email.DeliveryStatus.BOUNCED,
    "complained": Email.DeliveryStatus.COMPLAINED,
}


def _require_secret(view: Callable[..., HttpResponse]) -> Callable[..., HttpResponse]:
    """anymail accepts unauthenticated webhooks (with a warning) when no secret is set; here
    they are refused instead, so nobody on the web can mark emails bounced."""

    @wraps(view)  # keeps anymail's csrf_exempt: providers cannot send a CSRF token
    def wrapper(request: HttpRequest, *args: Any, **kwargs: Any) -> HttpResponse:
        if not getattr(settings, "ANYMAIL", {}).get("WEBHOOK_SECRET"):
            return json_error("webhooks are disabled: set ANYMAIL_WEBHOOK_SECRET", 403)
        return view(request, *args, **kwargs)

    return wrapper


def guarded_anymail_urls() -> list[URLPattern]:
    """anymail's tracking webhook routes, each behind `_require_secret`."""
    from anymail import urls

    return [
        URLPattern(route.pattern, _require_secret(route.callback), route.default_args, route.name)
        for route in urls.urlpatterns
        if isinstance(route, URLPattern) and route.name and route.name.endswith("tracking_webhook")
    ]


def on_tracking(sender: object, event: AnymailTrackingEvent, esp_name: str, **kwargs: Any) -> None:
    """Receiver of `anymail.signals.tracking` (connected in `MailerConfig.ready`)."""
    status = EVENT_STATUS.get(event.event_type)
    if status is None or not event.message_id:
        return
    detail = " ".join(filter(None, [event.recipient, event.description, event.mta_response]))
    email_delivery_record(
        provider_message_id=str(event.message_id), delivery_status=status, at=event.timestamp, detail=detail
    )
