"""Hands messages to the configured Django email backend, reusing one connection per process.

Opening an SMTP session (TCP, EHLO, STARTTLS, AUTH) or an HTTPS session to a provider costs more
than sending one message through it, so a worker process keeps one backend connection open and
sends every email it handles through it. The connection is dropped and opened again:

- after any error while sending (the session may be in an unknown state);
- when it has been idle longer than `MAILER_CONNECTION_MAX_IDLE` seconds (servers close idle
  sessions, and a message must not be the one that finds out);
- after `MAILER_CONNECTION_MAX_MESSAGES` messages (servers cap messages per session);
- when the email settings changed, or in a child process forked after it was opened.

`MAILER_REUSE_CONNECTION=false` opens a connection per message (the benchmark compares both).
"""

from __future__ import annotations

import logging
import os
import threading
import time
from dataclasses import dataclass

from django.conf import settings
from django.core.mail import EmailMessage, get_connection
from django.core.mail.backends.base import BaseEmailBackend

from jobs.exceptions import PermanentError

logger = logging.getLogger("mailer.backend")

_local = threading.local()


@dataclass
class _Held:
    connection: BaseEmailBackend
    key: tuple
    pid: int
    last_used: float
    messages: int = 0


#: Connections opened by this process, for the benchmark and tests.
stats = {"opened": 0}


def _settings_key() -> tuple:
    """What the connection was opened with; a change (tests, a reload) means a new one."""
    return (
        settings.EMAIL_BACKEND,
        getattr(settings, "EMAIL_HOST", None),
        getattr(settings, "EMAIL_PORT", None),
        getattr(settings, "EMAIL_HOST_USER", None),
        repr(sorted(getattr(settings, "ANYMAIL", {}).items())),
    )


def _acquire() -> _Held:
    held: _Held | None = getattr(_local, "held", None)
    now = time.monotonic()
    if held is not None:
        if held.pid != os.getpid():
            # Forked after it was opened: the socket belongs to the parent; never QUIT it from here.
            _local.held = held = None
        elif (
            held.key != _settings_key()
            or now - held.last_used > settings.MAILER_CONNECTION_MAX_IDLE
            or held.messages >= settings.MAILER_CONNECTION_MAX_MESSAGES
        ):
            close_connection()
            held = None
    if held is None:
        connection = get_connection(fail_silently=False)
        connection.open()
        stats["opened"] += 1
        held = _Held(connection=connection, key=_settings_key(), pid=os.getpid(), last_used=now)
        _local.held = held
        logger.debug("email.connection_opened", extra={"backend": settings.EMAIL_BACKEND})
    return held


def close_connection() -> None:
    """Closes this process's connection, if any (at worker shutdown, after an error)."""
    held: _Held | None = getattr(_local, "held", None)
    _local.held = None
    if held is None or held.pid != os.getpid():
        return
    try:
        held.connection.close()
    except Exception as exc:  # noqa: BLE001 - a connection that fails to close is dropped all the same
        logger.info("email.connection_close_failed", extra={"error": f"{type(exc).__name__}: {exc}"[:300]})


def deliver(message: EmailMessage) -> None:
    """Hands `message` to the configured backend; raises whatever the backend raised."""
    if not settings.MAILER_REUSE_CONNECTION:
        connection = get_connection(fail_silently=False)
        stats["opened"] += 1
        message.connection = connection
        sent = connection.send_messages([message])  # opens and closes its own connection
    else:
        held = _acquire()
        message.connection = held.connection
        try:
            sent = held.connection.send_messages([message])
        except BaseException:
            close_connection()
            raise
        held.messages += 1
        held.last_used = time.monotonic()
    if sent != 1:
        raise PermanentError(f"the email backend accepted {sent} messages instead of 1")
