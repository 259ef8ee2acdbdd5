"""Dead letters at scale: requeue 10 000 in bulk, and the admin list with 100 000 rows.

    python bench/dead_letters.py [--quick]

Targets (issue 3 and 10): requeue 10 000 in under 10 s; the admin list renders in a bounded
number of queries whatever the row count (compared at 1 000 and at the full count).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

# Run as a script, sys.path[0] is bench/, whose modules would shadow the standard library's.
sys.path[0] = str(Path(__file__).resolve().parent.parent)

from bench.common import Environment, emit, table  # noqa: E402


def make_rows(count: int, batch: int = 5000) -> None:
    from django.utils import timezone

    from jobs.models import DeadLetter

    now = timezone.now()
    tasks = ["thumbnails.generate", "mailer.send_email", "jobs.daily_report", "bench.noop_job"]
    errors = ["TimeoutError", "PermanentError", "KeyError", "SMTPDataError", "UnidentifiedImageError"]
    made = DeadLetter.objects.count()
    while made < count:
        n = min(batch, count - made)
        DeadLetter.objects.bulk_create(
            [
                DeadLetter(
                    task_name=tasks[i % 4],
                    task_id=f"t-{made + i}",
                    queue="normal",
                    args=[made + i],
                    exception_type=errors[i % 5],
                    exception_message="boom",
                    reason="permanent_error",
                    failed_at=now,
                )  # fmt: skip
                for i in range(n)
            ]
        )
        made += n


def admin_list(client) -> tuple[float, int]:
    from django.db import connection
    from django.test.utils import CaptureQueriesContext

    client.get("/admin/jobs/deadletter/")  # warm up
    with CaptureQueriesContext(connection) as queries:
        started = time.perf_counter()
        response = client.get("/admin/jobs/deadletter/?status__exact=pending")
        elapsed = time.perf_counter() - started
    if response.status_code != 200:
        raise RuntimeError(f"admin list answered {response.status_code}")
    return elapsed, len(queries)


def run(quick: bool) -> None:
    full = 20_000 if quick else 100_000
    requeue_count = 2_000 if quick else 10_000
    with Environment() as env:
        env.django()
        from django.contrib.auth import get_user_model
        from django.test import Client

        from jobs.models import DeadLetter
        from jobs.services import dead_letters_requeue

        user = get_user_model().objects.create_superuser("bench", "bench@example.com", "bench-password")
        client = Client(HTTP_HOST="localhost")
        client.force_login(user)

        make_rows(1_000)
        small_time, small_queries = admin_list(client)
        make_rows(full)
        big_time, big_queries = admin_list(client)

        rows = DeadLetter.objects.filter(pk__in=list(DeadLetter.objects.values_list("pk", flat=True)[:requeue_count]))
        started = time.perf_counter()
        result = dead_letters_requeue(dead_letters=rows, actor="bench")
        requeue_time = time.perf_counter() - started
        if result.count != requeue_count:
            raise RuntimeError(f"requeued {result.count} of {requeue_count}: {result.error}")

        print(f"Dead letters ({'quick' if quick else 'full'} run, {env.env['DATABASE_URL'].split(':')[0]})")
        print(table([
            ["measure", "value", "target"],
            ["admin list, 1 000 rows", f"{small_time * 1000:.0f} ms, {small_queries} queries", ""],
            [f"admin list, {full:,} rows", f"{big_time * 1000:.0f} ms, {big_queries} queries",
             "same query count"],
            [f"requeue {requeue_count:,}", f"{requeue_time:.2f} s ({requeue_count / requeue_time:.0f}/s)",
             "10 000 in < 10 s"],
        ]))  # fmt: skip
        emit("dead_letters", f"admin queries at {full:,} rows", big_queries, small_queries, "queries",
             "equal", better="lower")  # fmt: skip
        emit("dead_letters", f"admin list at {full:,} rows", big_time * 1000, None, "ms")
        emit("dead_letters", f"requeue {requeue_count:,}", requeue_time, None, "s", "10 000 in < 10 s")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    run(parser.parse_args().quick)
    return 0


if __name__ == "__main__":
    sys.exit(main())
