"""Worker-side classes: the request wrapper and the consumer the project installs."""

from __future__ import annotations

import base64
import logging
from typing import Any

from celery import bootsteps
from celery.worker.consumer import Consumer
from celery.worker.request import Request

from jobs import metrics
from jobs.heartbeat import liveness_touch

logger = logging.getLogger(__name__)


class JobRequest(Request):
    """The worker main process's view of one task message.

    Counts the task's metrics here, where the prefork pool reports every outcome, and runs
    `on_timeout` with the task's own request context pushed, so a hard time limit (handled in
    the main process) still dead-letters with queue, headers and request id."""

    _running = False

    def on_accepted(self, pid: int, time_accepted: float) -> None:
        self._running = True
        metrics.task_event(self.name, "started")
        metrics.IN_PROGRESS.labels(task=self.name).inc()
        super().on_accepted(pid, time_accepted)

    def _finished(self) -> None:
        if self._running:
            self._running = False
            metrics.IN_PROGRESS.labels(task=self.name).dec()

    def send_event(self, type_: str, **fields: Any) -> None:
        if type_ == "task-succeeded":
            self._finished()
            metrics.task_event(self.name, "succeeded")
            if fields.get("runtime") is not None:
                metrics.RUNTIME.labels(task=self.name).observe(fields["runtime"])
        elif type_ == "task-failed":
            self._finished()
            metrics.task_event(self.name, "failed")
            if getattr(self.task, "alert_on_dead_letter", None) is not None:  # a JobTask: it was dead-lettered
                metrics.task_event(self.name, "dead_lettered")
        elif type_ == "task-retried":
            self._finished()
            metrics.task_event(self.name, "retried")
        super().send_event(type_, **fields)

    def on_failure(self, exc_info: Any, send_failed_event: bool = True, return_ok: bool = False) -> None:
        try:
            super().on_failure(exc_info, send_failed_event=send_failed_event, return_ok=return_ok)
        finally:
            self._finished()  # also when the task was given back (worker lost, shutdown)

    def on_timeout(self, soft: bool, timeout: float) -> None:
        if soft:
            return super().on_timeout(soft, timeout)
        self.task.request_stack.push(self._context)
        try:
            return super().on_timeout(soft, timeout)
        finally:
            self.task.request_stack.pop()


def _message_summary(message: Any) -> tuple[dict, str]:
    headers = dict(getattr(message, "headers", None) or {})
    body = getattr(message, "body", b"") or b""
    if isinstance(body, str):
        body = body.encode(errors="replace")
    try:
        text = body[:4000].decode()
    except UnicodeDecodeError:
        text = "base64:" + base64.b64encode(body[:3000]).decode()
    return headers, text


class JobConsumer(Consumer):
    """Celery's consumer, plus a dead letter for every message it has to throw away
    (undecodable, disallowed content type such as pickle, unknown or invalid task)."""

    def _dead_letter(self, message: Any, exc: BaseException | None, what: str) -> None:
        from jobs.services import dead_letter_record

        headers, text = _message_summary(message)
        delivery = getattr(message, "delivery_info", None) or {}
        try:
            dead_letter_record(
                task_name=str(headers.get("task") or "<unknown>")[:200],
                task_id=str(headers.get("id") or "")[:64],
                queue=str(delivery.get("routing_key") or ""),
                args=[],
                kwargs={},
                exc_type=type(exc).__name__ if exc else what,
                exc_message=f"{what}: {exc}"[:2000] if exc else what,
                traceback="",
                retries=0,
                reason="undecodable",
                request_id=str(headers.get("request_id") or "")[:128],
                worker=str(self.hostname or ""),
                raw_message=f"content-type={getattr(message, 'content_type', '')} body={text}",
            )
        except Exception:
            logger.exception("dead_letter.consumer_record_failed")

    def on_decode_error(self, message: Any, exc: BaseException) -> None:
        self._dead_letter(message, exc, "message could not be decoded")
        super().on_decode_error(message, exc)

    def on_unknown_task(self, body: Any, message: Any, exc: BaseException) -> None:
        self._dead_letter(message, exc, "unknown task")
        super().on_unknown_task(body, message, exc)

    def on_invalid_task(self, body: Any, message: Any, exc: BaseException) -> None:
        self._dead_letter(message, exc, "invalid task message")
        super().on_invalid_task(body, message, exc)


class ZeroIsNoLimitStep(bootsteps.Step):
    """`CELERY_WORKER_MAX_TASKS_PER_CHILD=0` (or `..._MAX_MEMORY_PER_CHILD=0`) means no limit.

    The settings turn 0 into None, but the `celery` command also reads `CELERY_WORKER_*`
    variables as its own options (click's `auto_envvar_prefix`), and those win over settings:
    billiard would then refuse 0 and the worker die at start. Every step of the blueprint is
    constructed before any builds its part, so this runs before the pool is created."""

    def __init__(self, parent: Any, **kwargs: Any) -> None:
        super().__init__(parent, **kwargs)
        for name in ("max_tasks_per_child", "max_memory_per_child"):
            if not getattr(parent, name, None):
                setattr(parent, name, None)


class ShutdownLogStep(bootsteps.StartStopStep):
    """Logs `worker.stopping` as a shutdown begins, warm or cold (Celery's own notice is printed
    from its signal handler, and its `worker_shutdown` signal is not sent on a cold shutdown)."""

    label = "Shutdown log"

    def close(self, worker) -> None:
        logger.info("worker.stopping", extra={"hostname": worker.hostname})


class LivenessStep(bootsteps.StartStopStep):
    """Refreshes the worker's liveness file from the consumer's own event loop, and only while
    the consumer is connected and consuming queues: a worker process that lives on but no longer
    consumes (a stuck reconnect, every queue cancelled) lets the file go stale, and
    `manage.py probe worker` fails."""

    requires = ("celery.worker.consumer.tasks:Tasks",)

    def __init__(self, parent: Any, **kwargs: Any) -> None:
        super().__init__(parent, **kwargs)
        self.tref = None

    def start(self, parent: Any) -> None:
        self.touch(parent)
        from django.conf import settings

        interval = settings.JOBS_LIVENESS_INTERVAL
        self.tref = parent.timer.call_repeatedly(interval, self.touch, (parent,), priority=10)

    def stop(self, parent: Any) -> None:
        if self.tref is not None:
            self.tref.cancel()
            self.tref = None

    def touch(self, parent: Any) -> None:
        connection = parent.connection
        task_consumer = parent.task_consumer
        queues = [q.name for q in getattr(task_consumer, "queues", None) or []]
        if connection is None or not connection.connected or not queues:
            return
        try:
            liveness_touch("worker", hostname=parent.hostname, queues=queues)
        except OSError:
            logger.warning("worker.liveness_write_failed", exc_info=True)
