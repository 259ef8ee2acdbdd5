"""Tasks the benchmarks run: the same body on the project's JobTask and on a bare Celery Task.

The body is `bench.noop.record`, which the plain Celery baseline (bench/plain_app.py) runs too.
"""

from __future__ import annotations

from celery import Task, shared_task

from bench.noop import record
from jobs.base import JobTask


@shared_task(base=JobTask, name="bench.noop_job", ignore_result=True)
def noop_job(key: str, sent_at: float | None = None) -> None:
    record(key, sent_at)


@shared_task(base=Task, name="bench.noop_bare", ignore_result=True)
def noop_bare(key: str, sent_at: float | None = None) -> None:
    record(key, sent_at)
