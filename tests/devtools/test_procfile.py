"""`make run`'s honcho waits for the workers' shutdown instead of killing them at 5 s."""

from __future__ import annotations

import pytest

from devtools import procfile


def test_honcho_waits_the_shutdown_timeout_and_a_margin():
    assert procfile.kill_wait({"CELERY_SHUTDOWN_TIMEOUT": "30"}) == 40
    assert procfile.kill_wait({}) == 40
    assert procfile.kill_wait({"CELERY_SHUTDOWN_TIMEOUT": "2.5"}) == 12.5
    assert procfile.kill_wait({"CELERY_SHUTDOWN_TIMEOUT": "soon"}) == 40


def test_main_gives_honcho_the_wait(monkeypatch):
    from honcho import manager

    monkeypatch.setattr(manager, "KILL_WAIT", 5)
    monkeypatch.setenv("CELERY_SHUTDOWN_TIMEOUT", "7")
    with pytest.raises(SystemExit):
        procfile.main(["--version"])
    assert manager.KILL_WAIT == 17
