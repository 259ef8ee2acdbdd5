"""`manage.py ledger`: the jobs accepted and not finished yet, and one round of the upkeep."""

from __future__ import annotations

from typing import Any

from django.core.management.base import CommandError, CommandParser
from django.db.models import Count, Min

from jobs.management.base import JobsCommand
from jobs.models import OutboxMessage
from jobs.runtime.ledger import ledger_counts, ledger_oldest_age, ledger_run


class Command(JobsCommand):
    help = (
        "Shows the ledger of unfinished jobs (by state, oldest, by task). With --sweep, also runs one "
        "round of what every worker's sweeper does: publish what waits, bring back what the broker lost."
    )

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument(
            "--sweep", action="store_true", help="Publish waiting jobs and republish lost ones now, then report."
        )
        parser.add_argument("--limit", type=int, default=10, help="How many tasks to list by count (default 10).")

    def handle(self, *args: Any, **options: Any) -> None:
        if options["limit"] < 1:
            raise CommandError("--limit must be a positive number.")
        if options["sweep"]:
            result = ledger_run()
            if "sweep" not in result:
                self.stdout.write(
                    f"Another process sweeps now (it holds the sweep lock); "
                    f"{result.get('reclaimed', 0)} lapsed run(s) reclaimed here."
                )
                return
            relay, sweep = result["relay"], result["sweep"]
            self.stdout.write(
                self.style.SUCCESS(
                    f"Published {relay['published']} waiting job(s); republished {sweep['republished']} the broker "
                    f"had lost; {sweep['missing']} seen missing for the first time."
                )
            )
            if relay["failed"]:
                self.stderr.write(self.style.WARNING("The broker refused a publish: the rest wait for the next round."))
        counts = ledger_counts()
        total = sum(counts.values())
        self.stdout.write(
            f"Unfinished jobs: {total} ({counts['unpublished']} waiting to be published, {counts['published']} "
            f"published, {counts['missing']} missing from the broker); oldest accepted {ledger_oldest_age():.0f} s ago."
        )
        rows = (
            OutboxMessage.objects.values("task_name")
            .annotate(count=Count("id"), oldest=Min("created_at"))
            .order_by("-count")[: options["limit"]]
        )
        for row in rows:
            self.stdout.write(f"  {row['count']:>8}  {row['task_name']}  (oldest {row['oldest']:%Y-%m-%d %H:%M:%S})")
