"""What every `jobs` management command shares."""

from __future__ import annotations

import os
import sys
from typing import Any

from django.core.management.base import BaseCommand


class JobsCommand(BaseCommand):
    """A command whose output may go into a pipe that closes early (`dead_letters show 1 | head`):
    it stops quietly there, as Unix tools do, instead of ending in a BrokenPipeError traceback."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._stdout_closed = False
        write = self.stdout.write

        def guarded(*parts: Any, **options: Any) -> None:
            try:
                write(*parts, **options)
            except BrokenPipeError:
                self._stdout_closed = True
                raise

        self.stdout.write = guarded  # type: ignore[method-assign]

    def execute(self, *args: Any, **options: Any) -> str | None:
        try:
            return super().execute(*args, **options)
        except BrokenPipeError:
            if not self._stdout_closed:
                raise  # another pipe (a socket to the broker): a real error, reported as such
            # Python would report the error again when it flushes stdout at exit: point the
            # descriptor at /dev/null first, and exit 1 (the `signal` module's documented way).
            devnull = os.open(os.devnull, os.O_WRONLY)
            os.dup2(devnull, sys.stdout.fileno())
            raise SystemExit(1) from None
