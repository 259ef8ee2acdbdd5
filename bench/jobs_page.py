"""The jobs page and the jobs API on a big job table, beside Django's stock admin list of the
same table, in the same run.

    BENCH_DATABASE_URL=postgres://... python bench/jobs_page.py [--quick] [--rows N]

Fills the job table with N rows (1 000 000; 20 000 with --quick) spread over the states, queues
and tasks, then times each page (median of 5, after a warm-up) and counts its queries. The
baseline is a stock `ModelAdmin` of the same table (`list_filter` on state and task, the full
`COUNT(*)` Django shows by default). Target (issue "See and steer"): pages that stay fast at a
million rows.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
import uuid
from pathlib import Path

sys.path[0] = str(Path(__file__).resolve().parent.parent)

from bench.common import Environment, emit, table  # noqa: E402

STATES = ["available"] * 16 + ["scheduled"] * 2 + ["retryable", "executing"]
QUEUES = ["high", "normal", "normal", "low"]
TASKS = ["mailer.send_email", "thumbnails.generate", "jobs.daily_report", "jobs.ping"]


def fill(count: int, batch: int = 20_000) -> None:
    from datetime import timedelta

    from django.utils import timezone

    from jobs.models import OutboxMessage
    from jobs.runtime.store import jobs_add

    now = timezone.now()
    made = OutboxMessage.objects.count()
    while made < count:
        rows = []
        for i in range(made, min(count, made + batch)):
            state = STATES[i % len(STATES)]
            queue = QUEUES[(i // 7) % len(QUEUES)]  # not in step with the states
            rows.append(
                OutboxMessage(
                    task_name=TASKS[i % len(TASKS)],
                    task_id=f"job-{i}-{uuid.uuid4().hex[:8]}",
                    args=[i, f"order-{i}"],
                    kwargs={},
                    options={"queue": queue, "headers": {"request_id": f"req-{i // 10}", "jobs_ledger": 1}},
                    queue=queue,
                    state=state,
                    retries=2 if state == "retryable" else 0,
                    not_before=now + timedelta(minutes=5) if state in ("scheduled", "retryable") else None,
                    published_at=now if state == "available" else None,
                    lease_owner="bench@host:1:a" if state == "executing" else "",
                    lease_until=now + timedelta(seconds=20) if state == "executing" else None,
                    started_at=now if state == "executing" else None,
                    created_at=now,
                )
            )
        jobs_add(rows)
        made += len(rows)


def timed(client, url: str, repeat: int = 5) -> tuple[float, int]:
    from django.db import connection
    from django.test.utils import CaptureQueriesContext

    response = client.get(url)  # warm-up
    if response.status_code != 200:
        raise RuntimeError(f"{url} answered {response.status_code}")
    times = []
    for _ in range(repeat):
        with CaptureQueriesContext(connection) as queries:
            started = time.perf_counter()
            client.get(url)
            times.append(time.perf_counter() - started)
    return statistics.median(times) * 1000, len(queries)


def run(quick: bool, rows: int | None) -> None:
    count = rows or (20_000 if quick else 1_000_000)
    with Environment() as env:
        env.django()
        from django.contrib import admin
        from django.contrib.auth import get_user_model
        from django.test import Client

        from jobs.models import OutboxMessage

        class StockAdmin(admin.ModelAdmin):  # type: ignore[type-arg]
            """What a project gets from `admin.site.register` with the obvious filters."""

            list_display = ("task_name", "task_id", "state", "created_at")
            list_filter = ("state", "task_name")
            search_fields = ("task_id",)

        admin.site.register(OutboxMessage, StockAdmin)  # before the first request builds the URLs

        user = get_user_model().objects.create_superuser("bench", "bench@example.com", "bench-password")
        client = Client(HTTP_HOST="localhost")
        client.force_login(user)
        started = time.perf_counter()
        fill(count)
        filled = time.perf_counter() - started
        from django.db import connection

        if connection.vendor == "postgresql":
            with connection.cursor() as cursor:
                cursor.execute("ANALYZE")
        some = OutboxMessage.objects.filter(state="retryable").order_by("pk").values_list("pk", "task_id").first()
        if some is None:
            raise RuntimeError("no retrying job was made")
        pk, task_id = some

        pages = [
            ("list, no filter", "/admin/jobs/job/", "/admin/jobs/outboxmessage/"),
            ("list, state retrying", "/admin/jobs/job/?state=retrying",
             "/admin/jobs/outboxmessage/?state__exact=retryable"),
            ("list, one task", "/admin/jobs/job/?task=jobs.ping", "/admin/jobs/outboxmessage/?task_name=jobs.ping"),
            ("list, a task id", f"/admin/jobs/job/?q={task_id}", f"/admin/jobs/outboxmessage/?q={task_id}"),
            ("a job's page", f"/admin/jobs/job/{pk}/change/", f"/admin/jobs/outboxmessage/{pk}/change/"),
            ("API list, retrying in low", "/api/jobs/jobs/?state=retrying&queue=low", None),
            ("API list, a request id", "/api/jobs/jobs/?request_id=req-77", None),
            ("API job", f"/api/jobs/jobs/{task_id}/", None),
            ("API counts", "/api/jobs/jobs/counts/", None),
        ]  # fmt: skip
        lines = [["page", "ours", "stock admin", "target"]]
        for name, ours_url, stock_url in pages:
            ours, ours_queries = timed(client, ours_url)
            stock, stock_queries = timed(client, stock_url) if stock_url else (None, None)
            lines.append(
                [
                    name,
                    f"{ours:.0f} ms, {ours_queries} queries",
                    f"{stock:.0f} ms, {stock_queries} queries" if stock is not None else "-",
                    "< 500 ms" if quick is False else "",
                ]
            )
            emit("jobs_page", f"{name} at {count:,} rows", ours, stock, "ms", "< 500 ms", better="lower")
        print(f"The jobs page at {count:,} rows ({env.database}; filled in {filled:.0f} s)")
        print(table(lines))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--rows", type=int, default=None, help="rows in the job table")
    options = parser.parse_args()
    run(options.quick, options.rows)
    return 0


if __name__ == "__main__":
    sys.exit(main())
