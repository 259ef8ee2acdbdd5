"""The site's own system checks (`jobs` has its own in `jobs.checks`)."""

from __future__ import annotations

from typing import Any

from django.conf import settings
from django.core.checks import CheckMessage, Warning, register


@register("site")
def check_flower_auth(app_configs: Any = None, **kwargs: Any) -> list[CheckMessage]:
    if not settings.DEBUG and not settings.FLOWER_BASIC_AUTH:
        return [
            Warning(
                "FLOWER_BASIC_AUTH is not set while DJANGO_DEBUG is false.",
                hint="Flower shows task arguments and can revoke tasks; `celery -A config flower` refuses to start "
                "without authentication outside debug.",
                id="site.W001",
            )
        ]
    return []
