"""Tasks the benchmarks run: the same body on the project's JobTask and on a bare Celery Task."""

from __future__ import annotations

import os
import time

import redis
from celery import Task, shared_task

from jobs.base import JobTask

_client = None


def _redis():
    global _client
    if _client is None:
        _client = redis.Redis.from_url(os.environ["REDIS_URL"])
    return _client


def _body(key: str, sent_at: float | None) -> None:
    client = _redis()
    if sent_at is not None:
        client.rpush(f"{key}:latency", time.time() - sent_at)
    client.incr(key)


@shared_task(base=JobTask, name="bench.noop_job", ignore_result=True)
def noop_job(key: str, sent_at: float | None = None) -> None:
    _body(key, sent_at)


@shared_task(base=Task, name="bench.noop_bare", ignore_result=True)
def noop_bare(key: str, sent_at: float | None = None) -> None:
    _body(key, sent_at)
