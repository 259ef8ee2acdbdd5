"""Fixtures for the mailer tests."""

from __future__ import annotations

import pytest

from mailer import backend
from tests.mailer.smtp_server import SMTPServer


@pytest.fixture
def smtp_server():
    """A real local SMTP server; the test process's email settings point at it."""
    with SMTPServer() as server:
        yield server


@pytest.fixture
def smtp_settings(settings, smtp_server):
    settings.EMAIL_BACKEND = "django.core.mail.backends.smtp.EmailBackend"
    settings.EMAIL_HOST = "127.0.0.1"
    settings.EMAIL_PORT = smtp_server.port
    settings.EMAIL_USE_TLS = False
    settings.EMAIL_USE_SSL = False
    settings.EMAIL_TIMEOUT = 5
    yield smtp_server
    backend.close_connection()


@pytest.fixture(autouse=True)
def _fresh_connection():
    """No test inherits the backend connection another test left open."""
    backend.close_connection()
    yield
    backend.close_connection()
