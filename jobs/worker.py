"""Worker-side classes: the request wrapper and the consumer the project installs."""

from __future__ import annotations

import base64
import logging
from typing import Any

from celery.worker.consumer import Consumer
from celery.worker.request import Request

logger = logging.getLogger(__name__)


class JobRequest(Request):
    """Runs `on_timeout` with the task's own request context pushed, so a hard time limit
    (handled in the worker's main process) still dead-letters with queue, headers and request id."""

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
