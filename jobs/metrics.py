"""Prometheus metrics of the jobs machinery."""

from __future__ import annotations

from prometheus_client import Counter

DEAD_LETTERS_CREATED = Counter(
    "jobs_dead_letters_created",
    "Dead letters written (a requeued job failing again counts again), by task and reason.",
    ["task", "reason"],
)


def dead_letter_created(*, task_name: str, reason: str) -> None:
    DEAD_LETTERS_CREATED.labels(task=task_name, reason=reason).inc()
