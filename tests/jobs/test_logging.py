"""Log lines: JSON objects with the contract's keys, or readable console lines."""

from __future__ import annotations

import json
import logging

from jobs.context import request_id_var, task_id_var, task_name_var
from jobs.logging import ConsoleFormatter, ContextFilter, JsonFormatter


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
