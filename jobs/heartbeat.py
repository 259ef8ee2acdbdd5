"""Liveness records: when a worker last ran the heartbeat task, when a beat last ticked.

Kept in the cache (Redis) for `/api/jobs/health/` and the metrics, and in small files for the
`manage.py probe` exec probes, which must work inside the container without the network.
"""

from __future__ import annotations

import json
import os
import socket
import time
from pathlib import Path
from typing import Any

from django.core.cache import cache

from jobs.conf import jobs_settings

KEY = "jobs:heartbeat:{}"
TTL = 24 * 3600


def heartbeat_write(name: str) -> dict[str, Any]:
    """Records that `name` (`worker` or `beat`) is alive now."""
    value = {"at": time.time(), "host": socket.gethostname(), "pid": os.getpid()}
    cache.set(KEY.format(name), value, timeout=TTL)
    return value


def heartbeat_read(name: str) -> dict[str, Any] | None:
    value: dict[str, Any] | None = cache.get(KEY.format(name))
    return value


def liveness_file(name: str) -> Path:
    return Path(jobs_settings.LIVENESS_DIR) / f"{name}.alive"


def liveness_touch(name: str, **details: Any) -> None:
    """Writes `{"at": ..., **details}` to the process's liveness file, atomically."""
    path = liveness_file(name)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(f".{os.getpid()}.tmp")
    tmp.write_text(json.dumps({"at": time.time(), "pid": os.getpid(), **details}))
    tmp.replace(path)


def liveness_age(name: str, path: Path | None = None) -> float | None:
    """Seconds since the liveness file was written; None when there is none."""
    path = path or liveness_file(name)
    try:
        data = json.loads(path.read_text())
        return max(time.time() - float(data["at"]), 0.0)
    except (OSError, ValueError, KeyError, TypeError):
        return None
