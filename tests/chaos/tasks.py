"""The chaos run's job, loaded into its workers with `-I tests.chaos.tasks`: `chaos.record` writes
every start and every end of its body to the recorder (what it writes: tests/chaos/keys.py). When
`jobs` writes the job's end (deletes its row), a trigger the harness puts on the job table records
it (tests/chaos/run.py)."""

from __future__ import annotations

import os
import time

import redis
from celery import shared_task

from jobs.base import JobTask
from tests.chaos.keys import DONE_KEY, RECORD_URL, RUNNING_KEY, TASK, ends_key, starts_key

_client: tuple[int, redis.Redis] | None = None


def recorder() -> redis.Redis:
    """This process's client of the recorder (a forked pool process makes its own)."""
    global _client
    if _client is None or _client[0] != os.getpid():
        client = redis.Redis.from_url(os.environ[RECORD_URL], socket_timeout=10, socket_connect_timeout=5)
        _client = (os.getpid(), client)
    return _client[1]


def _stamp() -> str:
    return f"{os.getpid()} {time.time():.6f}"


@shared_task(base=JobTask, name=TASK, bind=True)
def record(self, job: int, seconds: float) -> None:
    """Job number `job`: records its start, works `seconds`, records its end."""
    task_id = self.request.id
    client = recorder()
    pipe = client.pipeline(transaction=True)
    pipe.rpush(starts_key(task_id), _stamp())
    pipe.hset(RUNNING_KEY, str(os.getpid()), task_id)
    pipe.execute()
    time.sleep(seconds)
    pipe = client.pipeline(transaction=True)
    pipe.sadd(DONE_KEY, task_id)
    pipe.rpush(ends_key(task_id), _stamp())
    pipe.hdel(RUNNING_KEY, str(os.getpid()))
    pipe.execute()
