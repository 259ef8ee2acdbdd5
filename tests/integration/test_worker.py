"""A real worker, a real Redis, a real result row."""

import time

import pytest
from django_celery_results.models import TaskResult

from jobs.tasks import ping

pytestmark = [pytest.mark.django_db(transaction=True), pytest.mark.integration]


def test_worker_runs_task_and_stores_result(start_worker):
    start_worker()

    result = ping.delay()

    assert set(result.get(timeout=30)) == {"pong"}
    row = TaskResult.objects.get(task_id=result.id)
    assert row.status == "SUCCESS"
    assert row.task_name == "jobs.ping"
    assert row.content_type == "application/json"


def test_zero_turns_the_pool_process_limits_off(start_worker):
    # The celery command reads CELERY_WORKER_* variables as its own options; billiard refuses 0.
    start_worker(extra_env={"CELERY_WORKER_MAX_TASKS_PER_CHILD": "0", "CELERY_WORKER_MAX_MEMORY_PER_CHILD": "0"})

    assert set(ping.delay().get(timeout=30)) == {"pong"}


def test_task_is_routed_to_its_queue(start_worker, redis_client):
    # No worker yet: the message waits in the Redis list of its queue.
    ping.delay()
    assert redis_client.llen("low") == 1
    assert redis_client.llen("normal") == 0

    start_worker(queues="low")
    import time

    deadline = time.monotonic() + 30
    while time.monotonic() < deadline and TaskResult.objects.filter(status="SUCCESS").count() == 0:
        time.sleep(0.1)
    assert TaskResult.objects.filter(task_name="jobs.ping", status="SUCCESS").count() == 1
    assert redis_client.llen("low") == 0


@pytest.mark.parametrize("pool", ["prefork", "threads"])
def test_results_are_written_in_batches_and_at_the_latest_when_the_worker_stops(start_worker, redis_client, pool):
    """A result waits in the process that ran the task (a pool process, or the worker's main
    process for the threads pool) until the next batch: here a minute away, so only the write on
    the way out can store it."""
    from tests.integration import tasks

    worker = start_worker(extra_env={"JOBS_RESULTS_FLUSH_INTERVAL": "60"}, extra_args=["--pool", pool])
    key = f"batched-{pool}"
    result = tasks.flaky.delay(key, 0)
    deadline = time.monotonic() + 30
    while int(redis_client.get(key) or 0) < 1:
        assert time.monotonic() < deadline, "the task never ran"
        time.sleep(0.05)
    time.sleep(0.5)
    assert not TaskResult.objects.filter(task_id=result.id).exists()  # noted, not written yet

    worker.stop()
    row = TaskResult.objects.get(task_id=result.id)
    assert (row.status, row.result) == ("SUCCESS", "1")
    assert row.date_started is not None
