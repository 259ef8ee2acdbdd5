"""Log formatting shared by web, worker and beat: JSON lines in production, readable in dev.

`jobs.logging.ContextFilter` adds the request and task ids to every record; the formatters here
write them out.
"""

from __future__ import annotations

import io
import logging
import os
import sys
import threading
import time
from datetime import UTC, datetime

from pythonjsonlogger.json import JsonFormatter as _BaseJsonFormatter

from jobs.logging import CONTEXT_FIELDS
from jobs.redaction import redact_text


def event_name(record: logging.LogRecord) -> str:
    """What a record says without its fields: `jobs` logs events as a `str` subclass whose
    `str()` names the fields too (for formatters that know only the message); here the fields
    are written as fields, so the event is its bare value. (Duck-typed, not imported from `jobs`:
    during a rolling deploy the previous release's `jobs` runs under this module.)"""
    message = record.msg
    if isinstance(message, str) and type(message) is not str and not record.args:
        return str.__str__(message)
    return record.getMessage()


def _scrub(line: str, record: logging.LogRecord) -> str:
    """No URL password in any line, and no email address in a line about sending mail (an SMTP
    refusal or a provider's error names the recipients; an email's own lines use its id)."""
    mail = record.name.startswith("mailer") or str(getattr(record, "task_name", "") or "").startswith("mailer.")
    return redact_text(line, addresses=mail)


class JsonFormatter(_BaseJsonFormatter):
    """One JSON object per line: timestamp, level, logger, event, then context and extra fields."""

    def __init__(self, *args, **kwargs) -> None:
        kwargs.setdefault("json_ensure_ascii", False)
        super().__init__(*args, **kwargs)

    def format(self, record: logging.LogRecord) -> str:
        return _scrub(super().format(record), record)

    def add_fields(self, log_data: dict, record: logging.LogRecord, message_dict: dict) -> None:
        super().add_fields(log_data, record, message_dict)
        log_data["timestamp"] = datetime.fromtimestamp(record.created, tz=UTC).isoformat(timespec="milliseconds")
        log_data["level"] = record.levelname
        log_data["logger"] = record.name
        log_data["event"] = event_name(record)  # its fields follow as fields of their own
        log_data.pop("message", None)
        for name, _ in CONTEXT_FIELDS:
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


def console_colour() -> bool:
    """Colour when stderr is a terminal, or when `FORCE_COLOR` is set (`make run`: honcho pipes
    each process but shows colours); never when `NO_COLOR` is set (no-color.org)."""
    if os.environ.get("NO_COLOR"):
        return False
    return bool(os.environ.get("FORCE_COLOR")) or sys.stderr.isatty()


class ConsoleFormatter(logging.Formatter):
    """`12:00:01 INFO  logger  event  key=value ...`, coloured when the stream is a terminal."""

    _skip = set(logging.LogRecord("", 0, "", 0, "", None, None).__dict__) | {"message", "asctime", "color_message"}

    def __init__(self, *args, colour: bool | None = None, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.colour = console_colour() if colour is None else colour

    def format(self, record: logging.LogRecord) -> str:
        when = time.strftime("%H:%M:%S", time.localtime(record.created))  # the reader's own clock
        level = record.levelname
        colour, reset = (_COLOURS.get(level, ""), _RESET) if self.colour else ("", "")
        extras = " ".join(
            f"{k}={v}"
            for k, v in record.__dict__.items()
            if k not in self._skip and isinstance(v, str | int | float) and k != "server_time"
        )
        line = f"{when} {colour}{level:<7}{reset} {record.name}  {event_name(record)}"
        if extras:
            line = f"{line}  {extras}"
        if record.exc_info:
            line = f"{line}\n{self.formatException(record.exc_info)}"
        return _scrub(line, record)


#: The process's real stdout and stderr once `capture_stdio` has replaced them.
_REAL_STREAMS: dict[str, object] = {}


class StreamHandler(logging.StreamHandler):
    """Writes to the real stderr even when `capture_stdio` has pointed `sys.stderr` at logging
    (which would otherwise swallow every record through the stream's recursion guard)."""

    def __init__(self, stream=None) -> None:
        super().__init__(stream if stream is not None else _REAL_STREAMS.get("stderr", sys.stderr))


class LogStream(io.TextIOBase):
    """A text stream whose lines become log records. Unlike Celery's `LoggingProxy`, it never
    writes anywhere else (not even from a signal handler), so nothing but log lines reach the
    real streams; `fileno()` is None, which Celery's signal-handler notices treat as "skip"."""

    def __init__(self, logger: logging.Logger, level: int) -> None:
        super().__init__()
        self.logger = logger
        self.level = level
        self._local = threading.local()
        self._buffer = ""

    def writable(self) -> bool:
        return True

    def isatty(self) -> bool:
        return False

    def fileno(self) -> None:  # type: ignore[override]
        return None

    def write(self, data: str) -> int:
        # Up to a line end only: a traceback line arrives in fragments, a banner as one
        # multi-line print followed by its newline (one record).
        self._buffer += data
        if self._buffer.endswith("\n") or len(self._buffer) > 65536:
            self.flush()
        return len(data)

    def flush(self) -> None:
        text, self._buffer = self._buffer, ""
        self._emit(text.rstrip("\n"))

    def _emit(self, text: str) -> None:
        if not text.strip() or getattr(self._local, "writing", False):  # a handler writing back here
            return
        if not logging.getLogger().handlers:  # logging not configured (yet): never lose the text
            real = _REAL_STREAMS.get("stderr", sys.__stderr__)
            real.write(f"{text}\n")
            real.flush()
            return
        self._local.writing = True
        try:
            self.logger.log(self.level, text)
        finally:
            self._local.writing = False


def capture_stdio() -> None:
    """Route whatever a worker or beat prints (Celery's start banners, which it writes to
    ``sys.__stdout__``, a task's ``print()``, a stray traceback) through logging, so that with
    ``LOG_FORMAT=json`` every line on stdout and stderr is one JSON object. Celery's notices from
    inside signal handlers ("Warm shutdown") go straight to a file descriptor and are left out;
    the worker logs its shutdown itself.

    Called as the Celery app is imported, before Celery prints anything; idempotent.
    """
    if _REAL_STREAMS:
        return
    _REAL_STREAMS.update(stdout=sys.stdout, stderr=sys.stderr)
    sys.stdout = sys.__stdout__ = LogStream(logging.getLogger("stdout"), logging.INFO)
    sys.stderr = sys.__stderr__ = LogStream(logging.getLogger("stderr"), logging.WARNING)
