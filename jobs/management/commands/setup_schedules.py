"""`manage.py setup_schedules`: seed the default periodic schedules, never duplicating one."""

from __future__ import annotations

from typing import Any

from django.core.management.base import CommandParser

from jobs.management.base import JobsCommand
from jobs.schedules import schedules_setup


class Command(JobsCommand):
    help = (
        "Create the default periodic schedules that are missing. Schedules staff edited in the admin are "
        "kept as they are; --reset puts the defaults back."
    )

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument("--reset", action="store_true", help="Restore the defaults of existing schedules too.")

    def handle(self, *args: Any, **options: Any) -> None:
        outcome = schedules_setup(reset=options["reset"])
        if options["verbosity"] >= 2:
            for kind, names in outcome.items():
                for name in names:
                    self.stdout.write(f"  {kind}: {name}")
        self.stdout.write(
            self.style.SUCCESS(
                f"Schedules: {len(outcome['created'])} created, {len(outcome['reset'])} reset, "
                f"{len(outcome['kept'])} kept as they were."
            )
        )
