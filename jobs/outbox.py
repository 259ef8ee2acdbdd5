"""Publishing tasks so that none is lost when the broker is down and no request hangs on it.

`enqueue()` writes the message to `OutboxMessage` inside the caller's transaction and, once the
transaction commits, publishes it with a short timeout and deletes the row. When the broker does
not answer, the row stays and `outbox_relay()` (every few seconds from beat, and at worker
start-up) publishes it later, with the same task id.
"""

from __future__ import annotations

import logging
import uuid
from datetime import timedelta
from typing import Any

from django.db import connection, transaction
from django.db.models import Q
from django.utils import timezone

from jobs.context import get_request_id
from jobs.models import OutboxMessage

logger = logging.getLogger("jobs.outbox")

PUBLISH_RETRY_POLICY = {"max_retries": 1, "interval_start": 0.1, "interval_step": 0.2, "interval_max": 0.3}
#: A row younger than this, never tried, belongs to the publisher of its own request.
RELAY_GRACE = timedelta(seconds=30)
ALLOWED_OPTIONS = {"queue", "countdown", "priority", "expires"}


def enqueue(
    task: Any, *, args: list | tuple = (), kwargs: dict | None = None, request_id: str | None = None, **options: Any
) -> str:
    """Publishes `task` (a task object or its registered name) after the current transaction
    commits, durably. `request_id` defaults to the current one. Returns the task id at once."""
    unknown = set(options) - ALLOWED_OPTIONS
    if unknown:
        raise TypeError(f"unsupported publish options: {', '.join(sorted(unknown))}")
    name = task if isinstance(task, str) else task.name
    request_id = request_id or get_request_id()
    headers = {"request_id": request_id} if request_id else {}
    message = OutboxMessage.objects.create(
        task_name=name,
        task_id=str(uuid.uuid4()),
        args=list(args),
        kwargs=dict(kwargs or {}),
        options={**options, "headers": headers},
    )
    transaction.on_commit(lambda: _publish_and_forget(message))
    return message.task_id


def _publish(message: OutboxMessage) -> None:
    from config.celery import app

    options = dict(message.options)
    headers = options.pop("headers", {}) or {}
    app.send_task(
        message.task_name,
        args=message.args,
        kwargs=message.kwargs,
        task_id=message.task_id,
        headers=headers,
        retry=True,
        retry_policy=PUBLISH_RETRY_POLICY,
        **options,
    )


def _publish_and_forget(message: OutboxMessage) -> None:
    """Runs on commit, on the request path: no read of its own, one plain DELETE once published.
    (The relay leaves the row alone for RELAY_GRACE after its creation; only a transaction held
    open longer than that could see its message published by both, with the same task id.)"""
    try:
        _publish(message)
    except Exception as exc:  # noqa: BLE001 - the broker is down: keep the row for the relay
        OutboxMessage.objects.filter(pk=message.pk).update(attempts=message.attempts + 1, last_error=_describe(exc))
        logger.warning(
            "outbox.publish_deferred",
            extra={"task_id": message.task_id, "outbox_task": message.task_name, "error": _describe(exc)},
        )
        return
    # One statement, in autocommit: QuerySet.delete() would add a collector and a transaction,
    # which on SQLite is a second wait for the write lock on every enqueue.
    table = connection.ops.quote_name(OutboxMessage._meta.db_table)
    with connection.cursor() as cursor:
        cursor.execute(f"DELETE FROM {table} WHERE id = %s", [message.pk])  # noqa: S608 - our own table name


def outbox_relay(*, limit: int = 500) -> dict[str, int]:
    """Publishes waiting outbox messages (failed ones, and ones older than the grace period whose
    publisher died); stops at the first failure, the broker being down. Returns counts."""
    published = failed = 0
    lock = {"skip_locked": True} if connection.features.has_select_for_update_skip_locked else {}
    cutoff = timezone.now() - RELAY_GRACE
    with transaction.atomic():
        rows = list(
            OutboxMessage.objects.select_for_update(**lock)
            .filter(Q(attempts__gt=0) | Q(created_at__lt=cutoff))
            .order_by("pk")[:limit]
        )
        done = []
        for message in rows:
            try:
                _publish(message)
            except Exception as exc:  # noqa: BLE001
                OutboxMessage.objects.filter(pk=message.pk).update(
                    attempts=message.attempts + 1, last_error=_describe(exc)
                )
                failed += 1
                break
            done.append(message.pk)
            published += 1
        OutboxMessage.objects.filter(pk__in=done).delete()
    if published or failed:
        logger.info("outbox.relayed", extra={"published": published, "failed": failed})
    return {"published": published, "failed": failed, "waiting": OutboxMessage.objects.count()}


def outbox_backlog() -> int:
    return OutboxMessage.objects.count()


def _describe(exc: BaseException) -> str:
    from jobs.policy import redact_text

    return redact_text(f"{type(exc).__name__}: {exc}")[:500]
