"""The log records of `jobs`: the request id and the running task on every one, and events that
name their fields whatever formats them."""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import Any

from jobs.context import request_id_var, task_id_var, task_name_var

CONTEXT_FIELDS = (("request_id", request_id_var), ("task_id", task_id_var), ("task_name", task_name_var))


class ContextFilter(logging.Filter):
    """Adds the request id and the running task (when known) to every record."""

    def filter(self, record: logging.LogRecord) -> bool:
        for name, var in CONTEXT_FIELDS:
            if getattr(record, name, None) is None:
                value = var.get()
                if value is not None:
                    setattr(record, name, value)
        return True


class Event(str):
    """A log event's name (`"beat.tick_failed"`) that prints with its fields (`extra`) where a
    formatter knows only the message (a host's own logging, Celery's default format): `str()` of
    it, and so `record.getMessage()`, is `"beat.tick_failed error=..."`; its value as a string is
    the bare name (`==`, `event_name`)."""

    fields: Mapping[str, Any]

    def __new__(cls, name: str, fields: Mapping[str, Any] | None = None) -> Event:
        event = super().__new__(cls, name)
        event.fields = dict(fields or {})
        return event

    def __str__(self) -> str:
        name = str.__str__(self)
        if not self.fields:
            return name
        return name + " " + " ".join(f"{key}={value}" for key, value in self.fields.items())


class EventLogger(logging.LoggerAdapter[logging.Logger]):
    """`jobs`' loggers: a call's `extra` travels as attributes of the record (JSON fields in this
    site's format), and its message is an `Event` that names them for any other formatter (not
    a message with %-arguments: a field holding "%" would break its formatting)."""

    def log(self, level: int, msg: object, *args: object, **kwargs: Any) -> None:
        if not self.isEnabledFor(level):
            return
        extra = kwargs.get("extra")
        if extra and not args and type(msg) is str:
            msg = Event(msg, extra)
        kwargs["stacklevel"] = int(kwargs.get("stacklevel", 1)) + 1  # the caller's line, not this one
        self.logger.log(level, msg, *args, **kwargs)


def get_logger(name: str) -> EventLogger:
    """The logger of a `jobs` module."""
    return EventLogger(logging.getLogger(name), {})


def event_name(record: logging.LogRecord) -> str:
    """What a record says without its fields: the event's bare name, else its message."""
    if isinstance(record.msg, Event):
        return str.__str__(record.msg)
    return record.getMessage()
