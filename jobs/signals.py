"""Celery signal handlers: logging set up by Django, not by Celery."""

from __future__ import annotations

from celery import signals


@signals.setup_logging.connect
def _use_django_logging(**kwargs) -> None:
    """Django's LOGGING already configured every logger (Celery's included) at django.setup();
    connecting here stops Celery from installing its own handlers beside them."""
