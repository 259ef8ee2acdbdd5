"""Log formatting shared by web, worker and beat: JSON lines in production, readable in dev."""

from __future__ import annotations

import logging
import sys
from datetime import UTC, datetime

from pythonjsonlogger.json import JsonFormatter as _BaseJsonFormatter

from jobs.context import request_id_var, task_id_var, task_name_var

_CONTEXT_FIELDS = (("request_id", request_id_var), ("task_id", task_id_var), ("task_name", task_name_var))


class ContextFilter(logging.Filter):
    """Adds the request id and the running task (when known) to every record."""

    def filter(self, record: logging.LogRecord) -> bool:
        for name, var in _CONTEXT_FIELDS:
            if getattr(record, name, None) is None:
                value = var.get()
                if value is not None:
                    setattr(record, name, value)
        return True


class JsonFormatter(_BaseJsonFormatter):
    """One JSON object per line: timestamp, level, logger, event, then context and extra fields."""

    def __init__(self, *args, **kwargs) -> None:
        kwargs.setdefault("json_ensure_ascii", False)
        super().__init__(*args, **kwargs)

    def add_fields(self, log_data: dict, record: logging.LogRecord, message_dict: dict) -> None:
        super().add_fields(log_data, record, message_dict)
        log_data["timestamp"] = datetime.fromtimestamp(record.created, tz=UTC).isoformat(timespec="milliseconds")
        log_data["level"] = record.levelname
        log_data["logger"] = record.name
        log_data["event"] = record.getMessage()
        log_data.pop("message", None)
        for name, _ in _CONTEXT_FIELDS:
            value = getattr(record, name, None)
            if value is not None:
                log_data[name] = value
        if record.exc_info and "exc_info" not in log_data:  # pragma: no cover - handled by base
            log_data["exc_info"] = self.formatException(record.exc_info)

    def process_log_record(self, log_data: dict) -> dict:
        # Put the contract's keys first so a human reading raw lines finds them.
        head = {k: log_data.pop(k) for k in ("timestamp", "level", "logger", "event") if k in log_data}
        return {**head, **log_data}


_COLOURS = {"DEBUG": "\033[36m", "INFO": "\033[32m", "WARNING": "\033[33m", "ERROR": "\033[31m", "CRITICAL": "\033[41m"}
_RESET = "\033[0m"


class ConsoleFormatter(logging.Formatter):
    """`12:00:01 INFO  logger  event  key=value ...`, coloured when the stream is a terminal."""

    _skip = set(logging.LogRecord("", 0, "", 0, "", None, None).__dict__) | {"message", "asctime", "color_message"}

    def __init__(self, *args, colour: bool | None = None, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.colour = sys.stderr.isatty() if colour is None else colour

    def format(self, record: logging.LogRecord) -> str:
        when = datetime.fromtimestamp(record.created).strftime("%H:%M:%S")
        level = record.levelname
        colour, reset = (_COLOURS.get(level, ""), _RESET) if self.colour else ("", "")
        extras = " ".join(
            f"{k}={v}"
            for k, v in record.__dict__.items()
            if k not in self._skip and isinstance(v, str | int | float) and k != "server_time"
        )
        line = f"{when} {colour}{level:<7}{reset} {record.name}  {record.getMessage()}"
        if extras:
            line = f"{line}  {extras}"
        if record.exc_info:
            line = f"{line}\n{self.formatException(record.exc_info)}"
        return line
