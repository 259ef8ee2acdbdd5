"""Why an email was refused when it was queued."""

from __future__ import annotations

from django.core.exceptions import ValidationError


class EmailRefused(ValidationError):
    """An email that cannot be queued: unknown template, bad address, header injection, or an
    attachment over the limits or of a type not allowed. `code` names the reason for programs,
    `field` the input at fault; `str()` is one readable line."""

    def __init__(self, message: str, *, code: str, field: str) -> None:
        super().__init__(message, code=code)
        self.field = field

    def __str__(self) -> str:
        return self.message
