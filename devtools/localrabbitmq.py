"""A throw-away virtual host on the machine's RabbitMQ node, for tests and the kill-chaos run.

The node is shared (a system service, 127.0.0.1:5672, guest/guest): nothing here restarts it or
touches another vhost. "Restarted empty" deletes the vhost (every queue and message in it, every
connection to it closed) and makes it again.
"""

from __future__ import annotations

import contextlib
import shutil
import subprocess
import uuid
from collections.abc import Iterable

RABBITMQ_URL = "amqp://guest:guest@127.0.0.1:5672/"


class RabbitVhost:
    """A vhost of its own, `prefix` and a random suffix, with every permission for guest."""

    def __init__(self, prefix: str = "jobs-test", base_url: str = RABBITMQ_URL) -> None:
        self.name = f"{prefix}-{uuid.uuid4().hex[:8]}"
        self.base_url = base_url.rstrip("/") + "/"
        self.made = False

    @property
    def url(self) -> str:
        return self.base_url + self.name

    def _ctl(self, *args: str) -> None:
        done = subprocess.run(["rabbitmqctl", *args], capture_output=True, text=True, timeout=120, check=False)
        if done.returncode != 0:
            raise RuntimeError(f"rabbitmqctl {' '.join(args)}: {(done.stderr or done.stdout).strip()[:300]}")

    def start(self) -> RabbitVhost:
        self._ctl("add_vhost", self.name)
        self.made = True
        self._ctl("set_permissions", "-p", self.name, "guest", ".*", ".*", ".*")
        return self

    def stop(self) -> None:
        if self.made:
            self._ctl("delete_vhost", self.name)
            self.made = False

    def restart_empty(self) -> None:
        self.stop()
        self.start()

    def queued(self, queues: Iterable[str]) -> int:
        """Messages ready in `queues` (a passive declare each; a queue that does not exist: 0)."""
        from kombu import Connection

        total = 0
        with contextlib.suppress(Exception), Connection(self.url, connect_timeout=2) as conn:
            for queue in queues:
                channel = conn.channel()
                with contextlib.suppress(Exception):
                    total += int(channel.queue_declare(queue, passive=True)[1])
        return total


def rabbitmq_answers(url: str = RABBITMQ_URL) -> bool:
    """Whether the node answers at `url` and `rabbitmqctl` is here to make vhosts."""
    from kombu import Connection

    try:
        with Connection(url, connect_timeout=2) as conn:
            conn.ensure_connection(max_retries=0)
    except Exception:  # noqa: BLE001 - any reason: it does not answer
        return False
    return shutil.which("rabbitmqctl") is not None
