"""Tasks the benchmarks run: the same body on the project's JobTask and on a bare Celery Task.

The body is `bench.noop.record`, which the plain Celery baseline (bench/plain_app.py) runs too.
`noop_shipped` is declared the way an application's task is, with nothing but its name: every
default of the project applies (results, task events, time limits...). A test pins that it stays so
(tests/test_bench.py).
"""

from __future__ import annotations

from celery import Task, shared_task

from bench.noop import record
from jobs.base import JobTask


@shared_task(base=JobTask, name="bench.noop_shipped")
def noop_shipped(key: str, sent_at: float | None = None) -> None:
    record(key, sent_at)


@shared_task(base=JobTask, name="bench.noop_job", ignore_result=True)
def noop_job(key: str, sent_at: float | None = None) -> None:
    record(key, sent_at)


@shared_task(base=Task, name="bench.noop_bare", ignore_result=True)
def noop_bare(key: str, sent_at: float | None = None) -> None:
    record(key, sent_at)
