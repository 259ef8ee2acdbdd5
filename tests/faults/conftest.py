"""Fixtures of the fault-injection suite (`pytest -m faults`), and its reliability table.

Every scenario gets a `stack` (tests/faults/stack.py): a private Redis that the test process and
every process it starts use (so CONFIG SET, CLIENT PAUSE and restarts never touch the suite's
shared Redis), a recording SMTP server, and factories for the real worker, beat and web. Each
scenario records one row; the rows are printed as a Markdown table at the end of the run and
written to var/reliability-table.md.
"""

from __future__ import annotations

import logging

import pytest

from config.env import BASE_DIR
from tests.conftest import reset_broker_pools
from tests.faults.stack import FaultSMTPServer, PrivateRedis, Row, Stack, markdown_table

ROWS = pytest.StashKey[list[Row]]()
TABLE_PATH = BASE_DIR / "var" / "reliability-table.md"
LEGEND = """
accepted: jobs created (emails through `email_queue`, images through `image_create`); done: emails
`sent` (and received by the SMTP server) plus images `done`; dead-lettered: dead letters written
(the scenario's own poison or unknown-task messages included); lost: neither done nor failed and no
ledger row left to bring it back (or failed without a dead letter, or `sent` but never received);
stuck: neither done nor failed at the scenario's deadline; sent twice: Message-IDs the SMTP server
accepted more than once; died: stack processes that exited without the test stopping them or
logged `Unrecoverable error`; s: seconds the scenario took.
"""


@pytest.fixture(scope="session")
def reliability_rows(request) -> list[Row]:
    return request.config.stash.setdefault(ROWS, [])


@pytest.fixture
def private_redis(settings, monkeypatch):
    """A Redis of this scenario alone; the test process's broker, cache and Celery app point at
    it until the scenario ends, then back at the suite's."""
    from config.celery import app

    broker = PrivateRedis()
    previous_broker_url = app.conf.broker_url
    settings.REDIS_URL = broker.url
    settings.CELERY_BROKER_URL = broker.url
    settings.CACHES = {"default": {**settings.CACHES["default"], "LOCATION": broker.url}}
    monkeypatch.setenv("REDIS_URL", broker.url)
    monkeypatch.setenv("CELERY_BROKER_URL", broker.url)
    app.conf.broker_url = broker.url
    reset_broker_pools()
    yield broker
    app.conf.broker_url = previous_broker_url
    reset_broker_pools()
    broker.stop()


@pytest.fixture
def smtp_server():
    """The recording SMTP server; aiosmtpd's per-command log lines are kept out of the report."""
    mail_log = logging.getLogger("mail.log")
    level = mail_log.level
    mail_log.setLevel(logging.WARNING)
    try:
        with FaultSMTPServer() as server:
            yield server
    finally:
        mail_log.setLevel(level)


@pytest.fixture
def stack(request, transactional_db, private_redis, smtp_server, tmp_path, settings, reliability_rows):
    """The scenario's stack. Its processes are stopped before the database is flushed; a scenario
    that ended before recording its row (an error while injecting the fault) still gets one."""
    fault_stack = Stack(broker=private_redis, smtp=smtp_server, tmp_path=tmp_path, media_root=settings.MEDIA_ROOT)
    fault_stack.fault = request.node.name  # each scenario names its fault first thing
    try:
        yield fault_stack
    finally:
        try:
            if fault_stack.row is None:
                row = fault_stack.tally()
                row.note = "scenario did not reach its end (see the test's error)"
                fault_stack.row = row
        finally:
            fault_stack.stop_all()
            if fault_stack.row is not None:  # None when even counting failed (the test's error says why)
                reliability_rows.append(fault_stack.row)


def pytest_terminal_summary(terminalreporter, exitstatus, config) -> None:
    rows = config.stash.get(ROWS, [])
    if not rows:
        return
    table = markdown_table(rows)
    terminalreporter.section("reliability table")
    terminalreporter.write(table)
    TABLE_PATH.parent.mkdir(exist_ok=True)
    TABLE_PATH.write_text("# Reliability under injected faults (`pytest -m faults`)\n\n" + table + LEGEND)
    terminalreporter.write_line(f"written to {TABLE_PATH.relative_to(BASE_DIR)}")
