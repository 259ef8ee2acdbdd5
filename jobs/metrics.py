"""Prometheus metrics.

Worker metrics are counted in the worker's main process (from the request objects the prefork
pool reports back to it), so they are correct whatever the pool size without prometheus_client's
multiprocess mode, and served on `JOBS_WORKER_METRICS_PORT` by that process. The web's `/metrics`
adds, computed at scrape time, queue lengths, dead letters by status and heartbeat ages.
"""

from __future__ import annotations

from collections.abc import Iterator

from prometheus_client import Counter, Gauge, Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric

from jobs.logging import get_logger

logger = get_logger(__name__)

TASKS = Counter(
    "celery_tasks",
    "Tasks by name and state (received, started, succeeded, failed, retried, dead_lettered).",
    ["task", "state"],
)
RUNTIME = Histogram(
    "celery_task_runtime_seconds",
    "Runtime of tasks that succeeded.",
    ["task"],
    buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600),
)
IN_PROGRESS = Gauge("celery_tasks_in_progress", "Tasks running now in this worker.", ["task"])

LEDGER_REPUBLISHED = Counter(
    "jobs_ledger_republished",
    "Jobs the sweeper published again because the broker no longer held their message, by task.",
    ["task"],
)


COPIES_SKIPPED = Counter(
    "jobs_copies_skipped",
    "Messages of a job that did not start its body: the job had ended, a live run held it, or it was "
    "a message of an earlier attempt (by task and reason).",
    ["task", "reason"],
)


def copy_skipped(*, task_name: str, reason: str) -> None:
    COPIES_SKIPPED.labels(task=task_name, reason=reason).inc()


def ledger_republished(*, task_name: str) -> None:
    LEDGER_REPUBLISHED.labels(task=task_name).inc()


def task_event(task: str, state: str) -> None:
    TASKS.labels(task=task, state=state).inc()


def start_worker_metrics_server(port: int, addr: str = "127.0.0.1") -> bool:
    """Serves this process's metrics on `addr:port` (port 0: off). A port it cannot listen on is
    logged with the reason, not fatal."""
    if not port:
        return False
    import errno

    from prometheus_client import start_http_server

    try:
        start_http_server(port, addr=addr)
    except OSError as exc:
        if exc.errno == errno.EADDRINUSE:
            reason = (
                f"port {port} is taken on {addr} (another worker on this host?): give each worker "
                "its own WORKER_METRICS_PORT, or 0 to turn it off"
            )
        else:
            reason = f"cannot listen on {addr}:{port}: {exc}"
        logger.warning("metrics.server_not_started", extra={"port": port, "addr": addr, "reason": reason})
        return False
    logger.info("metrics.server_started", extra={"port": port, "addr": addr})
    return True


class JobsCollector:
    """Scrape-time gauges for the web's /metrics: cheap reads of the broker, database and cache."""

    def describe(self) -> list[Metric]:
        return []  # computed at scrape time: nothing to read at registration

    def collect(self) -> Iterator[Metric]:
        from jobs.selectors import dead_letter_counts, dead_letter_oldest_pending_age, queue_lengths

        queues = GaugeMetricFamily("celery_queue_length", "Messages waiting in each queue.", labels=["queue"])
        try:
            for name, length in queue_lengths().items():
                queues.add_metric([name], length)
        except Exception as exc:  # noqa: BLE001 - a scrape must not fail because the broker is down
            logger.warning("metrics.queue_length_failed", extra={"error": f"{type(exc).__name__}: {exc}"[:200]})
        yield queues

        dead = GaugeMetricFamily("jobs_dead_letters", "Dead letters by status.", labels=["status"])
        oldest = GaugeMetricFamily(
            "jobs_dead_letter_oldest_pending_age_seconds", "Age of the oldest pending dead letter (0: none)."
        )
        try:
            for status, count in dead_letter_counts().items():
                dead.add_metric([status], count)
            oldest.add_metric([], dead_letter_oldest_pending_age())
        except Exception as exc:  # noqa: BLE001
            logger.warning("metrics.dead_letters_failed", extra={"error": f"{type(exc).__name__}: {exc}"[:200]})
        yield dead
        yield oldest

        # Counted from the rows, not in the process that wrote them: dead letters are written in
        # pool processes, which serve no metrics. A purge lowers it (a counter reset to Prometheus).
        created = CounterMetricFamily(
            "jobs_dead_letters_created",
            "Failures kept as dead letters (a requeued job failing again counts again), by task and reason.",
            labels=["task", "reason"],
        )
        try:
            from jobs.selectors import dead_letter_failures

            for (task, reason), count in dead_letter_failures().items():
                created.add_metric([task, reason], count)
        except Exception as exc:  # noqa: BLE001
            logger.warning("metrics.dead_letters_failed", extra={"error": f"{type(exc).__name__}: {exc}"[:200]})
        yield created

        ledger = GaugeMetricFamily("jobs_ledger_jobs", "Unfinished jobs in the ledger by state.", labels=["state"])
        ledger_oldest = GaugeMetricFamily(
            "jobs_ledger_oldest_unfinished_age_seconds", "Age of the oldest job accepted and not finished (0: none)."
        )
        try:
            from jobs.runtime.ledger import ledger_counts, ledger_oldest_age

            for state, count in ledger_counts().items():
                ledger.add_metric([state], count)
            ledger_oldest.add_metric([], ledger_oldest_age())
        except Exception as exc:  # noqa: BLE001
            logger.warning("metrics.ledger_failed", extra={"error": f"{type(exc).__name__}: {exc}"[:200]})
        yield ledger
        yield ledger_oldest

        # Per limit name only (keys are unbounded: a customer, a tenant).
        running = GaugeMetricFamily(
            "jobs_limit_running", "Runs holding a slot of a concurrency limit, all keys.", labels=["limit"]
        )
        recent = GaugeMetricFamily(
            "jobs_limit_recent_starts", "Starts under a rate limit in the last minute, all keys.", labels=["limit"]
        )
        throttled = GaugeMetricFamily("jobs_limit_throttled", "Jobs waiting for a limit.", labels=["limit"])
        try:
            from jobs.selectors import limit_use

            for use in limit_use():
                if use.kind == "concurrency":
                    running.add_metric([use.name], use.running)
                else:
                    recent.add_metric([use.name], use.recent)
                throttled.add_metric([use.name], use.throttled)
        except Exception as exc:  # noqa: BLE001
            logger.warning("metrics.limits_failed", extra={"error": f"{type(exc).__name__}: {exc}"[:200]})
        yield running
        yield recent
        yield throttled

        from jobs.heartbeat import heartbeat_read

        for name, help_text in (
            ("worker", "When a worker last ran the heartbeat task (unix time)."),
            ("beat", "When a beat last ticked (unix time)."),
        ):
            gauge = GaugeMetricFamily(f"jobs_{name}_last_heartbeat_timestamp_seconds", help_text)
            try:
                seen = heartbeat_read(name)
            except Exception:  # noqa: BLE001
                seen = None
            if seen:
                gauge.add_metric([], seen["at"])
            yield gauge


_registered = False


def register_web_collector() -> None:
    """Adds `JobsCollector` to the default registry once (web processes only)."""
    global _registered
    if _registered:
        return
    from prometheus_client import REGISTRY

    REGISTRY.register(JobsCollector())
    _registered = True
