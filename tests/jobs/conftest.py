"""Fixtures shared by the jobs tests."""

from __future__ import annotations

import pytest

from tests.conftest import reset_broker_pools


@pytest.fixture
def dead_broker(monkeypatch):
    """Points the Celery app at a port nothing listens on."""
    from jobs.localredis import free_port

    reset_broker_pools()
    monkeypatch.setenv("CELERY_BROKER_URL", f"redis://127.0.0.1:{free_port()}/0")
    yield
    monkeypatch.undo()
    reset_broker_pools()
