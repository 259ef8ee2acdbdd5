"""`manage.py probe worker|beat`: a cheap exec probe for Kubernetes and docker healthchecks.

Reads the liveness file the process refreshes from its own loop (the worker's consumer, the
beat's scheduler tick); no broker round trip, unlike `celery inspect ping`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from django.core.management.base import CommandError, CommandParser

from jobs.heartbeat import liveness_age, liveness_file
from jobs.management.base import JobsCommand

DEFAULT_MAX_AGE = {"worker": 60.0, "beat": 60.0}


class Command(JobsCommand):
    help = "Exit 0 when the worker (or beat) on this host refreshed its liveness file recently, else 1."

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument("process", choices=sorted(DEFAULT_MAX_AGE), help="Which process to check.")
        parser.add_argument("--max-age", type=float, help="Seconds after which the file counts as stale (60).")
        parser.add_argument("--file", type=Path, help="The liveness file (default: LIVENESS_DIR/<process>.alive).")

    def handle(self, *args: Any, **options: Any) -> None:
        name = options["process"]
        max_age = options["max_age"] or DEFAULT_MAX_AGE[name]
        path = options["file"] or liveness_file(name)
        age = liveness_age(name, path)
        if age is None:
            raise CommandError(f"{name}: no liveness file at {path}; is the {name} running on this host?")
        if age > max_age:
            raise CommandError(f"{name}: stale, last refreshed {age:.0f} s ago (limit {max_age:.0f} s).")
        self.stdout.write(f"{name}: alive, refreshed {age:.1f} s ago")
