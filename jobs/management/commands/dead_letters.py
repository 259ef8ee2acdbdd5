"""`manage.py dead_letters list|show|groups|discard|purge`: inspect and tidy dead letters."""

from __future__ import annotations

import json
import re
from datetime import timedelta
from typing import Any

from django.core.management.base import CommandError, CommandParser

from jobs.management.base import JobsCommand
from jobs.management.commands.requeue_dead import _user, parse_since
from jobs.models import DeadLetter
from jobs.selectors import dead_letter_groups, dead_letters_select
from jobs.services import dead_letters_discard, dead_letters_purge

_DURATION = re.compile(r"^(\d+)\s*([smhdw])$")
_UNITS = {"s": "seconds", "m": "minutes", "h": "hours", "d": "days", "w": "weeks"}


def parse_duration(value: str) -> timedelta:
    """`30d`, `12h`, `90m`, `2w`, `45s`."""
    match = _DURATION.match(value.strip().lower())
    if not match:
        raise CommandError(f"{value!r} is not a duration like 30d, 12h, 90m, 2w.")
    return timedelta(**{_UNITS[match.group(2)]: int(match.group(1))})


class Command(JobsCommand):
    help = "Inspect and tidy dead letters: list, show one, group, discard, purge old ones."

    def add_arguments(self, parser: CommandParser) -> None:
        sub = parser.add_subparsers(dest="action", required=True, metavar="{list,show,groups,discard,purge}")

        listing = sub.add_parser("list", help="List dead letters, newest failure first.")
        listing.add_argument(
            "--status", choices=DeadLetter.Status.values, default=DeadLetter.Status.PENDING, help="Default: pending."
        )
        listing.add_argument("--task", help="Registered task name, exactly (e.g. mailer.send_email).")
        listing.add_argument("--queue", help="Queue it was taken from (high, normal, low).")
        listing.add_argument("--exception", help="Exception class name, exactly (e.g. SMTPRecipientsRefused).")
        listing.add_argument("--request-id", help="The request id it carried (X-Request-ID).")
        listing.add_argument("--since", help="Failed at or after this ISO 8601 time (e.g. 2026-12-01T08:00).")
        listing.add_argument("--limit", type=int, default=50, help="At most this many, newest first (50).")

        show = sub.add_parser("show", help="Show one dead letter with its arguments, traceback and history.")
        show.add_argument("id", type=int, help="The dead letter's id (the # column of list).")

        sub.add_parser("groups", help="Pending dead letters grouped by task and exception type.")

        discard = sub.add_parser("discard", help="Discard pending dead letters by id.")
        discard.add_argument("ids", nargs="+", type=int, metavar="ID")

        purge = sub.add_parser("purge", help="Delete requeued and discarded dead letters older than a duration.")
        purge.add_argument("--older-than", required=True, help="e.g. 30d, 12h.")
        purge.add_argument("--include-pending", action="store_true", help="Delete pending ones too.")
        purge.add_argument("--dry-run", action="store_true")

    def handle(self, *args: Any, **options: Any) -> None:
        getattr(self, f"_{options['action']}")(options)

    def _list(self, options: dict[str, Any]) -> None:
        rows = dead_letters_select(
            status=options["status"],
            task=options["task"],
            queue=options["queue"],
            exception=options["exception"],
            request_id=options["request_id"],
            since=parse_since(options["since"]) if options["since"] else None,
        ).order_by("-failed_at", "-pk")[: options["limit"]]
        count = 0
        for row in rows:
            count += 1
            self.stdout.write(
                f"#{row.pk:<7} {row.failed_at:%Y-%m-%d %H:%M:%S}  {row.status:<9} {row.task_name:<30} "
                f"{row.queue:<7} {row.exception_type}: {row.exception_message[:60]}"
            )
        if not count:
            self.stdout.write("No dead letters match.")

    def _show(self, options: dict[str, Any]) -> None:
        row = DeadLetter.objects.filter(pk=options["id"]).first()
        if row is None:
            raise CommandError(f"Unknown dead letter id: {options['id']}.")
        failed = (
            f"{row.failed_at:%Y-%m-%d %H:%M:%S%z} ({row.failure_count} time(s), "
            f"first {row.first_failed_at:%Y-%m-%d %H:%M:%S%z})"
        )
        requeued = f"{row.requeue_count} time(s)"
        if row.requeue_count:
            requeued += f", last by {row.requeued_by} as {row.requeued_task_id}"
        fields = [
            ("task", f"{row.task_name} [{row.task_id}]"),
            ("status", row.status),
            ("reason", row.reason),
            ("queue", row.queue),
            ("failed", failed),
            ("retries", row.retries),
            ("requeued", requeued),
            ("request id", row.request_id or "-"),
            ("worker", row.worker or "-"),
            ("exception", f"{row.exception_type}: {row.exception_message}"),
            ("args", json.dumps(row.args, indent=2)),
            ("kwargs", json.dumps(row.kwargs, indent=2)),
        ]
        for name, value in fields:
            self.stdout.write(f"{name + ':':<11} {value}")
        if row.raw_message:
            self.stdout.write(f"message:    {row.raw_message[:2000]}")
        self.stdout.write("traceback:")
        self.stdout.write(row.traceback or "  (none)")
        self.stdout.write("history:")
        for event in row.events.order_by("at", "pk"):
            self.stdout.write(
                f"  {event.at:%Y-%m-%d %H:%M:%S} {event.action:<14} {event.actor or 'system'} {event.task_id}"
            )

    def _groups(self, options: dict[str, Any]) -> None:
        groups = dead_letter_groups()
        if not groups:
            self.stdout.write("No pending dead letters.")
        for group in groups:
            self.stdout.write(
                f"{group['count']:>7}  {group['task_name']:<30} {group['exception_type']:<30} "
                f"last {group['last_failed_at']:%Y-%m-%d %H:%M:%S}"
            )

    def _discard(self, options: dict[str, Any]) -> None:
        ids = options["ids"]
        found = set(DeadLetter.objects.filter(pk__in=ids).values_list("pk", flat=True))
        unknown = sorted(set(ids) - found)
        if unknown:
            raise CommandError(f"Unknown dead letter id(s): {', '.join(map(str, unknown))}. Nothing was discarded.")
        count = dead_letters_discard(dead_letters=DeadLetter.objects.filter(pk__in=ids), actor=f"cli:{_user()}")
        self.stdout.write(self.style.SUCCESS(f"Discarded {count} dead letter(s)."))

    def _purge(self, options: dict[str, Any]) -> None:
        older_than = parse_duration(options["older_than"])
        statuses = [DeadLetter.Status.REQUEUED, DeadLetter.Status.DISCARDED]
        if options["include_pending"]:
            statuses.append(DeadLetter.Status.PENDING)
        count = dead_letters_purge(
            older_than=older_than, statuses=statuses, actor=f"cli:{_user()}", dry_run=options["dry_run"]
        )
        verb = "Would delete" if options["dry_run"] else "Deleted"
        self.stdout.write(self.style.SUCCESS(f"{verb} {count} dead letter(s) older than {options['older_than']}."))
