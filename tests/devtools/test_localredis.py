"""The throw-away Redis used by `make run` and the tests."""

from __future__ import annotations

import sys

import pytest

from devtools import localredis


def test_local_redis_starts_answers_and_stops():
    with localredis.LocalRedis() as server:
        assert localredis.answers(server.url)
        process = server.process
    assert process.poll() is not None
    assert not localredis.answers(server.url, timeout=0.2)


def test_answers_is_false_for_nothing_and_nonsense():
    assert localredis.answers(f"redis://127.0.0.1:{localredis.free_port()}/0", timeout=0.2) is False
    assert localredis.answers("not a url") is False


def test_start_fails_clearly_when_the_port_is_taken(redis_server):
    with pytest.raises(RuntimeError, match="redis-server"):
        localredis.LocalRedis(port=redis_server.port).start(timeout=3)


def _print_url():
    return ["--", sys.executable, "-c", "import os; print('URL=' + os.environ['REDIS_URL'])"]


def test_main_uses_the_configured_redis_when_it_answers(monkeypatch, capfd, redis_server):
    monkeypatch.setenv("REDIS_URL", redis_server.url)
    assert localredis.main(_print_url()) == 0
    out = capfd.readouterr().out
    assert f"URL={redis_server.url}" in out
    assert "using the Redis at REDIS_URL" in out


def test_main_starts_a_local_redis_when_none_answers(monkeypatch, capfd):
    monkeypatch.setenv("REDIS_URL", f"redis://127.0.0.1:{localredis.free_port()}/0")
    assert localredis.main(_print_url()) == 0
    out = capfd.readouterr().out
    assert "localredis: started" in out
    assert "localredis: stopped" in out
    started_url = next(line for line in out.splitlines() if line.startswith("URL=")).removeprefix("URL=")
    assert not localredis.answers(started_url, timeout=0.2)


def test_main_passes_the_exit_code_through(monkeypatch, redis_server):
    monkeypatch.setenv("REDIS_URL", redis_server.url)
    assert localredis.main(["--", sys.executable, "-c", "raise SystemExit(3)"]) == 3
