"""What every `jobs` management command shares."""

from __future__ import annotations

import os
import sys
from typing import Any

from django.core.management.base import BaseCommand


class JobsCommand(BaseCommand):
    """A command whose output may go into a pipe that closes early (`dead_letters show 1 | head`):
    it stops quietly there, as Unix tools do, instead of ending in a BrokenPipeError traceback."""

    def execute(self, *args: Any, **options: Any) -> str | None:
        try:
            return super().execute(*args, **options)
        except BrokenPipeError:
            # Python would report the error again when it flushes stdout at exit: point the
            # descriptor at /dev/null first (the documented way, see the `signal` module's notes).
            devnull = os.open(os.devnull, os.O_WRONLY)
            os.dup2(devnull, sys.stdout.fileno())
            raise SystemExit(0) from None
