"""`@task` functions (Django's Tasks API) that exist only for the integration tests; workers load
them with `-I tests.integration.django_tasks`."""

from __future__ import annotations

import os

import redis

from jobs.backends import task_options
from jobs.exceptions import PermanentError, TransientError
from jobs.limits import Limit, UniqueJob
from jobs.tasks_compat import task


def _redis() -> redis.Redis:
    return redis.Redis.from_url(os.environ["REDIS_URL"])


@task
def add(a: int, b: int) -> int:
    return a + b


@task(priority=10)
def pair(value: str) -> tuple[str, str]:
    return (value, value)


@task
@task_options(backoff_base=0.2, backoff_max=0.3)
def flaky(key: str, fail_times: int) -> int:
    """Fails with a transient error `fail_times` times, then returns the attempt number."""
    attempt = _redis().incr(key)
    if attempt <= fail_times:
        raise TransientError(f"attempt {attempt} failed")
    return attempt


@task
def refuse(key: str) -> str:
    """Fails for good, unless `key:healed` is set in Redis."""
    _redis().incr(key)
    if _redis().get(f"{key}:healed"):
        return "healed"
    raise PermanentError("cannot ever work")


@task(takes_context=True)
@task_options(backoff_base=0.2, backoff_max=0.3)
def context_attempts(context, key: str) -> dict:
    """Fails transiently on its first attempt; returns what its context said each time."""
    _redis().rpush(key, f"{context.attempt}:{context.task_result.id}")
    if context.attempt == 1:
        raise TransientError("first attempt")
    return {"attempt": context.attempt, "id": context.task_result.id}


@task
async def async_add(a: int, b: int) -> int:
    return a + b


@task
def not_json() -> object:
    return object()


@task
@task_options(
    unique=UniqueJob(key="report:{day}"),
    limits=[Limit("tests-report", concurrency=1, key="{region}")],
)
def day_report(day: str, region: str = "eu") -> str:
    """Unique per day; one at a time per region."""
    return f"{day}:{region}"


@task(takes_context=True)
@task_options(limits=[Limit("tests-tenant", concurrency=1, key="{tenant}")], unique=UniqueJob(key="sync:{tenant}"))
def tenant_sync(context, tenant: str) -> str:
    """Its keys name a parameter after the context the runner passes."""
    return tenant
