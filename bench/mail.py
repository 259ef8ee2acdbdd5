"""Emails per second through one worker process to a local SMTP server, with and without reusing
the SMTP connection.

    python bench/mail.py [--quick] [--emails N]

For each mode a worker (`-Q high -c 1`, so one process sends everything) starts against a private
Redis, a scratch database and an aiosmtpd server in this process. After N/2 warm-up emails,
N emails are stored and their tasks published at once (one transaction, so every task is
published on commit); the rate is N over the time from that commit to the last `sent_at`.
The full pipeline is measured: task delivery, the claim and the `sent` record in the database,
the result backend, and the SMTP conversation.

A second table times the hand-off alone (`mailer.backend.deliver` in this process, no broker or
database), which is where reusing the connection saves its time.

- reuse:    MAILER_REUSE_CONNECTION=true, one SMTP session per worker process (the default)
- no reuse: MAILER_REUSE_CONNECTION=false, connect + EHLO + QUIT for every email
On localhost a connection costs little; over a network with STARTTLS and AUTH the gap grows.
"""

from __future__ import annotations

import os
import sys

# Run as a script, sys.path[0] is bench/, where the scripts would shadow the standard
# library's `email` package (smtplib and Django import it): put the project root there instead.
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if sys.path and os.path.abspath(sys.path[0] or ".") == os.path.join(ROOT, "bench"):
    sys.path[0] = ROOT
elif ROOT not in sys.path:
    sys.path.insert(0, ROOT)

import argparse  # noqa: E402
import socket  # noqa: E402
import threading  # noqa: E402
import time  # noqa: E402

from bench.common import Environment, Worker, emit, positive_int, table  # noqa: E402

MODES = (("reuse", "true"), ("no reuse", "false"))


class Counter:
    """aiosmtpd handler that counts sessions (EHLO) and messages, and keeps nothing."""

    def __init__(self) -> None:
        self.connections = 0
        self.messages = 0
        self._lock = threading.Lock()

    async def handle_EHLO(self, server, session, envelope, hostname, responses):
        with self._lock:
            self.connections += 1
        session.host_name = hostname
        return responses

    async def handle_DATA(self, server, session, envelope):
        with self._lock:
            self.messages += 1
        return "250 2.0.0 OK: queued"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def wait_sent(ids: list[int], timeout: float) -> None:
    from mailer.models import Email

    deadline = time.monotonic() + timeout
    while Email.objects.filter(pk__in=ids, status=Email.Status.SENT).count() < len(ids):
        failed = Email.objects.filter(pk__in=ids, status=Email.Status.FAILED).first()
        if failed is not None:
            raise RuntimeError(f"email {failed.pk} failed: {failed.last_error}")
        if time.monotonic() > deadline:
            raise RuntimeError("emails not sent in time")
        time.sleep(0.02)


def queue_batch(count: int) -> tuple[list[int], float]:
    """Stores `count` emails and publishes their tasks together; returns their ids and the wall
    clock time of the commit that published them."""
    from django.db import transaction

    from mailer.services import email_queue

    with transaction.atomic():
        ids = [
            email_queue(template="welcome", to=[f"user{i}@example.com"], context={"name": f"User {i}"}).pk
            for i in range(count)
        ]
        committed_at = time.time()
    return ids, committed_at


def run_mode(reuse: str, smtp_url: str, handler: Counter, count: int) -> dict:
    from django.db.models import Max

    from mailer.models import Email

    worker = Worker(
        queues="high",
        concurrency=1,
        extra_env={
            "EMAIL_URL": smtp_url,
            "MAILER_REUSE_CONNECTION": reuse,
            "MAILER_CONNECTION_MAX_MESSAGES": str(2 * count + 10),
            "CELERY_SHUTDOWN_TIMEOUT": "1",  # an idle worker otherwise waits the whole soft shutdown
            "DEAD_LETTER_ALERT_EMAILS": "",
        },
    ).start()
    try:
        # A warm-up batch half the size of the measured one: the first batch of a run is slower
        # whatever the mode (the scratch database growing), which would favour the second mode.
        warm, _ = queue_batch(max(1, count // 2))
        wait_sent(warm, timeout=60 + count)
        connections, messages = handler.connections, handler.messages
        ids, started = queue_batch(count)
        wait_sent(ids, timeout=60 + count)
        last = Email.objects.filter(pk__in=ids).aggregate(last=Max("sent_at"))["last"].timestamp()
    finally:
        worker.stop()
    seconds = max(last - started, 1e-6)
    return {
        "seconds": seconds,
        "rate": count / seconds,
        "connections": handler.connections - connections,
        "messages": handler.messages - messages,
    }


def run_handoff(reuse: bool, port: int, handler: Counter, count: int) -> dict:
    """`count` messages through `mailer.backend.deliver` in this process."""
    from django.core.mail import EmailMultiAlternatives
    from django.test import override_settings

    from mailer import backend

    email_settings = {
        "EMAIL_BACKEND": "django.core.mail.backends.smtp.EmailBackend",
        "EMAIL_HOST": "127.0.0.1",
        "EMAIL_PORT": port,
        "EMAIL_USE_TLS": False,
        "EMAIL_USE_SSL": False,
        "MAILER_REUSE_CONNECTION": reuse,
        "MAILER_CONNECTION_MAX_MESSAGES": count + 10,
    }
    with override_settings(**email_settings):
        connections = handler.connections
        started = time.perf_counter()
        for i in range(count):
            message = EmailMultiAlternatives("Hello", "text body\n", "noreply@localhost", [f"user{i}@example.com"])
            message.attach_alternative("<p>html body</p>", "text/html")
            backend.deliver(message)
        seconds = time.perf_counter() - started
        backend.close_connection()
    return {"seconds": seconds, "rate": count / seconds, "connections": handler.connections - connections}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="a short run (well under 20 s)")
    parser.add_argument("--emails", type=positive_int, help="emails per mode (default 300, 60 with --quick)")
    args = parser.parse_args()
    count = args.emails or (60 if args.quick else 300)

    from aiosmtpd.controller import Controller

    with Environment() as env:
        env.django()
        handler = Counter()
        port = free_port()
        controller = Controller(handler, hostname="127.0.0.1", port=port)
        controller.start()
        try:
            results = {name: run_mode(reuse, f"smtp://127.0.0.1:{port}", handler, count) for name, reuse in MODES}
            handoffs = {name: run_handoff(reuse == "true", port, handler, count * 2) for name, reuse in MODES}
        finally:
            controller.stop()

    rows = [["mode", "emails", "seconds", "emails/s", "new SMTP connections", "received"]]
    for name, _ in MODES:
        r = results[name]
        rows.append([name, str(count), f"{r['seconds']:.2f}", f"{r['rate']:.1f}", str(r["connections"]),
                     str(r["messages"])])  # fmt: skip
    print(f"Emails through one worker process (-c 1) to a local aiosmtpd server, {count} per mode")
    print(table(rows))
    reuse, fresh = results["reuse"], results["no reuse"]
    print(f"connection reuse: {reuse['rate'] / fresh['rate']:.2f}x the rate of a connection per email")
    print()
    rows = [["hand-off only", "emails", "seconds", "emails/s", "new SMTP connections"]]
    for name, _ in MODES:
        r = handoffs[name]
        rows.append([name, str(count * 2), f"{r['seconds']:.2f}", f"{r['rate']:.1f}", str(r["connections"])])
    print(table(rows))
    hand_reuse, hand_fresh = handoffs["reuse"], handoffs["no reuse"]
    print(f"connection reuse: {hand_reuse['rate'] / hand_fresh['rate']:.2f}x the hand-off rate")
    emit("email", "emails/s through a worker (reuse vs connection per email)", reuse["rate"], fresh["rate"], "emails/s")
    emit("email", "SMTP hand-offs/s (reuse vs connection per email)", hand_reuse["rate"], hand_fresh["rate"],
         "emails/s")  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
