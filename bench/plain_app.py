"""The throughput benchmark's baseline: a plain Celery app with nothing of the project.

    python -m celery -A bench.plain_app worker -Q normal -c 2 -l INFO

No Django, no signal handlers, no custom task or request class, no metrics, no liveness step, no
task events, Celery's own text logging. It keeps the project's reliability settings (JSON only,
acknowledge after the run, one message prefetched per process, give the message back when the
process dies, the `normal` queue) so that the difference measured is the project's machinery,
not a looser delivery guarantee. The broker is `CELERY_BROKER_URL` from the environment
(bench/common.py points it at the benchmark's private Redis); nothing else is configured, but
for `throughput.py --split`, which sets BENCH_PLAIN_PROJECT_SETTINGS=1 to add the Celery features
the project turns on (task events, time limits, pool process recycling).
"""

from __future__ import annotations

import os

from celery import Celery
from kombu import Exchange, Queue

from bench import noop

QUEUE = "normal"

# fixups=[]: Celery's Django fix-up would otherwise set up Django (the project, its signal handlers
# and logging) whenever DJANGO_SETTINGS_MODULE is in the environment, as it is in the benchmarks.
app = Celery("plain", broker=os.environ["CELERY_BROKER_URL"], fixups=[])
app.conf.update(
    accept_content=["json"],
    task_serializer="json",
    result_serializer="json",
    task_queues=(Queue(QUEUE, Exchange(QUEUE, type="direct"), routing_key=QUEUE),),
    task_default_queue=QUEUE,
    task_default_exchange=QUEUE,
    task_default_routing_key=QUEUE,
    task_acks_late=True,
    task_reject_on_worker_lost=True,
    worker_prefetch_multiplier=1,
    broker_connection_retry_on_startup=True,  # Celery's default, said out loud to silence its warning
)

if os.environ.get("BENCH_PLAIN_PROJECT_SETTINGS") == "1":
    # `throughput.py --split` only: the Celery features the project turns on, in plain Celery, to
    # tell their cost from the cost of the project's own code. Task events for Flower (sent,
    # received, started, succeeded), the time limits and the recycling of pool processes.
    app.conf.update(
        worker_send_task_events=True,
        task_send_sent_event=True,
        task_time_limit=600,
        task_soft_time_limit=540,
        worker_max_tasks_per_child=10_000,
        worker_max_memory_per_child=256_000,
    )


@app.task(name="bench.noop_plain", ignore_result=True)
def noop_plain(key: str, sent_at: float | None = None) -> None:
    noop.record(key, sent_at)
