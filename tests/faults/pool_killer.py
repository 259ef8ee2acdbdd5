"""Loaded into a worker with `-I tests.faults.pool_killer`: a poison task for the fault suite.

Every delivery of `thumbnails.generate` for an image whose id is in the Redis set `POISON_KEY`
(on the worker's own REDIS_URL) kills the pool process that received it, with SIGKILL, before the
task body runs: a segfault in a C extension or the kernel's OOM killer, for real. Nothing else
changes in the worker.
"""

from __future__ import annotations

import os
import signal

import redis
from celery.signals import task_prerun

POISON_KEY = "faults:poison:thumbnails.generate"
POISON_LOG_KEY = "faults:poison:kills"


@task_prerun.connect
def _kill_on_poison(sender=None, task_id=None, task=None, args=None, kwargs=None, **_extra) -> None:
    if getattr(task, "name", None) != "thumbnails.generate":
        return
    image_id = (args or [None])[0] if args else (kwargs or {}).get("image_id")
    client = redis.Redis.from_url(os.environ["REDIS_URL"], socket_timeout=2, socket_connect_timeout=2)
    if client.sismember(POISON_KEY, str(image_id)):
        client.rpush(POISON_LOG_KEY, f"{task_id} pid={os.getpid()}")
        os.kill(os.getpid(), signal.SIGKILL)
