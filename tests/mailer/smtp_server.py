"""A real SMTP server (aiosmtpd) in a thread, keeping what it receives; it can be told to answer
with an error, like a server that is greylisting or full."""

from __future__ import annotations

import asyncio
import email
import socket
import threading
from email.message import EmailMessage
from email.policy import default

from aiosmtpd.controller import Controller


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class Handler:
    def __init__(self) -> None:
        self.messages: list[EmailMessage] = []
        self.envelopes: list[tuple[str, list[str]]] = []
        self.connections = 0  # SMTP sessions that said EHLO (one per client connection)
        self.data_reply: str | None = None  # e.g. "451 4.3.0 try again later"
        self.rcpt_reply: str | None = None  # e.g. "550 5.1.1 no such user"
        self.rcpt_delay = 0.0  # seconds the first RCPT of the run waits (a slow server, mid hand-off)
        self.rcpt_started = threading.Event()  # set when a RCPT arrives
        self._lock = threading.Lock()

    async def handle_EHLO(self, server, session, envelope, hostname, responses):
        with self._lock:
            self.connections += 1
        session.host_name = hostname
        return responses

    async def handle_RCPT(self, server, session, envelope, address, rcpt_options):
        self.rcpt_started.set()
        if self.rcpt_delay:
            delay, self.rcpt_delay = self.rcpt_delay, 0.0
            await asyncio.sleep(delay)
        if self.rcpt_reply:
            return self.rcpt_reply
        envelope.rcpt_tos.append(address)
        return "250 OK"

    async def handle_DATA(self, server, session, envelope):
        if self.data_reply:
            return self.data_reply
        with self._lock:
            self.messages.append(email.message_from_bytes(envelope.content, policy=default))
            self.envelopes.append((envelope.mail_from, list(envelope.rcpt_tos)))
        return "250 2.0.0 OK: queued"


class SMTPServer:
    """`with SMTPServer() as server:` listens on `server.port` until the block ends."""

    def __init__(self) -> None:
        self.handler = Handler()
        self.port = free_port()
        self.controller = Controller(self.handler, hostname="127.0.0.1", port=self.port)

    @property
    def url(self) -> str:
        return f"smtp://127.0.0.1:{self.port}"

    @property
    def messages(self) -> list[EmailMessage]:
        return self.handler.messages

    def start(self) -> SMTPServer:
        self.controller.start()
        return self

    def stop(self) -> None:
        self.controller.stop()

    def __enter__(self) -> SMTPServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
