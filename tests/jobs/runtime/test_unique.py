"""Unique jobs: one unfinished job per key, enforced by the database in the enqueue's own
transaction (a partial unique index), with the policies return, replace and raise."""

from __future__ import annotations

import threading
from datetime import timedelta

import pytest
from django.db import connection, transaction
from django.utils import timezone

from jobs.exceptions import DuplicateJob
from jobs.models import OutboxMessage
from jobs.runtime import store
from jobs.runtime.outbox import enqueue

pytestmark = pytest.mark.django_db

State = OutboxMessage.State


def test_the_same_key_twice_is_one_job_and_one_message(django_capture_on_commit_callbacks, redis_client):
    with django_capture_on_commit_callbacks(execute=True) as published:
        first = enqueue("jobs.ping", unique_key="invoice:42")
        second = enqueue("jobs.ping", unique_key="invoice:42")
    assert first == second
    assert OutboxMessage.objects.count() == 1
    assert len(published) == 1
    assert redis_client.llen("low") == 1  # jobs.ping goes to `low`
    other = enqueue("jobs.ping", unique_key="invoice:43")
    assert other != first


def test_raise_names_the_job_holding_the_key():
    first = enqueue("jobs.ping", unique_key="k")
    with pytest.raises(DuplicateJob) as raised:
        enqueue("jobs.ping", unique_key="k", unique_policy="raise")
    assert raised.value.task_id == first
    assert OutboxMessage.objects.count() == 1


def test_replace_drops_a_waiting_job_for_the_new_one_but_never_a_running_one():
    old = enqueue("jobs.ping", args=[], unique_key="sync:7", countdown=600)
    new = enqueue("jobs.ping", kwargs={}, unique_key="sync:7", unique_policy="replace", countdown=60)
    assert new != old
    assert list(OutboxMessage.objects.values_list("task_id", flat=True)) == [new]
    assert store.job_start(old, retries=0, hostname="w") is store.Skip.FINISHED  # its message does nothing

    OutboxMessage.objects.filter(task_id=new).update(not_before=timezone.now())
    assert isinstance(store.job_start(new, retries=0, hostname="w"), store.Run)
    kept = enqueue("jobs.ping", unique_key="sync:7", unique_policy="replace")
    assert kept == new  # a run holds it: nothing replaced


def test_the_key_is_free_once_the_job_ends_or_dies():
    first = enqueue("jobs.ping", unique_key="k")
    run = store.job_start(first, retries=0, hostname="w")
    assert enqueue("jobs.ping", unique_key="k") == first  # held while it runs
    store.job_finish(first, owner=run.owner)
    assert enqueue("jobs.ping", unique_key="k") != first


def test_unique_while_queued_frees_the_key_when_a_run_starts():
    first = enqueue("jobs.ping", unique_key="reindex:9", unique_while="queued")
    assert enqueue("jobs.ping", unique_key="reindex:9", unique_while="queued") == first
    store.job_start(first, retries=0, hostname="w")
    second = enqueue("jobs.ping", unique_key="reindex:9", unique_while="queued")
    assert second != first
    assert OutboxMessage.objects.get(task_id=first).unique_key is None


def test_a_key_held_past_unique_for_is_free_again():
    first = enqueue("jobs.ping", unique_key="k", unique_for=60)
    assert enqueue("jobs.ping", unique_key="k", unique_for=60) == first
    OutboxMessage.objects.filter(task_id=first).update(unique_until=timezone.now() - timedelta(seconds=1))
    second = enqueue("jobs.ping", unique_key="k", unique_for=60)
    assert second != first
    assert OutboxMessage.objects.count() == 2  # the first still runs, as a job of its own


@pytest.mark.parametrize(
    ("options", "error"),
    [
        ({"unique_key": ""}, "unique_key must be"),
        ({"unique_key": "k", "unique_for": 0}, "unique_for must be"),
        ({"unique_key": "k", "unique_while": "always"}, "unique_while must be"),
        ({"unique_key": "k", "unique_policy": "merge"}, "unique_policy must be"),
    ],
)
def test_bad_unique_options_are_refused_before_anything_is_written(options, error):
    with pytest.raises(ValueError, match=error):
        enqueue("jobs.ping", **options)
    assert not OutboxMessage.objects.exists()


@pytest.mark.django_db(transaction=True)
def test_two_concurrent_transactions_with_the_same_key_make_one_job():
    if connection.vendor != "postgresql":
        pytest.skip("the suite runs on SQLite here: it serializes every write, there is no race to lose")
    barrier = threading.Barrier(2)
    ids: list[str] = []

    def producer() -> None:
        try:
            with transaction.atomic():
                barrier.wait(timeout=10)
                ids.append(enqueue("jobs.ping", unique_key="order:1", countdown=600))
        finally:
            connection.close()

    threads = [threading.Thread(target=producer) for _ in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=30)
    assert len(ids) == 2
    assert ids[0] == ids[1]
    assert OutboxMessage.objects.count() == 1


def test_a_task_declared_unique_takes_its_key_from_the_arguments():
    from jobs.limits import UniqueJob
    from tests.integration.tasks import unique_invoice

    first = enqueue(unique_invoice, args=[42])
    assert enqueue(unique_invoice, kwargs={"order_id": 42, "copy": True}) == first  # by name too
    assert enqueue("tests.unique_invoice", args=[42]) == first  # the task by its registered name
    assert OutboxMessage.objects.get().unique_key == "invoice:42"
    assert enqueue(unique_invoice, args=[43]) != first
    # What enqueue is told wins over the task's own.
    assert enqueue(unique_invoice, args=[42], unique_key="invoice:42:again") != first
    with pytest.raises(DuplicateJob):
        enqueue(unique_invoice, args=[42], unique_policy="raise")
    with pytest.raises(ValueError, match=r"tests.unique_invoice: unique key: no key from the job's arguments"):
        enqueue(unique_invoice, kwargs={"order": 44})
    with pytest.raises(ValueError, match='unique_while must be "unfinished" or "queued"'):
        UniqueJob(key="x", unique_while="always")
