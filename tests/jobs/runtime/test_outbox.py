"""The outbox: tasks published after commit, kept when the broker is down, relayed once."""

from __future__ import annotations

import json
import time
from datetime import timedelta

import pytest
from django.db import connection, transaction
from django.test.utils import CaptureQueriesContext
from django.utils import timezone

from jobs.context import request_id_var
from jobs.models import OutboxMessage
from jobs.runtime.outbox import enqueue, outbox_relay
from jobs.tasks import ping
from tests.conftest import reset_broker_pools

pytestmark = pytest.mark.django_db


@pytest.fixture
def broker_down(monkeypatch):
    reset_broker_pools()
    monkeypatch.setenv("CELERY_BROKER_URL", "redis://127.0.0.1:1/0")
    yield monkeypatch
    monkeypatch.undo()
    reset_broker_pools()


def test_enqueue_publishes_after_commit_and_keeps_the_job_in_the_ledger(
    django_capture_on_commit_callbacks, redis_client
):
    token = request_id_var.set("rid-out")
    try:
        with django_capture_on_commit_callbacks(execute=True) as callbacks:
            task_id = enqueue(ping, queue="low")
            assert OutboxMessage.objects.filter(task_id=task_id).exists()
            assert redis_client.llen("low") == 0  # nothing before the commit
    finally:
        request_id_var.reset(token)
    assert len(callbacks) == 1
    message = json.loads(redis_client.lindex("low", 0))
    assert message["headers"]["id"] == task_id
    assert message["headers"]["request_id"] == "rid-out"
    assert message["headers"]["jobs_ledger"] == 1
    row = OutboxMessage.objects.get()
    assert row.published_at is not None  # the job's record stays until the job has finished
    assert outbox_relay()["published"] == 0  # published: the relay leaves it alone


def test_the_request_path_costs_one_insert_and_one_update(django_capture_on_commit_callbacks, redis_client):
    """The publish after commit reads nothing back and marks the row in one statement: on every
    upload and email, a second read or a transaction of its own is measurable (bench/upload.py)."""
    with CaptureQueriesContext(connection) as queries, django_capture_on_commit_callbacks(execute=True):
        enqueue(ping, queue="low")
    statements = [q["sql"].split()[0].upper() for q in queries.captured_queries]
    assert [s for s in statements if s in {"SELECT", "INSERT", "UPDATE", "DELETE"}] == ["INSERT", "UPDATE"]
    assert redis_client.llen("low") == 1


def _failing_request():
    with transaction.atomic():
        enqueue("jobs.ping")
        raise RuntimeError("the request failed")


def test_rolled_back_transaction_publishes_nothing(redis_client):
    with pytest.raises(RuntimeError):
        _failing_request()
    assert not OutboxMessage.objects.exists()
    assert redis_client.llen("low") == 0


def test_broker_down_keeps_the_message_and_the_relay_publishes_it_once(
    django_capture_on_commit_callbacks, redis_client, broker_down
):
    started = time.monotonic()
    with django_capture_on_commit_callbacks(execute=True):
        task_id = enqueue("jobs.ping", args=[], kwargs={}, queue="low")
    assert time.monotonic() - started < 5  # the request does not hang
    row = OutboxMessage.objects.get(task_id=task_id)
    assert row.attempts == 1
    assert "OperationalError" in row.last_error or "Error" in row.last_error

    assert outbox_relay()["failed"] == 1  # still down: kept
    assert OutboxMessage.objects.get(task_id=task_id).attempts == 2

    broker_down.undo()
    reset_broker_pools()
    assert outbox_relay() == {"published": 1, "failed": 0, "waiting": 0}
    assert outbox_relay() == {"published": 0, "failed": 0, "waiting": 0}
    assert redis_client.llen("low") == 1
    assert json.loads(redis_client.lindex("low", 0))["headers"]["id"] == task_id


def test_after_a_failed_publish_the_next_ones_go_straight_to_the_relay_for_a_while(
    django_capture_on_commit_callbacks, redis_client, monkeypatch
):
    """A broker the network lost costs a publish its timeouts: the publishes that follow in this
    process skip it for JOBS_PUBLISH_BREAKER_SECONDS (their rows left to the relay at once), then
    one tries again; an error of one message (not the broker's) does not count."""
    from celery.exceptions import QueueNotFound

    from jobs.runtime import outbox

    tried: list[str] = []
    real_publish = outbox.publish

    def publish(message, **options):
        tried.append(message.task_id)
        if failure:
            raise failure
        return real_publish(message, **options)

    def enqueue_one() -> OutboxMessage:
        with django_capture_on_commit_callbacks(execute=True):
            task_id = enqueue("jobs.ping", args=[], kwargs={}, queue="low")
        return OutboxMessage.objects.get(task_id=task_id)

    monkeypatch.setattr(outbox, "publish", publish)
    failure: Exception | None = QueueNotFound("no queue 'gone'")  # one message's error: no breaker
    enqueue_one()
    failure = ConnectionError("Timeout connecting to server")
    first = enqueue_one()
    assert len(tried) == 2
    assert first.attempts == 1
    failure = None  # the broker is back, but this process does not know yet
    skipped = enqueue_one()
    assert len(tried) == 2
    assert (skipped.attempts, skipped.last_error, skipped.published_at) == (1, outbox.BREAKER_OPEN, None)
    assert outbox_relay()["published"] == 3  # tried rows: the relay takes them without its grace

    outbox.publish_breaker.open_until = time.monotonic()  # JOBS_PUBLISH_BREAKER_SECONDS later
    again = enqueue_one()
    assert tried[-1] == again.task_id
    assert again.published_at is not None


def test_relay_leaves_young_untried_rows_to_their_publisher(redis_client):
    young = OutboxMessage.objects.create(task_name="jobs.ping", task_id="young", options={"queue": "low"})
    old = OutboxMessage.objects.create(
        task_name="jobs.ping",
        task_id="orphan",
        options={"queue": "low"},
        created_at=timezone.now() - timedelta(minutes=5),
    )
    assert outbox_relay()["published"] == 1
    young.refresh_from_db()
    old.refresh_from_db()
    assert young.published_at is None
    assert old.published_at is not None
    assert json.loads(redis_client.lindex("low", 0))["headers"]["id"] == old.task_id


def test_unsupported_options_are_refused():
    with pytest.raises(TypeError, match="unsupported publish options: eta"):
        enqueue("jobs.ping", eta="tomorrow")


def test_a_long_countdown_waits_in_the_table_and_a_bad_one_is_refused(redis_client, django_capture_on_commit_callbacks):
    """A countdown past JOBS_HOLD_IN_BROKER_MAX was an ETA a worker held in memory; a negative or
    non-numeric one reached Celery (or the database) instead of being refused here."""
    with django_capture_on_commit_callbacks(execute=True), transaction.atomic():
        task_id = enqueue(ping, countdown=600)
    row = OutboxMessage.objects.get(task_id=task_id)
    assert (row.state, row.published_at) == (OutboxMessage.State.SCHEDULED, None)
    assert row.not_before > timezone.now() + timedelta(seconds=590)
    assert redis_client.llen("low") == 0  # no message until it is due
    for bad, error in ((-1, ValueError), (float("nan"), ValueError), ("soon", TypeError)):
        with pytest.raises(error, match="countdown"):
            enqueue(ping, countdown=bad)
    assert OutboxMessage.objects.count() == 1


@pytest.fixture
def sent_events():
    from celery import current_app

    before = current_app.conf.task_send_sent_event
    current_app.conf.task_send_sent_event = True
    yield
    current_app.conf.task_send_sent_event = before


def test_a_batch_sends_its_task_sent_events_together_and_its_messages_one_each(redis_client, sent_events):
    """Beat's burst: the batch's task-sent events go out together in a `task.multi` message (after
    the first, which connects the channel), read by a real subscriber, where Celery sends one
    message per event."""
    import base64

    from jobs.runtime.outbox import ledger_claim, publish_claimed

    for n in range(3):
        OutboxMessage.objects.create(task_name="jobs.ping", task_id=f"beat-{n}", options={"queue": "low"})
    _claim, rows = ledger_claim(OutboxMessage.objects.all(), limit=10)
    subscriber = redis_client.pubsub()
    subscriber.psubscribe("*celeryev*")
    subscriber.get_message(timeout=1)  # the subscription's confirmation
    assert publish_claimed(rows, batch_events=True) == (3, 0, 0)
    queued = [json.loads(raw)["headers"]["id"] for raw in redis_client.lrange("low", 0, -1)]
    assert queued == ["beat-2", "beat-1", "beat-0"]

    received = []
    while (message := subscriber.get_message(timeout=1)) is not None:
        received.append(message)
    subscriber.close()
    # The first send's event on its own (the channel is connected by that send), the rest together.
    assert [m["channel"].rsplit(b"/", 1)[-1] for m in received] == [b"task.sent", b"task.multi"], received
    envelope = json.loads(received[1]["data"])
    events = json.loads(base64.b64decode(envelope["body"]))
    assert [(e["type"], e["uuid"]) for e in events] == [("task-sent", f"beat-{n}") for n in range(1, 3)]


def test_a_batch_meeting_a_dead_broker_fails_its_first_publish_and_gives_its_claims_back(broker_down, sent_events):
    """The event collector is made after a first publish went through: a dead broker fails that
    publish inside its error handling (claims given back for the relay), not the collector's
    connection (found by review: beat's tick failed, the claims held for a minute)."""
    from jobs.runtime.outbox import ledger_claim, publish_claimed

    for n in range(2):
        OutboxMessage.objects.create(task_name="jobs.ping", task_id=f"down-{n}", options={"queue": "low"})
    _claim, rows = ledger_claim(OutboxMessage.objects.all(), limit=10)
    assert publish_claimed(rows, batch_events=True) == (0, 1, 0)
    assert list(OutboxMessage.objects.values_list("claim", "published_at")) == [("", None), ("", None)]


@pytest.fixture
def flushes(monkeypatch):
    """What each flush of kombu's Redis publish batch held (`jobs.runtime.broker.producer_for`),
    with `before` run ahead of the flush when set."""
    from kombu.transport import redis as kombu_redis

    seen: list[int] = []
    flush = kombu_redis.PublishBatch.flush
    hooks: dict[str, object] = {}

    def recording(self):
        if self._buffered:
            seen.append(self._buffered)
            if callable(hooks.get("before")):
                hooks.pop("before")()
        return flush(self)

    monkeypatch.setattr(kombu_redis.PublishBatch, "flush", recording)
    return seen, hooks


def _claimed_rows(count: int, prefix: str):
    from jobs.runtime.outbox import ledger_claim

    for n in range(count):
        OutboxMessage.objects.create(task_name="jobs.ping", task_id=f"{prefix}-{n}", options={"queue": "low"})
    return ledger_claim(OutboxMessage.objects.all(), limit=count)[1]


def test_a_batch_of_many_reaches_redis_in_one_pipeline_and_each_in_order(redis_client, flushes, sent_events):
    """The relay's, the sweeper's and beat's batches: one round trip for the messages where each
    LPUSH waited for its own answer, then their events."""
    from jobs.runtime.broker import PIPELINE_MIN_MESSAGES
    from jobs.runtime.outbox import publish_claimed

    seen, _hooks = flushes
    count = PIPELINE_MIN_MESSAGES + 4
    rows = _claimed_rows(count, "piped")
    assert publish_claimed(rows, batch_events=True) == (count, 0, 0)
    # The first message's task-sent event rides in the same pipeline (it is published through
    # the batch's producer); the rest go out together afterwards.
    assert seen == [count + 1]
    queued = [json.loads(raw)["headers"]["id"] for raw in redis_client.lrange("low", 0, -1)]
    assert queued == [f"piped-{n}" for n in reversed(range(count))]
    assert not OutboxMessage.objects.filter(published_at__isnull=True).exists()
    assert set(OutboxMessage.objects.values_list("claim", flat=True)) == {""}


def test_a_few_are_sent_one_by_one_on_the_pooled_producer(redis_client, flushes):
    from jobs.runtime.broker import PIPELINE_MIN_MESSAGES
    from jobs.runtime.outbox import publish_claimed

    seen, _hooks = flushes
    rows = _claimed_rows(PIPELINE_MIN_MESSAGES - 1, "few")
    assert publish_claimed(rows) == (PIPELINE_MIN_MESSAGES - 1, 0, 0)
    assert seen == []
    assert redis_client.llen("low") == PIPELINE_MIN_MESSAGES - 1


def test_a_batch_whose_flush_meets_a_dead_broker_counts_none_published(monkeypatch, flushes):
    """The broker goes away between the buffered publishes and their flush: which of them
    arrived is unknown, so none is marked published and the relay sends them all again (a copy
    that did arrive starts once: the lease)."""
    from devtools.localredis import LocalRedis
    from jobs.runtime.broker import PIPELINE_MIN_MESSAGES
    from jobs.runtime.outbox import publish_claimed

    seen, hooks = flushes
    broker = LocalRedis().start()
    try:
        reset_broker_pools()
        monkeypatch.setenv("CELERY_BROKER_URL", broker.url)
        rows = _claimed_rows(PIPELINE_MIN_MESSAGES, "lost")
        hooks["before"] = broker.stop
        published, failed, unpublishable = publish_claimed(rows)
    finally:
        broker.stop()
        monkeypatch.undo()
        reset_broker_pools()
    assert len(seen) == 1
    assert seen[0] >= PIPELINE_MIN_MESSAGES  # (with their task-sent events)
    assert (published, failed, unpublishable) == (0, PIPELINE_MIN_MESSAGES, 0)
    assert not OutboxMessage.objects.filter(published_at__isnull=False).exists()
    assert set(OutboxMessage.objects.values_list("claim", flat=True)) == {""}  # for the relay now
    # Each of them counts the try, so the relay takes them again at once (not after its grace).
    assert set(OutboxMessage.objects.values_list("attempts", flat=True)) == {1}
    assert all("delivery is uncertain" in error for error in OutboxMessage.objects.values_list("last_error", flat=True))


def test_a_batch_meeting_a_dead_broker_gives_up_as_soon_as_a_single_publish(broker_down):
    """The batch's own connection is tried as briefly as a single publish is (the requeue's and
    the admin's callers must not hang): found by review, it was tried for the broker's whole
    connection timeout."""
    from jobs.runtime.broker import PIPELINE_MIN_MESSAGES
    from jobs.runtime.outbox import publish_claimed

    rows = _claimed_rows(PIPELINE_MIN_MESSAGES, "down")
    started = time.monotonic()
    assert publish_claimed(rows) == (0, 1, 0)
    assert time.monotonic() - started < 3  # a hang here was 6 s and more (5 s connect timeout, retried)
    assert not OutboxMessage.objects.filter(published_at__isnull=False).exists()


def test_a_batch_declares_each_queue_once_even_on_a_redis_that_lost_its_bindings(redis_client, monkeypatch):
    """A Redis restarted empty has no queue bindings: the first message of each queue in a batch
    declares it (as Celery would), the others skip kombu's per-publish check of its record."""
    from kombu import messaging

    from jobs.runtime.broker import PIPELINE_MIN_MESSAGES
    from jobs.runtime.outbox import ledger_claim, publish_claimed

    declared = []
    declare = messaging.Producer.maybe_declare

    def counting(self, entity, *args, **kwargs):
        declared.append(entity.name)
        return declare(self, entity, *args, **kwargs)

    monkeypatch.setattr(messaging.Producer, "maybe_declare", counting)
    redis_client.flushdb()
    count = PIPELINE_MIN_MESSAGES + 2
    for n in range(count):
        queue = ("low", "high")[n % 2]
        OutboxMessage.objects.create(task_name="jobs.ping", task_id=f"q-{n}", options={"queue": queue})
    _claim, rows = ledger_claim(OutboxMessage.objects.all(), limit=count)
    assert publish_claimed(rows) == (count, 0, 0)
    assert sorted(name for name in declared if name != "celeryev") == ["high", "low"]  # (task-sent events)
    assert redis_client.llen("low") == redis_client.llen("high") == count // 2
