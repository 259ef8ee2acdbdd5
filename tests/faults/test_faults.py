"""Fault injection with real processes: every accepted job ends done, or failed with a dead letter,
whatever dies on the way; no email is delivered twice; no process dies of a dependency's hiccup.

One scenario per fault. Each starts the real processes on a private Redis (see conftest.py and
stack.py), pushes a small batch of real jobs (emails through `email_queue`, Pillow images through
`image_create`), injects its fault, and ends with `stack.finish()`, which records the scenario's
row of the reliability table and asserts lost == stuck == sent twice == died == 0 and exactly
the scenario's own dead letters.
"""

from __future__ import annotations

import json
import sqlite3
import threading
import time
from collections import Counter

import pytest
import requests
from django.contrib.auth import get_user_model
from django.core.cache import cache
from django.core.management import call_command
from django.db import connection
from django_celery_beat.models import IntervalSchedule, PeriodicTask

from config.celery import app
from jobs import crashloop
from jobs.models import DeadLetter, OutboxMessage
from mailer.models import Email
from tests.conftest import grant, reset_broker_pools
from tests.faults.pool_killer import POISON_KEY, POISON_LOG_KEY
from tests.faults.stack import ExpectedDeadLetter

pytestmark = [pytest.mark.django_db(transaction=True), pytest.mark.integration, pytest.mark.faults]

THUMBNAILS = "thumbnails.generate"
UNKNOWN_TASK = "no.such.task"


def heartbeats(stack) -> int:
    """Heartbeat tasks the stack's workers ran (they keep no result row: `jobs.tasks.QUIET`)."""
    return sum(
        1
        for proc in stack.procs
        if proc.role == "worker"
        for line in proc.log().splitlines()
        if '"Task jobs.heartbeat[' in line and " succeeded in " in line
    )


def heartbeat_every_second() -> None:
    """The default schedules (`manage.py setup_schedules`), with the heartbeat every second."""
    call_command("setup_schedules", verbosity=0)
    every_second, _ = IntervalSchedule.objects.get_or_create(every=1, period=IntervalSchedule.SECONDS)
    PeriodicTask.objects.filter(name="jobs: heartbeat").update(interval=every_second)


def heartbeats_resume(stack, after: int, count: int = 2):
    def check() -> str | None:
        now = heartbeats(stack)
        return None if now >= after + count else f"heartbeat: {now - after} runs after the fault, wanted {count}"

    return check


def worker_log_events(proc, event: str) -> list[dict]:
    found = []
    for line in proc.log().splitlines():
        if f'"{event}"' in line:
            try:
                found.append(json.loads(line))
            except ValueError:
                continue
    return found


# --- 1. the database --------------------------------------------------------------------------


def cut_database_connections() -> int:
    """pg_terminate_backend of every backend of the test database except this process's own."""
    with connection.cursor() as cursor:
        cursor.execute(
            "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity "
            "WHERE datname = current_database() AND pid <> pg_backend_pid()"
        )
        return int(cursor.fetchone()[0])


def hold_sqlite_write_lock(seconds: float) -> None:
    """BEGIN IMMEDIATE on the database file from a connection of its own, for `seconds`."""
    other = sqlite3.connect(connection.settings_dict["NAME"], timeout=30, isolation_level=None)
    try:
        other.execute("BEGIN IMMEDIATE")
        time.sleep(seconds)
        other.execute("COMMIT")
    finally:
        other.close()


def test_database_connections_cut(stack):
    postgres = connection.vendor == "postgresql"
    stack.fault = "database connections cut" if postgres else "database write lock held (SQLite)"
    stack.smtp.handler.rcpt_delay = 0.3  # keeps the batch running while the cuts come
    worker = stack.start_worker()
    # A first message no worker can run: the worker's main process writes its dead letter, and so
    # holds a database connection of its own from now on.
    app.send_task(UNKNOWN_TASK, args=[1, "before the cuts"])
    stack.wait(lambda: DeadLetter.objects.filter(task_name=UNKNOWN_TASK).exists(), 30, "the first dead letter")
    time.sleep(1.5)  # idle: every connection the worker holds is parked

    cuts: list[int] = []
    if postgres:
        cuts.append(cut_database_connections())  # while idle
        stack.submit()
        # While the batch runs: a failover that flaps, cutting every ~0.15 s for 4 s, so cuts land
        # at every point of a task's life (before it starts, in its body, while it records).
        for _ in range(25):
            time.sleep(0.15)
            cuts.append(cut_database_connections())
        assert sum(cuts) > 0, "no backend was terminated: the fault did not happen"
    else:
        stack.submit()
        hold_sqlite_write_lock(4.0)
    # A rolling deploy: a message for a task this worker does not know, right after a cut.
    if postgres:
        cuts.append(cut_database_connections())
    app.send_task(UNKNOWN_TASK, args=[2, "after the cuts"])

    def dead_letters_saved() -> str | None:
        unsaved = worker_log_events(worker, "dead_letter.unsaved")
        return f"{len(unsaved)} dead letter(s) only logged (dead_letter.unsaved)" if unsaved else None

    stack.finish(
        timeout=45,
        expected=[
            ExpectedDeadLetter(UNKNOWN_TASK, (1, "before the cuts"), DeadLetter.Reason.UNDECODABLE),
            ExpectedDeadLetter(UNKNOWN_TASK, (2, "after the cuts"), DeadLetter.Reason.UNDECODABLE),
        ],
        check=dead_letters_saved,
        note=f"{sum(cuts)} backends cut" if postgres else "write lock held 4 s",
    )


# --- 2, 3, 4, 5. the broker -------------------------------------------------------------------


#: A worker's consumer that meets a full broker (its bookkeeping of a delivery refused) drops its
#: channel and reconnects; what it had received then waits in Redis' `unacked` hash until the
#: visibility timeout gives it back (the contract's "visibility timeout plus a minute"): short here.
OOM_ENV = {"CELERY_VISIBILITY_TIMEOUT": "8"}


def test_broker_out_of_memory_during_publish(stack):
    stack.fault = "broker out of memory during publish"
    stack.start_worker(**OOM_ENV)
    # Full from the first publish on. (Leaving a little headroom instead made the fault depend on
    # timing: the worker consuming the first messages freed room for the rest, and every publish
    # went through.)
    stack.broker.set_maxmemory(1)  # noeviction: every write that needs memory is refused (OOM)
    stack.submit()
    waiting = OutboxMessage.objects.filter(published_at__isnull=True).count()
    assert waiting > 0, "every publish went through: the broker was not full"
    time.sleep(3)  # stays full while the worker's sweeper tries to relay
    stack.broker.set_maxmemory(0)
    stack.finish(timeout=30, note=f"{waiting} publishes refused")


def test_broker_out_of_memory_during_retries(stack):
    stack.fault = "broker out of memory during retries"
    chokes: list[float] = []
    lock = threading.Lock()
    restore_timers: list[threading.Timer] = []

    def restore() -> None:
        stack.broker.set_maxmemory(0)
        with lock:
            chokes.append(-time.monotonic())  # a negative mark: restored

    def choke(_message_id: str) -> None:
        # Runs in the SMTP server's thread, before it answers 451: the worker's retry publish that
        # follows the reply is refused by a full broker. Restored 3 s later; the next first
        # attempt after that chokes it again.
        with lock:
            if chokes and chokes[-1] > 0:
                return
            chokes.append(time.monotonic())
        stack.broker.set_maxmemory(1)
        timer = threading.Timer(3.0, restore)
        restore_timers.append(timer)
        timer.start()

    stack.smtp.handler.transient_first_attempt = True
    stack.smtp.handler.on_first_attempt = choke
    worker = stack.start_worker(**OOM_ENV)
    stack.submit()
    try:
        stack.wait(lambda: len(stack.smtp.handler.attempts) == 6, 40, "a first attempt of each email", worker)

        def sent_once() -> str | None:
            bad = {m: n for m, n in stack.smtp.handler.received.items() if n != 1}
            missing = 6 - len(stack.smtp.handler.received)
            return f"received counts {bad}, {missing} never received" if bad or missing else None

        def refused_then_sent_once() -> str | None:
            if not worker_log_events(worker, "task.retry_refused"):
                return "no retry publish was refused: the fault did not hit"
            return sent_once()

        stack.finish(
            timeout=45,
            check=refused_then_sent_once,
            note=f"broker full {sum(1 for c in chokes if c > 0)} times, "
            f"{len(worker_log_events(worker, 'task.retry_refused'))} retries refused",
        )
    finally:
        for timer in restore_timers:
            timer.join()


def test_broker_paused(stack):
    stack.fault = "broker paused (CLIENT PAUSE 6 s ALL)"
    heartbeat_every_second()
    stack.start_worker()
    stack.start_beat()
    stack.wait(lambda: heartbeats(stack) >= 1, 30, "a first heartbeat")
    stack.smtp.handler.rcpt_delay = 0.3
    stack.submit(3, 2)
    stack.broker.pause(6000)
    paused_until = time.monotonic() + 6
    stack.submit(3, 2, tag="-late")  # publishes wait for the pause to end
    time.sleep(max(paused_until - time.monotonic(), 0))
    stack.finish(timeout=40, check=heartbeats_resume(stack, heartbeats(stack)))


def test_broker_restarted_empty(stack):
    stack.fault = "broker restarted empty"
    batch = stack.submit()  # no worker yet: the messages wait in Redis
    assert stack.broker.queued() == batch.accepted
    stack.broker.restart_empty()
    reset_broker_pools()
    assert stack.broker.queued() == 0
    worker = stack.start_worker()

    def generated_once() -> str | None:
        runs = Counter(line.get("image_id") for line in worker_log_events(worker, "thumbnails.generated"))
        bad = {pk: runs[pk] for pk in batch.images if runs[pk] != 1}
        return f"thumbnails generated (image id: runs) {bad}" if bad else None

    stack.finish(timeout=30, check=generated_once)


# --- 6, 7, 8. processes killed ----------------------------------------------------------------


def test_pool_process_killed_on_every_delivery(stack):
    stack.fault = "pool process killed on every delivery of one task"
    batch = stack.submit()  # waits in Redis until the worker starts
    poison = batch.images[0]
    client = stack.broker.client()
    client.sadd(POISON_KEY, str(poison))
    worker = stack.start_worker(
        include=["tests.faults.pool_killer"], JOBS_WORKER_LOST_LIMIT="3", CELERY_VISIBILITY_TIMEOUT="8"
    )

    def three_losses() -> str | None:
        kills = client.llen(POISON_LOG_KEY)
        if kills != 3:
            ledger = OutboxMessage.objects.filter(task_name=THUMBNAILS, args=[poison]).first()
            counted = cache.get(crashloop.KEY.format(ledger.task_id)) if ledger else "(no ledger row)"
            return (
                f"the poison image killed {kills} pool processes (JOBS_WORKER_LOST_LIMIT=3); "
                f"its quarantine counter {crashloop.KEY.format('<task id>')} holds {counted}"
            )
        return None if worker.alive() else "the worker's main process exited"

    stack.finish(
        timeout=45,
        expected=[ExpectedDeadLetter(THUMBNAILS, (poison,), DeadLetter.Reason.WORKER_LOST)],
        check=three_losses,
    )


def test_worker_killed_mid_batch(stack):
    stack.fault = "worker SIGKILLed mid-batch"
    env = {"CELERY_VISIBILITY_TIMEOUT": "8", "MAILER_SENDING_LEASE_SECONDS": "3"}
    # Slow before DATA, never after it: a client killed after the server accepted DATA and before
    # it recorded `sent` cannot know the message went out, and SMTP gives it no way to avoid
    # sending it again (the same Message-ID lets the receiving side drop the copy). Killed
    # while waiting for RCPT replies, nothing was delivered and the new worker sends each once.
    stack.smtp.handler.rcpt_delay = 2.0
    first = stack.start_worker(**env)
    stack.submit()
    stack.wait(lambda: stack.smtp.handler.rcpt_active >= 2, 30, "two emails waiting in RCPT", first)
    stack.kill(first)
    stack.smtp.handler.rcpt_delay = 0.1
    stack.start_worker(**env)
    stack.finish(timeout=45)


def test_beat_killed(stack):
    stack.fault = "beat SIGKILLed while jobs flow"
    heartbeat_every_second()
    stack.start_worker()
    beat = stack.start_beat()
    stack.wait(lambda: heartbeats(stack) >= 2, 30, "heartbeats from the first beat", beat)
    stack.smtp.handler.rcpt_delay = 0.3
    stack.submit()
    stack.kill(beat)
    before = heartbeats(stack)
    stack.start_beat()  # leads once the dead beat's lock expires (JOBS_BEAT_LOCK_TTL=3)
    stack.finish(timeout=40, check=heartbeats_resume(stack, before))


# --- 9. the web -------------------------------------------------------------------------------


def test_cross_site_form_post_with_basic_credentials(stack):
    stack.fault = "cross-site form post with Basic credentials"
    grant(get_user_model().objects.create_user("ops", password="s3cret-ops-pass", is_staff=True))
    stack.start_worker()
    _web, base = stack.start_web()
    auth = ("ops", "s3cret-ops-pass")
    body = json.dumps({"template": "welcome", "to": ["victim@example.com"], "context": {"name": "Eve"}})
    # A form on another site can send this: text/plain, and the browser adds the cached Basic credentials.
    form = requests.post(
        f"{base}/api/emails/", data=body, headers={"Content-Type": "text/plain"}, auth=auth, timeout=10
    )
    evil = requests.post(
        f"{base}/api/emails/",
        data=body,
        headers={"Content-Type": "application/json", "Origin": "https://evil.example"},
        auth=auth,
        timeout=10,
    )
    refused_emails = Email.objects.count()
    # The control: the same credentials from a script (no Origin) are accepted and the email goes out.
    script = requests.post(
        f"{base}/api/emails/",
        data=body.replace("Eve", "Ops"),
        headers={"Content-Type": "application/json"},
        auth=auth,
        timeout=10,
    )
    if script.status_code == 202:
        stack.batch.emails.append(script.json()["id"])

    def refused() -> str | None:
        problems = []
        if form.status_code != 415:
            problems.append(f"text/plain form post answered {form.status_code} {form.text[:100]}")
        if evil.status_code != 403:
            problems.append(f"Origin https://evil.example answered {evil.status_code} {evil.text[:100]}")
        if refused_emails:
            problems.append(f"{refused_emails} email(s) created by the refused requests")
        if script.status_code != 202:
            problems.append(f"the control request answered {script.status_code} {script.text[:100]}")
        strays = Email.objects.exclude(pk__in=stack.batch.emails).count()
        if strays or len(stack.smtp.handler.received) > len(stack.batch.emails):
            problems.append(f"{strays} stray email(s), {len(stack.smtp.handler.received)} message(s) received")
        return "; ".join(problems) or None

    stack.finish(timeout=20, check=refused, note=f"{form.status_code} / {evil.status_code}; control sent")
