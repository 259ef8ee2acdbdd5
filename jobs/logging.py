"""The log context of `jobs`: the request id and the running task on every log record."""

from __future__ import annotations

import logging

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
