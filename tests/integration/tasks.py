"""Tasks that exist only for the integration tests; workers load them with `-I`."""

from __future__ import annotations

import os
import signal
import time

import redis
from celery import shared_task

from jobs.base import JobTask
from jobs.exceptions import PermanentError, TransientError
from jobs.limits import Limit, UniqueJob


def _redis() -> redis.Redis:
    return redis.Redis.from_url(os.environ["REDIS_URL"])


@shared_task(base=JobTask, name="tests.flaky")
def flaky(key: str, fail_times: int) -> int:
    """Fails with a transient error `fail_times` times, then succeeds; notes each attempt's time."""
    client = _redis()
    client.rpush(f"{key}:times", repr(time.time()))
    attempt = client.incr(key)
    if attempt <= fail_times:
        raise TransientError(f"attempt {attempt} failed")
    return attempt


@shared_task(base=JobTask, name="tests.permanent")
def permanent(key: str, **kwargs) -> None:
    _redis().incr(key)
    if _redis().get(f"{key}:healed"):
        return
    raise PermanentError("cannot ever work")


@shared_task(base=JobTask, name="tests.unexpected")
def unexpected(key: str) -> None:
    _redis().incr(key)
    raise KeyError("a bug")


@shared_task(base=JobTask, name="tests.crash")
def crash(key: str) -> None:
    """Kills the pool process running it, like a segfault or the OOM killer would."""
    _redis().incr(key)
    os.kill(os.getpid(), signal.SIGKILL)


@shared_task(base=JobTask, name="tests.slow")
def slow(key: str, seconds: float) -> None:
    _redis().incr(key)
    time.sleep(seconds)


@shared_task(base=JobTask, name="tests.parent")
def parent(key: str) -> str:
    """Logs, then starts a child task: both log lines must carry the request id."""
    import logging

    logging.getLogger("tests.tasks").info("tests.parent_ran", extra={"key": key})
    print(f"tests.parent printed {key}")  # noqa: T201 - a stray print must still come out as JSON
    return child.delay(key).id


@shared_task(base=JobTask, name="tests.child")
def child(key: str) -> None:
    import logging

    logging.getLogger("tests.tasks").info("tests.child_ran", extra={"key": key})
    _redis().set(f"{key}:child", 1)


@shared_task(base=JobTask, name="tests.stubborn")
def stubborn(key: str, seconds: float) -> None:
    """Ignores its soft time limit, so only the hard one can stop it."""
    from celery.exceptions import SoftTimeLimitExceeded

    _redis().incr(key)
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        try:
            time.sleep(0.05)
        except SoftTimeLimitExceeded:
            _redis().set(f"{key}:soft", 1)


@shared_task(base=JobTask, name="tests.slow_mark")
def slow_mark(key: str, n: int, seconds: float) -> None:
    """Notes its start, works for `seconds`, then notes its completion."""
    client = _redis()
    client.sadd(f"{key}:started", n)
    time.sleep(seconds)
    client.sadd(f"{key}:done", n)
    client.incr(f"{key}:completions")


@shared_task(base=JobTask, name="tests.record_order")
def record_order(key: str, label: str) -> None:
    """Appends `label` to the list `key`: the order in which a worker ran tasks."""
    _redis().rpush(key, label)


@shared_task(base=JobTask, name="tests.generate_dies_midway")
def generate_dies_midway(key: str, image_id: int) -> None:
    """`thumbnails.generate`, except that its first attempt leaves half a thumbnail file behind
    and kills its process, as an OOM kill or a power cut would."""
    from django.core.files.base import ContentFile
    from django.core.files.storage import default_storage

    from thumbnails import services
    from thumbnails.models import Image

    if _redis().incr(f"{key}:attempt") == 1:
        real_write, calls = services._write, []

        def write_half_then_die(name: str, data: bytes) -> str:
            calls.append(name)
            if len(calls) == 2:
                default_storage.save(name, ContentFile(data[: len(data) // 2]))
                os._exit(9)
            return real_write(name, data)

        services._write = write_half_then_die
    services.thumbnails_generate(image=Image.objects.get(pk=image_id))


@shared_task(base=JobTask, name="tests.count_start")
def count_start(key: str, seconds: float = 0.0) -> None:
    """Counts each start of its body (and, after `seconds`, each end)."""
    client = _redis()
    client.rpush(f"{key}:starts", os.getpid())
    time.sleep(seconds)
    client.incr(f"{key}:ends")


def _plain_base():
    from celery import Task

    return Task


@shared_task(base=_plain_base(), name="tests.plain_count_start")
def plain_count_start(key: str, seconds: float = 0.0) -> None:
    """A plain Celery task (not a JobTask): counts each start of its body."""
    client = _redis()
    client.rpush(f"{key}:starts", os.getpid())
    time.sleep(seconds)
    client.incr(f"{key}:ends")


@shared_task(base=_plain_base(), name="tests.plain_swallows_soft_limit", time_limit=3, soft_time_limit=1)
def plain_swallows_soft_limit(key: str) -> None:
    """A plain task that swallows its soft time limit in a broad `except`: only the hard limit
    stops it (and acks it without `task_postrun`)."""
    client = _redis()
    client.rpush(f"{key}:starts", os.getpid())
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        try:
            time.sleep(0.05)
        except Exception:  # noqa: BLE001, S112 - the bug being reproduced: a broad except
            continue


@shared_task(base=JobTask, bind=True, name="tests.replaced_by_count_start")
def replaced_by_count_start(self, key: str) -> None:
    """Replaces itself with `count_start` (Celery's `Task.replace`: the same task id goes on)."""
    _redis().incr(f"{key}:replacing")
    raise self.replace(count_start.s(key))


@shared_task(base=JobTask, name="tests.rejects")
def rejects(key: str) -> None:
    """Drops its own message: `Reject(requeue=False)`."""
    from celery.exceptions import Reject

    _redis().rpush(f"{key}:starts", os.getpid())
    raise Reject("not for this worker", requeue=False)


def _event(key: str, *parts: object) -> None:
    _redis().rpush(f"{key}:events", "|".join(str(part) for part in (*parts, time.time())))


@shared_task(
    base=JobTask,
    name="tests.limited_sync",
    limits=[Limit("tests-sync", concurrency=2, key="{customer}")],
)
def limited_sync(key: str, customer: str, seconds: float) -> None:
    """At most 2 at once per customer: records when each run starts and ends."""
    run = os.urandom(4).hex()
    _event(key, "start", customer, run)
    time.sleep(seconds)
    _event(key, "end", customer, run)


@shared_task(
    base=JobTask,
    name="tests.limited_solo",
    limits=[Limit("tests-solo", concurrency=1, key="{customer}")],
)
def limited_solo(key: str, customer: str, seconds: float, label: str = "") -> None:
    """One at a time per customer; `label` names the run in what it records."""
    run = f"{label}-{os.urandom(4).hex()}"
    _event(key, "start", customer, run)
    time.sleep(seconds)
    _event(key, "end", customer, run)


@shared_task(
    base=JobTask,
    bind=True,
    name="tests.limited_rate",
    limits=[Limit("tests-rate", rate=10, per=1.0, key="{provider}")],
)
def limited_rate(self, key: str, provider: str) -> None:
    """At most 10 starts a second per provider: records its start as the job table has it."""
    from jobs.models import OutboxMessage

    started = OutboxMessage.objects.filter(task_id=self.request.id).values_list("started_at", flat=True).first()
    _redis().rpush(f"{key}:starts:{provider}", started.timestamp())


@shared_task(base=JobTask, name="tests.unique_invoice", unique=UniqueJob(key="invoice:{order_id}"))
def unique_invoice(order_id: int, copy: bool = False) -> None:
    """One unfinished job per order."""


@shared_task(base=JobTask, bind=True, name="tests.record_run")
def record_run(self, path: str, label: str, seconds: float) -> None:
    """Appends `start` and, after `seconds`, `end` lines for this run to a file: a record that
    no network fault (a host cut from Redis and the database) can stop from being written."""
    host = os.environ.get("CLUSTER_HOST", "")
    with open(path, "a") as out:
        out.write(f"start {label} {host} {self.request.id} {time.time()}\n")
    time.sleep(seconds)
    with open(path, "a") as out:
        out.write(f"end {label} {host} {self.request.id} {time.time()}\n")


@shared_task(base=JobTask, bind=True, name="tests.record_tick")
def record_tick(self, path: str) -> None:
    """A periodic run: appends the beat tick that sent it (`meta.due_at`, written by beat)."""
    due = (getattr(self.request, "meta", None) or {}).get("due_at", "")
    with open(path, "a") as out:
        out.write(f"tick {due} {os.environ.get('CLUSTER_HOST', '')} {self.request.id} {time.time()}\n")
