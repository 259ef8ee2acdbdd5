"""The real process stack of one fault scenario, and the bookkeeping of what became of its jobs.

One `Stack` per scenario: a private Redis (its own port, so CONFIG SET, CLIENT PAUSE and restarts
never touch the suite's shared Redis), a recording SMTP server, and the project's processes
(worker, beat, web) started as an operator starts them, with fast-recovery settings in their
environment. `Stack.submit()` accepts a batch of real jobs through the services the site uses;
`Stack.finish()` waits for them, computes the scenario's row of the reliability table and asserts
the promise (nothing lost, nothing stuck, no email twice, no process dead of the fault).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import socket
import time
from collections import Counter
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from email.parser import BytesHeaderParser
from email.policy import default as default_policy
from pathlib import Path

import psutil
import redis
from aiosmtpd.controller import Controller

from devtools.localredis import LocalRedis
from jobs.models import DeadLetter, OutboxMessage
from mailer.models import Email
from mailer.services import email_queue
from tests.integration.conftest import ServiceProcess, WorkerProcess
from tests.mailer.smtp_server import Handler, SMTPServer, free_port
from tests.thumbnails import images as pictures
from thumbnails.models import Image
from thumbnails.services import image_create

#: What every process of a scenario gets: recovery in seconds instead of minutes.
FAST_ENV = {
    "JOBS_LEDGER_SWEEP_INTERVAL": "1",
    "JOBS_LEDGER_LOST_AFTER": "2",
    "JOBS_LEDGER_MISSING_GRACE": "1",
    "TASK_RETRY_BACKOFF_BASE": "1",
    "TASK_RETRY_BACKOFF_MAX": "2",
    "JOBS_BEAT_LOCK_TTL": "3",
    "EMAIL_TIMEOUT": "5",
    "DEAD_LETTER_ALERT_EMAILS": "",
    "CELERY_SHUTDOWN_TIMEOUT": "1",
    "WORKER_METRICS_PORT": "0",
}
QUEUES = ("high", "normal", "low")
BEAT = ["celery", "-A", "config", "beat", "--loglevel", "INFO"]
UNRECOVERABLE = "Unrecoverable error"


# --- the SMTP server ----------------------------------------------------------------------------


class FaultSMTPHandler(Handler):
    """Records every message it accepts by its Message-ID. It can be slow before DATA (in RCPT)
    and answer 451 to the first DATA of each Message-ID, calling `on_first_attempt` first."""

    def __init__(self) -> None:
        super().__init__()
        self.received: Counter[str] = Counter()  # Message-ID -> accepted DATA commands
        self.attempts: Counter[str] = Counter()  # Message-ID -> DATA commands, accepted or not
        self.rcpt_delay = 0.0
        self.rcpt_active = 0  # sessions waiting in the slow RCPT right now
        self.transient_first_attempt = False
        self.on_first_attempt: Callable[[str], None] | None = None

    async def handle_RCPT(self, server, session, envelope, address, rcpt_options):
        with self._lock:
            self.rcpt_active += 1
        try:
            if self.rcpt_delay:
                await asyncio.sleep(self.rcpt_delay)
        finally:
            with self._lock:
                self.rcpt_active -= 1
        return await super().handle_RCPT(server, session, envelope, address, rcpt_options)

    async def handle_DATA(self, server, session, envelope):
        headers = BytesHeaderParser(policy=default_policy).parsebytes(envelope.content)
        message_id = str(headers.get("Message-ID", "")).strip()
        with self._lock:
            self.attempts[message_id] += 1
            first = self.attempts[message_id] == 1
        if self.transient_first_attempt and first:
            if self.on_first_attempt is not None:
                self.on_first_attempt(message_id)
            return "451 4.3.0 Temporary local problem, try again later"
        reply = await super().handle_DATA(server, session, envelope)
        if reply.startswith("250"):
            with self._lock:
                self.received[message_id] += 1
        return reply


class FaultSMTPServer(SMTPServer):
    def __init__(self) -> None:
        self.handler = FaultSMTPHandler()
        self.port = free_port()
        self.controller = Controller(self.handler, hostname="127.0.0.1", port=self.port)


# --- the private broker -------------------------------------------------------------------------


class PrivateRedis:
    """A `LocalRedis` of one scenario, with the faults a broker can have."""

    def __init__(self) -> None:
        self.server = LocalRedis().start()

    @property
    def url(self) -> str:
        return self.server.url

    def client(self, timeout: float = 5.0) -> redis.Redis:
        return redis.Redis.from_url(self.url, socket_timeout=timeout, socket_connect_timeout=timeout)

    def used_memory(self) -> int:
        return int(self.client().info("memory")["used_memory"])

    def set_maxmemory(self, limit: int) -> None:
        """0 lifts the limit; with `noeviction` every write that needs memory is refused (OOM)
        while used memory is above `limit`."""
        client = self.client()
        client.config_set("maxmemory-policy", "noeviction")
        client.config_set("maxmemory", str(limit))

    def pause(self, milliseconds: int) -> None:
        """CLIENT PAUSE ... ALL: every client's every command waits (from a connection of its own)."""
        client = self.client()
        client.execute_command("CLIENT", "PAUSE", str(milliseconds), "ALL")
        client.close()

    def queued(self) -> int:
        """Messages waiting in the three queues (all priority steps)."""
        client = self.client()
        total = 0
        for key in client.scan_iter(count=1000):
            name = key.decode(errors="replace")
            if name.split("\x06", 1)[0] in QUEUES and client.type(key) == b"list":
                total += client.llen(key)
        return total

    def holdings(self) -> dict[str, set[str]]:
        """Task ids the broker holds, by where: `queued`, `unacked` (delivered, not acknowledged;
        Redis gives them back after the visibility timeout) and `reserved` (the workers' own
        lists, which the ledger sweeper also counts as present)."""
        from jobs.runtime.ledger import RESERVED_KEY
        from jobs.runtime.ledger import message_ids as _ids

        client = self.client(timeout=1)
        held: dict[str, set[str]] = {"queued": set(), "unacked": set(), "reserved": set()}
        for key in client.scan_iter(count=1000):
            name = key.decode(errors="replace")
            if name.split("\x06", 1)[0] in QUEUES and client.type(key) == b"list":
                held["queued"] |= _ids(client.lrange(key, 0, -1))
        held["unacked"] = _ids(client.hvals("unacked"))
        for raw in client.hvals(RESERVED_KEY):  # one field per worker: {"at", "ids"}
            held["reserved"] |= {str(item) for item in json.loads(raw).get("ids", [])}
        return held

    def restart_empty(self) -> None:
        """Stops the server (it keeps nothing on disk) and starts a new one on the same port."""
        port = self.server.port
        self.server.stop()
        self.server = LocalRedis(port=port).start()

    def stop(self) -> None:
        self.server.stop()


# --- processes ----------------------------------------------------------------------------------


@dataclass
class Proc:
    """A process of the stack; `stopped_by_test` once the scenario stopped or killed it."""

    role: str
    handle: WorkerProcess | ServiceProcess
    stopped_by_test: bool = False

    @property
    def popen(self):
        return self.handle.process

    def log(self) -> str:
        return self.handle.log()

    def alive(self) -> bool:
        return self.popen is not None and self.popen.poll() is None

    def died(self) -> str | None:
        """Why this process counts as died of the fault, or None."""
        if not self.stopped_by_test and self.popen is not None and self.popen.poll() is not None:
            return f"{self.role} pid {self.popen.pid} exited with {self.popen.returncode}"
        if UNRECOVERABLE in self.log():
            return f"{self.role} pid {self.popen.pid} logged {UNRECOVERABLE!r}"
        return None


# --- jobs and the table -------------------------------------------------------------------------


@dataclass
class Batch:
    emails: list[int] = field(default_factory=list)
    images: list[int] = field(default_factory=list)

    @property
    def accepted(self) -> int:
        return len(self.emails) + len(self.images)

    def extend(self, other: Batch) -> Batch:
        self.emails += other.emails
        self.images += other.images
        return self


@dataclass
class Row:
    """One line of the reliability table."""

    fault: str
    accepted: int = 0
    done: int = 0
    dead_lettered: int = 0
    lost: int = 0
    stuck: int = 0
    sent_twice: int = 0
    died: int = 0
    seconds: float = 0.0
    passed: bool | None = None
    note: str = ""

    HEADER = ("fault", "accepted", "done", "dead-lettered", "lost", "stuck", "sent twice", "died", "s", "result")

    def cells(self) -> tuple[str, ...]:
        result = {True: "pass", False: "**FAIL**", None: "error"}[self.passed]
        if self.note:
            result = f"{result}: {self.note}"
        counts = (self.accepted, self.done, self.dead_lettered, self.lost, self.stuck, self.sent_twice, self.died)
        return (self.fault, *(str(n) for n in counts), f"{self.seconds:.0f}", result)


def markdown_table(rows: Iterable[Row]) -> str:
    lines = ["| " + " | ".join(Row.HEADER) + " |", "|" + "|".join("---" for _ in Row.HEADER) + "|"]
    lines += ["| " + " | ".join(cell.replace("|", "\\|") for cell in row.cells()) + " |" for row in rows]
    return "\n".join(lines) + "\n"


@dataclass(frozen=True)
class ExpectedDeadLetter:
    """A dead letter a scenario causes on purpose (its poison, its unknown task)."""

    task_name: str
    args: tuple
    reason: str


# --- the stack ----------------------------------------------------------------------------------


class Stack:
    """Everything one scenario runs; see the module's docstring."""

    def __init__(self, *, broker: PrivateRedis, smtp: FaultSMTPServer, tmp_path: Path, media_root: Path) -> None:
        self.broker = broker
        self.smtp = smtp
        self.tmp_path = tmp_path
        self.media_root = media_root
        self.procs: list[Proc] = []
        self.fault = ""
        self.batch = Batch()
        self.row: Row | None = None
        self.started = time.monotonic()

    # processes

    def env(self, **extra: str) -> dict[str, str]:
        return {
            **FAST_ENV,
            "REDIS_URL": self.broker.url,
            "CELERY_BROKER_URL": self.broker.url,
            "EMAIL_URL": self.smtp.url,
            "MEDIA_ROOT": str(self.media_root),
            "LIVENESS_DIR": str(self.tmp_path / "run"),
            **extra,
        }

    def start_worker(self, include: Iterable[str] = (), **extra_env: str) -> Proc:
        modules = ",".join(["tests.integration.tasks", *include])
        handle = WorkerProcess(
            self.tmp_path / f"worker-{len(self.procs)}.log",
            concurrency=2,
            extra_env=self.env(**extra_env),
            extra_args=["-I", modules],  # the last -I wins: name every module here
        )
        proc = Proc("worker", handle)
        self.procs.append(proc)
        handle.start(timeout=60)
        return proc

    def start_service(self, role: str, args: list[str], **extra_env: str) -> Proc:
        log = self.tmp_path / f"{role}-{len(self.procs)}.log"
        proc = Proc(role, ServiceProcess(args, log, self.env(**extra_env)))
        self.procs.append(proc)
        proc.handle.start()
        return proc

    def start_beat(self, **extra_env: str) -> Proc:
        beat = self.start_service("beat", BEAT, **extra_env)
        self.wait(lambda: '"beat.leading"' in beat.log() or not beat.alive(), 30, "beat leading", beat)
        assert beat.alive(), self.describe("beat exited at start")
        return beat

    def start_web(self) -> tuple[Proc, str]:
        import requests

        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            port = sock.getsockname()[1]
        web = self.start_service(
            "web",
            ["gunicorn", "config.wsgi", "--bind", f"127.0.0.1:{port}", "--workers", "1", "--no-control-socket"],
        )
        base = f"http://127.0.0.1:{port}"

        def up() -> bool:
            if not web.alive():
                return True
            with contextlib.suppress(requests.ConnectionError):
                return requests.get(f"{base}/healthz", timeout=5).status_code == 200
            return False

        self.wait(up, 30, "web answering /healthz", web)
        assert web.alive(), self.describe("web exited at start")
        return web, base

    def kill(self, proc: Proc) -> None:
        """SIGKILL to the process and all its children at once, as a machine crash does."""
        proc.stopped_by_test = True
        parent = psutil.Process(proc.popen.pid)
        for process in [*parent.children(recursive=True), parent]:
            with contextlib.suppress(psutil.NoSuchProcess):
                process.kill()
        proc.popen.wait(timeout=10)

    def stop_all(self) -> None:
        for proc in reversed(self.procs):
            if proc.alive():
                proc.stopped_by_test = True
            proc.handle.stop()

    # jobs

    def submit(self, emails: int = 6, images: int = 4, *, tag: str = "") -> Batch:
        """Accepts `emails` emails and `images` real JPEG images through the site's services
        (each published on commit and kept in the ledger); returns their ids."""
        batch = Batch()
        start = len(self.batch.emails)
        for n in range(start, start + emails):
            email = email_queue(template="welcome", to=[f"user{n}{tag}@example.com"], context={"name": f"User {n}"})
            batch.emails.append(email.pk)
        for n in range(images):
            image = image_create(upload=pictures.upload(pictures.jpeg((320 + 16 * n, 240)), f"photo-{n}.jpg"))
            batch.images.append(image.pk)
        self.batch.extend(batch)
        return batch

    def _dead_letters(self) -> dict[tuple[str, str], DeadLetter]:
        rows = {}
        for row in DeadLetter.objects.all():
            first = row.args[0] if isinstance(row.args, list) and row.args else None
            rows[(row.task_name, json.dumps(first))] = row
        return rows

    def _ledger(self) -> dict[tuple[str, str], OutboxMessage]:
        return {
            (row.task_name, json.dumps(row.args[0] if row.args else None)): row for row in OutboxMessage.objects.all()
        }

    def job_states(self) -> list[dict]:
        """Every job of the batch: kind, id, status, and what the ledger and dead letters hold."""
        letters, ledger = self._dead_letters(), self._ledger()
        emails = {e.pk: e for e in Email.objects.filter(pk__in=self.batch.emails)}
        pics = {i.pk: i for i in Image.objects.filter(pk__in=self.batch.images)}
        states = []
        for kind, task, ids, rows in (
            ("email", "mailer.send_email", self.batch.emails, emails),
            ("image", "thumbnails.generate", self.batch.images, pics),
        ):
            for pk in ids:
                row = rows.get(pk)
                status = row.status if row is not None else "<deleted>"
                error = (row.last_error if kind == "email" else row.error) if row is not None else ""
                received = self.smtp.handler.received.get(row.message_id, 0) if kind == "email" and row else None
                states.append(
                    {
                        "kind": kind,
                        "id": pk,
                        "status": status,
                        "error": error,
                        "received": received,
                        "message_id": getattr(row, "message_id", None),
                        "dead_letter": letters.get((task, json.dumps(pk))),
                        "ledger": ledger.get((task, json.dumps(pk))),
                    }
                )
        return states

    @staticmethod
    def _done(state: dict) -> bool:
        return state["status"] in ("sent", "done")

    @staticmethod
    def _failed(state: dict) -> bool:
        return state["status"] == "failed"

    def settled(self) -> bool:
        return all(self._done(s) or (self._failed(s) and s["dead_letter"]) for s in self.job_states())

    def tally(self) -> Row:
        row = Row(fault=self.fault, accepted=self.batch.accepted, seconds=time.monotonic() - self.started)
        for state in self.job_states():
            if self._done(state):
                if state["kind"] == "email" and not state["received"]:
                    row.lost += 1  # marked sent, but the server never got it
                else:
                    row.done += 1
            elif self._failed(state):
                if state["dead_letter"] is None:
                    row.lost += 1  # failed with nothing to replay it from
            else:
                row.stuck += 1
                if state["ledger"] is None:
                    row.lost += 1
        row.dead_lettered = DeadLetter.objects.count()
        row.sent_twice = sum(1 for count in self.smtp.handler.received.values() if count > 1)
        row.died = sum(1 for proc in self.procs if proc.died())
        return row

    # waiting and reporting

    def wait(self, predicate: Callable[[], object], timeout: float, what: str, *procs: Proc) -> object:
        """Polls `predicate` for up to `timeout` seconds; fails with the stack's state otherwise."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            value = predicate()
            if value:
                return value
            time.sleep(0.2)
        raise AssertionError(self.describe(f"not within {timeout:.0f} s: {what}", procs or None))

    def finish(
        self,
        *,
        timeout: float,
        expected: Iterable[ExpectedDeadLetter] = (),
        check: Callable[[], str | None] = lambda: None,
        note: str = "",
    ) -> Row:
        """Waits up to `timeout` s for every job to end, for exactly the `expected` dead letters
        and for the scenario's own `check()` (None when it holds, else what is wrong); records the
        row and asserts: nothing lost, stuck, sent twice or died, and the checks hold."""
        expected = set(expected)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.settled():
                letters = self._letters()
                if letters > expected or (letters == expected and check() is None):
                    break  # done, or an unexpected dead letter that waiting cannot take back
            time.sleep(0.25)
        row = self.tally()
        counts = {"lost": row.lost, "stuck": row.stuck, "sent twice": row.sent_twice, "died": row.died}
        problems = [f"{name}={count}" for name, count in counts.items() if count]
        letters = self._letters()
        for label, differ in (("unexpected", letters - expected), ("missing", expected - letters)):
            if differ:
                listed = ", ".join(sorted(f"{d.task_name}{list(d.args)} {d.reason}" for d in differ))
                problems.append(f"{label} dead letters: {listed}")
        failed_check = check()
        if failed_check:
            problems.append(failed_check)
        row.passed = not problems
        row.note = note if row.passed else "; ".join(problems)
        self.row = row
        assert row.passed, self.describe(f"{self.fault}: {row.note}", expected=expected)
        return row

    @staticmethod
    def _letters() -> set[ExpectedDeadLetter]:
        rows = DeadLetter.objects.all()
        return {ExpectedDeadLetter(row.task_name, tuple(row.args or ()), row.reason) for row in rows}

    def describe(self, headline: str, procs: Iterable[Proc] | None = None, expected=()) -> str:
        """A failure message that says what happened: jobs by state, dead letters, ledger rows,
        duplicate deliveries, processes, and the tails of their logs."""
        out = [headline, "", "jobs:"]
        try:
            held = self.broker.holdings()
        except Exception as exc:  # noqa: BLE001 - a broker that is down or paused says so here
            held = {}
            out.insert(1, f"(the broker could not be read: {type(exc).__name__}: {exc})")
        for s in self.job_states():
            ledger = s["ledger"]
            ledger_text = (
                "none"
                if ledger is None
                else f"published_at={ledger.published_at} attempts={ledger.attempts} retries={ledger.retries} "
                f"not_before={ledger.not_before} missing_since={ledger.missing_since} "
                f"republished={ledger.republished} last_error={ledger.last_error[:120]!r} "
                f"broker={[where for where, ids in held.items() if ledger.task_id in ids] or 'nowhere'}"
            )
            letter = s["dead_letter"]
            letter_text = f"{letter.reason}/{letter.exception_type}" if letter else "none"
            received = f" received={s['received']}" if s["kind"] == "email" else ""
            out.append(
                f"  {s['kind']} {s['id']}: {s['status']}{received} dead_letter={letter_text} ledger={ledger_text}"
                + (f" error={s['error'][:160]!r}" if s["error"] else "")
            )
        out.append("dead letters:")
        for row in DeadLetter.objects.order_by("pk"):
            out.append(
                f"  {row.task_name} args={row.args} reason={row.reason} {row.exception_type}: "
                f"{row.exception_message[:160]!r}"
            )
        if expected:
            out.append(f"  expected: {sorted((e.task_name, e.args, e.reason) for e in expected)}")
        other_ledger = OutboxMessage.objects.exclude(task_name__in=["mailer.send_email", "thumbnails.generate"])
        for row in other_ledger:
            out.append(f"  ledger row {row.task_name} {row.args} published_at={row.published_at}")
        twice = {mid: n for mid, n in self.smtp.handler.received.items() if n > 1}
        out.append(f"SMTP: {sum(self.smtp.handler.received.values())} accepted, received more than once: {twice}")
        for proc in procs if procs is not None else self.procs:
            state = "alive" if proc.alive() else f"exited {proc.popen.returncode if proc.popen else None}"
            out.append(f"--- {proc.role} pid {proc.popen.pid if proc.popen else None} ({state}) {proc.died() or ''}")
            out.extend("    " + line[:400] for line in log_tail(proc.log()))
        return "\n".join(out)


def log_tail(text: str, problems: int = 25, last: int = 15) -> list[str]:
    """The last warning/error lines of a JSON log, then its last lines."""
    lines = [line for line in text.splitlines() if line.strip()]
    noted = [
        line
        for line in lines
        if any(f'"level": "{level}"' in line for level in ("WARNING", "ERROR", "CRITICAL"))
        or UNRECOVERABLE in line
        or "Traceback" in line
    ]
    return [*(["(warnings and errors)"] if noted else []), *noted[-problems:], "(last lines)", *lines[-last:]]
