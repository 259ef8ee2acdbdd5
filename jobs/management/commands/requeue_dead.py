"""`manage.py requeue_dead`: publish pending dead letters again."""

from __future__ import annotations

import getpass
from datetime import datetime
from typing import Any

from django.core.management.base import CommandError, CommandParser

from jobs.management.base import JobsCommand
from jobs.models import DeadLetter
from jobs.selectors import dead_letters_select, parse_moment
from jobs.services import dead_letters_requeue

PROGRESS_THRESHOLD = 1000


def parse_since(value: str) -> datetime:
    """An ISO 8601 date or date-time; naive values are taken in the current time zone."""
    moment = parse_moment(value)
    if moment is None:
        raise CommandError(f"--since {value!r} is not an ISO 8601 date or date-time (e.g. 2026-11-24T08:00:00Z).")
    return moment


class Command(JobsCommand):
    help = "Requeue pending dead letters: by id, or every one matching the given selectors."

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument("ids", nargs="*", type=int, metavar="ID", help="Dead letter ids to requeue.")
        parser.add_argument(
            "--all", action="store_true", help="Requeue every pending dead letter (that the selectors match, if any)."
        )
        parser.add_argument("--task", help="Only dead letters of this task name.")
        parser.add_argument("--queue", help="Only dead letters from this queue.")
        parser.add_argument("--exception", help="Only dead letters with this exception type (e.g. TimeoutError).")
        parser.add_argument("--request-id", help="Only dead letters caused by this request id.")
        parser.add_argument("--since", help="Only dead letters that failed at or after this ISO 8601 time.")
        parser.add_argument("--limit", type=int, help="Requeue at most this many (oldest first).")
        parser.add_argument("--rate", type=float, help="Publish at most this many per second (throttle).")
        parser.add_argument("--dry-run", action="store_true", help="Show what would be requeued; change nothing.")

    def handle(self, *args: Any, **options: Any) -> None:
        ids: list[int] = options["ids"]
        selectors = {
            "task": options["task"],
            "queue": options["queue"],
            "exception": options["exception"],
            "request_id": options["request_id"],
            "since": parse_since(options["since"]) if options["since"] else None,
        }
        if not ids and not options["all"] and not any(selectors.values()):
            raise CommandError(
                "Nothing selected: give dead letter ids, or --all, --task, --queue, --exception, "
                "--request-id or --since."
            )
        if ids and options["all"]:
            raise CommandError("Give either ids or --all, not both.")
        if ids and any(selectors.values()):
            given = ", ".join(f"--{name.replace('_', '-')}" for name, value in selectors.items() if value)
            raise CommandError(f"Give either ids or selectors ({given}), not both.")
        if options["limit"] is not None and options["limit"] < 1:
            raise CommandError("--limit must be a positive number.")
        if options["rate"] is not None and options["rate"] <= 0:
            raise CommandError("--rate must be a positive number.")

        if ids:
            found = dict(DeadLetter.objects.filter(pk__in=ids).values_list("pk", "status"))
            unknown = sorted(set(ids) - set(found))
            if unknown:
                raise CommandError(f"Unknown dead letter id(s): {', '.join(map(str, unknown))}. Nothing was requeued.")
            not_pending = sorted(pk for pk, status in found.items() if status != DeadLetter.Status.PENDING)
            if not_pending:
                raise CommandError(
                    f"Not pending (already requeued or discarded): {', '.join(map(str, not_pending))}. "
                    "Nothing was requeued."
                )

        rows = dead_letters_select(ids=ids or None, status=DeadLetter.Status.PENDING, **selectors)
        if options["limit"]:
            rows = DeadLetter.objects.filter(pk__in=list(rows.values_list("pk", flat=True)[: options["limit"]]))
        total = rows.count()
        if not total:
            raise CommandError("No pending dead letters match. Nothing was requeued.")

        verbose = options["verbosity"] >= 2
        if verbose or options["dry_run"]:
            for row in rows.order_by("failed_at", "pk")[: None if verbose else 20]:
                self.stdout.write(
                    f"  #{row.pk} {row.task_name} [{row.queue}] {row.exception_type}: {row.exception_message[:80]}"
                )

        if options["dry_run"]:
            self.stdout.write(self.style.SUCCESS(f"Would requeue {total} dead letter(s) (dry run: nothing changed)."))
            return

        show_progress = total >= PROGRESS_THRESHOLD and options["verbosity"] >= 1
        result = dead_letters_requeue(
            dead_letters=rows,
            actor=f"cli:{_user()}",
            rate=options["rate"],
            progress=(lambda done: self._progress(done, total)) if show_progress else None,
        )
        if show_progress:
            self.stderr.write("")
        if verbose:
            for pk, task_id in result.requeued:
                self.stdout.write(f"  requeued #{pk} as task {task_id}")
        for pk, why in result.skipped:
            self.stderr.write(f"  skipped #{pk}: {why}")
        if result.error:
            raise CommandError(
                f"Requeued {result.count} of {total} dead letter(s), then stopped: {result.error}. "
                f"{len(result.waiting)} of them wait in the outbox and go out when the broker answers; "
                "the rest stay pending."
            )
        self.stdout.write(self.style.SUCCESS(f"Requeued {result.count} dead letter(s)."))

    def _progress(self, done: int, total: int) -> None:
        width = 30
        filled = int(width * done / total)
        self.stderr.write(f"\r  [{'#' * filled}{'.' * (width - filled)}] {done}/{total}", ending="")
        self.stderr.flush()


def _user() -> str:
    try:
        return getpass.getuser()
    except Exception:  # noqa: BLE001 - no passwd entry in some containers
        return "unknown"
