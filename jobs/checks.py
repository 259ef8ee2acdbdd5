"""System checks (`manage.py check`) for settings combinations that lose or repeat work."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from django.apps import AppConfig
from django.conf import settings
from django.core.checks import CheckMessage, Error, Warning, register

from jobs.conf import jobs_settings
from jobs.retries import JITTER


def _longest_delay(base: float, cap: float, retries: int) -> float:
    """The longest delay a task's retries can reach: the cap alone says nothing when the
    retries stop before the doubling gets there."""
    return min(base * 2 ** max(retries - 1, 0), max(cap, base)) * (1 + JITTER) if retries > 0 else 0.0


def project_retry_ceiling(visibility: float) -> float:
    """The longest a retry may wait on Redis with the project's time limit (`JobTask.retry_ceiling`)."""
    margin = max(visibility * 0.1, 60.0)
    return max(visibility - jobs_settings.task_time_limit - margin, 1.0)


def _retry_delay_warnings(visibility: float) -> list[CheckMessage]:
    """jobs.W001 for the project-wide policy and for each task that overrides it."""
    base, cap = jobs_settings.TASK_RETRY_BACKOFF_BASE, jobs_settings.TASK_RETRY_BACKOFF_MAX
    retries = jobs_settings.TASK_MAX_RETRIES
    hint = (
        "Redis redelivers a retry held longer than the visibility timeout, so it would run twice. A held "
        "retry must also run to its time limit, after waiting for a free pool process, before the timeout: "
        "retry delays are clipped to CELERY_VISIBILITY_TIMEOUT minus CELERY_TASK_TIME_LIMIT minus a margin "
        "(10 %, at least 60 s). Lower the cap or raise the timeout."
    )
    problems: list[CheckMessage] = []
    longest = _longest_delay(base, cap, retries)
    ceiling = project_retry_ceiling(visibility)
    if longest >= ceiling:
        problems.append(
            Warning(
                f"The longest retry delay ({longest:g} s with TASK_RETRY_BACKOFF_BASE={base:g}, "
                f"TASK_RETRY_BACKOFF_MAX={cap:g}, TASK_MAX_RETRIES={retries}) is not below the longest a "
                f"retry may wait ({ceiling:g} s, from a visibility timeout of {visibility:g} s).",
                hint=hint,
                id="jobs.W001",
            )
        )
    from celery import current_app as app

    from jobs.runtime.task import JobTask

    for name, task in sorted(app.tasks.items()):
        if not isinstance(task, JobTask) or (task.retry_limit, task.backoff_base, task.backoff_max) == (None,) * 3:
            continue
        own = _longest_delay(*task.backoff_policy(), task.retries_allowed())
        own_ceiling = task.retry_ceiling() or ceiling
        if own >= own_ceiling and longest < ceiling:
            problems.append(
                Warning(
                    f"Task {name}: its longest retry delay ({own:g} s, from its own retry_limit, backoff_base "
                    f"or backoff_max) is not below the longest a retry may wait ({own_ceiling:g} s).",
                    hint=hint,
                    id="jobs.W001",
                )
            )
    return problems


def _task_time_limit_warnings(*, redis: bool, visibility: float) -> list[CheckMessage]:
    """jobs.W002 for each task whose own time limit the visibility timeout cannot cover, and
    jobs.W014 for a pool that enforces no time limit at all while some limit is set."""
    from celery import current_app as app

    problems: list[CheckMessage] = []
    limited: list[str] = [] if not jobs_settings.task_time_limit else ["CELERY_TASK_TIME_LIMIT"]
    for name, task in sorted(app.tasks.items()):
        own = max(float(getattr(task, "time_limit", None) or 0), float(getattr(task, "soft_time_limit", None) or 0))
        if not own or name.startswith("celery."):
            continue
        limited.append(name)
        if redis and own >= visibility:
            problems.append(
                Warning(
                    f"Task {name}: its time limit ({own:g} s) is not below the visibility timeout "
                    f"({visibility:g} s, CELERY_BROKER_TRANSPORT_OPTIONS).",
                    hint="Redis delivers a task still running after the visibility timeout to a second worker. "
                    "A job of the job table (enqueue(), Django tasks) is protected by its start lease and the copy "
                    "does nothing; a task sent with .delay() runs twice. Raise the timeout or lower the limit.",
                    id="jobs.W002",
                )
            )
    pool = str(jobs_settings.celery("WORKER_POOL") or "prefork")
    kind = pool.rsplit(":", 1)[-1].rsplit(".", 1)[-1].lower()
    if limited and kind in {"threads", "threadpool", "gevent", "eventlet"}:
        problems.append(
            Warning(
                f"CELERY_WORKER_POOL is {pool}, which enforces no time limit, but time limits are set "
                f"({', '.join(limited[:5])}{', ...' if len(limited) > 5 else ''}).",
                hint="A task that hangs holds its job for ever there (its lease is renewed while its process "
                "lives). Use the prefork pool where a limit matters, or bound the work inside the task.",
                id="jobs.W014",
            )
        )
    return problems


@register("jobs")
def check_task_settings(app_configs: Sequence[AppConfig] | None = None, **kwargs: Any) -> list[CheckMessage]:
    problems: list[CheckMessage] = []
    redis = jobs_settings.broker_is_redis
    visibility = jobs_settings.visibility_timeout
    if redis:
        problems.extend(_retry_delay_warnings(visibility))
    if redis and jobs_settings.task_time_limit and visibility <= jobs_settings.task_time_limit:
        problems.append(
            Warning(
                f"CELERY_TASK_TIME_LIMIT ({jobs_settings.task_time_limit:g} s) is not below "
                f"the visibility timeout ({visibility:g} s, CELERY_BROKER_TRANSPORT_OPTIONS).",
                hint="A task still running when the visibility timeout passes is delivered to a second worker.",
                id="jobs.W002",
            )
        )
    problems.extend(_task_time_limit_warnings(redis=redis, visibility=visibility))
    soft, hard = jobs_settings.celery("TASK_SOFT_TIME_LIMIT"), jobs_settings.celery("TASK_TIME_LIMIT")
    if soft and hard and soft >= hard:
        problems.append(
            Warning(
                f"CELERY_TASK_SOFT_TIME_LIMIT ({soft} s) is not below CELERY_TASK_TIME_LIMIT ({hard} s).",
                hint="The prefork pool arms the soft limit first and the hard one only after it, so a task "
                "would run until the soft limit and be killed at the same moment, without time to clean up.",
                id="jobs.W006",
            )
        )
    soft_shutdown = jobs_settings.celery("WORKER_SOFT_SHUTDOWN_TIMEOUT")  # None: jobs gives JOBS_SHUTDOWN_TIMEOUT
    if float(jobs_settings.SHUTDOWN_TIMEOUT if soft_shutdown is None else soft_shutdown or 0) <= 0:
        problems.append(
            Warning(
                "Celery's soft shutdown is off (CELERY_WORKER_SOFT_SHUTDOWN_TIMEOUT or JOBS_SHUTDOWN_TIMEOUT is 0).",
                hint="On SIGTERM running tasks are then cut at once instead of being given time to finish.",
                id="jobs.W003",
            )
        )
    if jobs_settings.WORKER_LOST_LIMIT < 1:
        problems.append(
            Warning(
                "Jobs are acknowledged late but crash-loop quarantine is off (JOBS_WORKER_LOST_LIMIT < 1).",
                hint="A task that kills its worker would be redelivered forever. Set JOBS_WORKER_LOST_LIMIT, e.g. 3.",
                id="jobs.W004",
            )
        )
    unsafe = set(jobs_settings.celery("ACCEPT_CONTENT", ["json"])) - {"json", "application/json"}
    if unsafe:
        problems.append(
            Error(
                f"CELERY_ACCEPT_CONTENT allows {', '.join(sorted(unsafe))}.",
                hint="Only JSON is accepted: pickle and friends run code from the message.",
                id="jobs.E001",
            )
        )
    return problems


@register("jobs")
def check_cleanup_roots(app_configs: Sequence[AppConfig] | None = None, **kwargs: Any) -> list[CheckMessage]:
    """jobs.E002: the hourly temp-file cleanup deletes old files under JOBS_TEMP_ROOT and
    FILE_UPLOAD_TEMP_DIR, so neither may be a filesystem root or hold the project or its data."""
    from pathlib import Path

    from jobs.cleanup import cleanup_root_danger

    problems: list[CheckMessage] = []
    seen: set[Path] = set()
    for setting, root in (
        ("JOBS_TEMP_ROOT", jobs_settings.TEMP_ROOT),
        ("FILE_UPLOAD_TEMP_DIR", settings.FILE_UPLOAD_TEMP_DIR),
    ):
        if not root or Path(root).resolve() in seen:
            continue
        seen.add(Path(root).resolve())
        problem = cleanup_root_danger(root)
        if problem:
            problems.append(
                Error(
                    f"{setting} ({root}) is not safe to clean: {problem}.",
                    hint="The hourly clean-up deletes every file older than JOBS_CLEANUP_MAX_AGE_HOURS (the site: "
                    "CLEANUP_MAX_AGE_HOURS) below it "
                    "(it refuses to run there). Give temporary files a directory of their own.",
                    id="jobs.E002",
                )
            )
    return problems


@register("jobs")
def check_limits(app_configs: Sequence[AppConfig] | None = None, **kwargs: Any) -> list[CheckMessage]:
    """jobs.E003: a task's limits or unique option declared wrongly, or two tasks naming the
    same limit with other numbers (a limit named alike is one limit, shared)."""
    from celery import current_app as app

    from jobs.limits import LimitError, task_limits, task_unique

    problems: list[CheckMessage] = []
    seen: dict[str, tuple[str, tuple[str, int, float]]] = {}
    for name, task in sorted(app.tasks.items()):
        try:
            limits = task_limits(task)
            task_unique(task)
        except LimitError as exc:
            problems.append(Error(f"Task {name}: {exc}", id="jobs.E003"))
            continue
        for limit in limits:
            shape = (limit.kind, limit.number, float(limit.per))
            first = seen.setdefault(limit.name, (name, shape))
            if first[1] != shape:
                problems.append(
                    Error(
                        f"Tasks {first[0]} and {name} declare the limit {limit.name!r} differently "
                        f"({first[1][0]} {first[1][1]} per {first[1][2]:g} s, and {shape[0]} {shape[1]} "
                        f"per {shape[2]:g} s).",
                        hint="Limits of the same name are one limit, shared by every task naming it: declare it "
                        "once (a module-level Limit) and use it in each, or give each its own name.",
                        id="jobs.E003",
                    )
                )
    return problems


@register("jobs", deploy=True)
def check_fleet_settings(app_configs: Sequence[AppConfig] | None = None, **kwargs: Any) -> list[CheckMessage]:
    """jobs.W020: a setting that must agree across hosts has other values in the workers and
    beats running now (their records in Redis, `jobs.fleet`) than here or among themselves.
    A deployment check (`manage.py check --deploy`): every other command, the probes included,
    runs the checks too and must not wait on Redis. Silent when Redis does not answer within a
    second: a check must not hang or fail for it."""
    import redis

    from jobs.fleet import fleet_contradictions, fleet_read, fleet_settings
    from jobs.redis_client import redis_client

    try:
        records = fleet_read(redis_client(timeout=1))
    except (redis.RedisError, OSError, RuntimeError, ValueError):
        return []
    warnings: list[CheckMessage] = []
    for name, by_value in sorted(fleet_contradictions(records, fleet_settings()).items()):
        held = "; ".join(
            f"{value} on {', '.join(who[:3])}{' and more' if len(who) > 3 else ''}" for value, who in by_value.items()
        )
        warnings.append(
            Warning(
                f"{name} differs across the processes running now: {held}.",
                hint="Give web, workers and beat the same value (one environment for every process type): "
                "Redis hands a running task to another worker after the shortest visibility timeout any "
                "consumer has, and each sweeper and beat judges leases and locks by its own numbers.",
                id="jobs.W020",
            )
        )
    return warnings
