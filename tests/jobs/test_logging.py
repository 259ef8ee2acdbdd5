"""`jobs`' log events: the fields of a call travel as record attributes (this site's JSON and
console formats print them as fields), and any other formatter (a host's own, Celery's default)
prints them after the event's name instead of dropping them."""

from __future__ import annotations

import json
import logging
import pickle

from jobs.logging import Event, event_name, get_logger


class _Keep(logging.Handler):
    def __init__(self) -> None:
        super().__init__()
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)


def _logged(call) -> logging.LogRecord:
    keep = _Keep()
    inner = logging.getLogger("jobs.tests.events")
    inner.addHandler(keep)
    inner.setLevel(logging.INFO)
    try:
        call(get_logger("jobs.tests.events"))
    finally:
        inner.removeHandler(keep)
    (record,) = keep.records
    return record


def test_a_plain_formatter_prints_the_events_fields():
    record = _logged(lambda log: log.warning("beat.tick_failed", extra={"error": "boom", "attempt": 2}))
    plain = logging.Formatter("[%(levelname)s] %(message)s").format(record)
    assert plain == "[WARNING] beat.tick_failed error=boom attempt=2"
    assert record.msg == "beat.tick_failed"  # the event's name, for whoever compares it
    assert event_name(record) == "beat.tick_failed"
    assert record.error == "boom"


def test_this_sites_formats_print_the_name_and_the_fields_once():
    from config.logging import ConsoleFormatter, JsonFormatter

    record = _logged(lambda log: log.info("ledger.republishing", extra={"task_id": "t-1"}))
    line = json.loads(JsonFormatter().format(record))
    assert (line["event"], line["task_id"]) == ("ledger.republishing", "t-1")
    console = ConsoleFormatter(colour=False).format(record)
    assert console.endswith("jobs.tests.events  ledger.republishing  task_id=t-1")


def test_events_without_fields_and_messages_with_arguments_are_left_as_they_were():
    record = _logged(lambda log: log.info("worker.ready"))
    assert type(record.msg) is str
    record = _logged(lambda log: log.info("took %s s", "100%", extra={"what": "x"}))
    assert record.getMessage() == "took 100% s"
    record = _logged(lambda log: log.warning("ledger.sweep_failed", extra={"error": "disk 100% full"}))
    assert record.getMessage() == "ledger.sweep_failed error=disk 100% full"
    assert record.funcName == "<lambda>"  # the caller's line, not the logger's


def test_an_event_survives_pickling_as_records_do_between_processes():
    event = pickle.loads(pickle.dumps(Event("job.throttled", {"limit": "sync"})))  # noqa: S301 - our own bytes
    assert (event, str(event), event.fields) == ("job.throttled", "job.throttled limit=sync", {"limit": "sync"})
