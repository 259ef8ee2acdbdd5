"""`make run`'s process manager: honcho, with time for the workers' shutdown.

honcho sends SIGTERM to every process on Ctrl-C and SIGKILLs whatever still runs 5 s later (its
`KILL_WAIT`). A worker gives its running tasks `CELERY_SHUTDOWN_TIMEOUT` seconds (30) to finish,
then gives the rest back to the broker: killed at 5 s, it would leave them in Redis's `unacked`
hash and their jobs leased until the lease lapses. Here honcho waits the shutdown timeout plus a
margin instead.

    python -m devtools.procfile start -f Procfile
"""

from __future__ import annotations

import os
import sys

#: Seconds beyond the workers' shutdown timeout honcho waits before its SIGKILL.
MARGIN = 10.0


def kill_wait(environ: dict[str, str] | os._Environ[str] = os.environ) -> float:
    """Seconds honcho waits after Ctrl-C before it kills what still runs."""
    try:
        shutdown = float(environ.get("CELERY_SHUTDOWN_TIMEOUT") or 30)
    except ValueError:
        shutdown = 30.0
    return max(shutdown, 0.0) + MARGIN


def main(argv: list[str] | None = None) -> None:
    from honcho import command, manager

    manager.KILL_WAIT = kill_wait()  # type: ignore[attr-defined]  # a module constant honcho reads at stop time
    command.main(argv if argv is not None else sys.argv[1:])


if __name__ == "__main__":
    main()
