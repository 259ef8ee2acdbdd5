"""Log lines: JSON objects with the contract's keys, or readable console lines."""

from __future__ import annotations

import json
import logging

import pytest

from config.logging import ConsoleFormatter, JsonFormatter
from jobs.context import request_id_var, task_id_var, task_name_var
from jobs.logging import ContextFilter


def _record(msg="thumbnail.done", level=logging.INFO, **extra):
    record = logging.LogRecord("thumbnails.tasks", level, __file__, 1, msg, None, None)
    record.__dict__.update(extra)
    ContextFilter().filter(record)
    return record


def test_json_line_has_contract_keys_and_context():
    tokens = [request_id_var.set("rid-1"), task_id_var.set("tid-1"), task_name_var.set("thumbnails.generate")]
    try:
        line = JsonFormatter().format(_record(image_id=7))
    finally:
        for var, token in zip((request_id_var, task_id_var, task_name_var), tokens, strict=True):
            var.reset(token)
    data = json.loads(line)
    assert list(data)[:4] == ["timestamp", "level", "logger", "event"]
    assert data["level"] == "INFO"
    assert data["logger"] == "thumbnails.tasks"
    assert data["event"] == "thumbnail.done"
    assert data["request_id"] == "rid-1"
    assert data["task_id"] == "tid-1"
    assert data["task_name"] == "thumbnails.generate"
    assert data["image_id"] == 7
    assert "message" not in data


def test_json_line_without_context_has_no_null_ids():
    data = json.loads(JsonFormatter().format(_record()))
    assert "request_id" not in data
    assert "task_id" not in data


def test_json_line_carries_the_traceback():
    try:
        raise ValueError("bad")
    except ValueError:
        import sys

        record = logging.LogRecord("x", logging.ERROR, __file__, 1, "failed", None, sys.exc_info())
    data = json.loads(JsonFormatter().format(record))
    assert "ValueError: bad" in data["exc_info"]


def test_console_line_is_readable():
    token = request_id_var.set("rid-2")
    try:
        line = ConsoleFormatter(colour=False).format(_record(image_id=7))
    finally:
        request_id_var.reset(token)
    assert "INFO" in line
    assert "thumbnails.tasks  thumbnail.done" in line
    assert "image_id=7" in line
    assert "request_id=rid-2" in line
    assert "\033[" not in line


def test_console_line_is_coloured_on_request_and_shows_tracebacks():
    try:
        raise KeyError("k")
    except KeyError:
        import sys

        record = logging.LogRecord("x", logging.ERROR, __file__, 1, "failed", None, sys.exc_info())
    line = ConsoleFormatter(colour=True).format(record)
    assert "\033[31m" in line
    assert "KeyError" in line


class _Collect(logging.Handler):
    def __init__(self) -> None:
        super().__init__()
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)


def _stream(name="test.stdout"):
    from config.logging import LogStream

    logger = logging.getLogger(name)
    logger.propagate = False
    collect = _Collect()
    logger.handlers = [collect]
    logger.setLevel(logging.INFO)
    return LogStream(logger, logging.WARNING), collect


def test_log_stream_turns_fragments_into_whole_lines():
    stream, collect = _stream()
    for piece in ("Traceback", " (most recent call last):", "\n", "  ^^^", "\n", "ValueError: x"):
        stream.write(piece)
    assert [r.getMessage() for r in collect.records] == ["Traceback (most recent call last):", "  ^^^"]
    stream.flush()  # what is left without a newline still comes out
    assert collect.records[-1].getMessage() == "ValueError: x"
    assert {r.levelno for r in collect.records} == {logging.WARNING}
    assert stream.fileno() is None
    assert not stream.isatty()
    assert stream.writable()


def test_log_stream_keeps_a_multi_line_print_in_one_record_and_drops_blank_lines():
    stream, collect = _stream()
    print(" -------------- worker\n[queues]\n  .> high", file=stream)
    print("", file=stream)
    assert [r.getMessage() for r in collect.records] == [" -------------- worker\n[queues]\n  .> high"]


def test_log_stream_does_not_loop_when_a_handler_writes_back_to_it():
    stream, collect = _stream("test.loop")
    logger = logging.getLogger("test.loop")

    class WritesBack(logging.Handler):
        def emit(self, record):
            stream.write(f"echo {record.getMessage()}\n")

    logger.addHandler(WritesBack())
    stream.write("once\n")
    assert [r.getMessage() for r in collect.records] == ["once"]


def test_capture_stdio_points_stdout_and_stderr_at_logging_and_handlers_at_the_real_streams(monkeypatch):
    import io
    import sys

    from config import logging as site_logging

    real_out, real_err = io.StringIO(), io.StringIO()
    monkeypatch.setattr(site_logging, "_REAL_STREAMS", {})
    for name, stream in {
        "stdout": real_out,
        "stderr": real_err,
        "__stdout__": real_out,
        "__stderr__": real_err,
    }.items():
        monkeypatch.setattr(sys, name, stream)
    site_logging.capture_stdio()
    site_logging.capture_stdio()  # idempotent: the real streams are kept, not the proxies
    assert isinstance(sys.stdout, site_logging.LogStream)
    assert sys.__stderr__ is sys.stderr
    assert {"stdout": real_out, "stderr": real_err} == site_logging._REAL_STREAMS

    handler = site_logging.StreamHandler()
    handler.setFormatter(JsonFormatter())
    logger = logging.getLogger("stdout")
    monkeypatch.setattr(logger, "handlers", [handler])
    monkeypatch.setattr(logger, "propagate", False)
    print("hello from a task")  # noqa: T201 - what a task might do
    assert json.loads(real_err.getvalue())["event"] == "hello from a task"
    assert real_out.getvalue() == ""


def test_lines_about_mail_carry_no_address_and_no_line_a_url_password():
    refused = _record("email.send_failed", error="SMTPRecipientsRefused: {'ada@example.com': (550, b'unknown')}")
    refused.name = "mailer.services"
    line = JsonFormatter().format(refused)
    assert "ada@" not in line
    assert "***@example.com" in line

    token = task_name_var.set("mailer.send_email")
    try:
        retry = _record("Task retry: SMTPRecipientsRefused({'ada@example.com': (451, b'later')})")
    finally:
        task_name_var.reset(token)
    assert "ada@" not in ConsoleFormatter(colour=False).format(retry)

    other = _record("consumer: Cannot connect to redis://:hunter2@cache:6379/0; staff ada@example.com")
    line = json.loads(JsonFormatter().format(other))["event"]
    assert "hunter2" not in line
    assert "ada@example.com" in line  # outside mail, an address (a username, say) stays


def test_log_stream_writes_plainly_while_logging_is_not_configured(monkeypatch):
    """A worker that fails before Django configured logging must still show why."""
    import io

    from config import logging as site_logging

    real_err = io.StringIO()
    monkeypatch.setattr(site_logging, "_REAL_STREAMS", {"stderr": real_err})
    monkeypatch.setattr(logging.getLogger(), "handlers", [])
    stream = site_logging.LogStream(logging.getLogger("stderr"), logging.WARNING)
    stream.write("ImproperlyConfigured: no broker\n")
    assert real_err.getvalue() == "ImproperlyConfigured: no broker\n"


@pytest.mark.parametrize(
    ("env", "colour"),
    [({"FORCE_COLOR": "1"}, True), ({"FORCE_COLOR": "1", "NO_COLOR": "1"}, False), ({}, False)],
)
def test_console_colour_follows_force_color_and_no_color(monkeypatch, env, colour):
    from config.logging import console_colour

    for name in ("FORCE_COLOR", "NO_COLOR"):
        monkeypatch.delenv(name, raising=False)
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    assert console_colour() is colour  # stderr is not a terminal under pytest
