"""Task events as Flower receives them, from a real worker that publishes them in batches."""

from __future__ import annotations

import signal
import threading
import uuid
from collections import Counter

import pytest
from celery.events.receiver import EventReceiver

from config.celery import app
from tests.integration import tasks
from tests.integration.conftest import wait_for

pytestmark = [pytest.mark.django_db(transaction=True), pytest.mark.integration]

TASK_EVENTS = ("task-received", "task-started", "task-succeeded")


class Listener(EventReceiver):
    """Celery's own event receiver (what Flower runs), noting every event and every message."""

    def __init__(self, connection) -> None:
        self.events: list[dict] = []
        self.messages: list[list[str]] = []  # the types of the events of each message
        self.lock = threading.Lock()
        super().__init__(connection, handlers={"*": self._note}, app=app)

    def _receive(self, body, message, list=list, isinstance=isinstance):
        with self.lock:
            self.messages.append([e.get("type") for e in (body if isinstance(body, list) else [body])])
        return super()._receive(body, message)

    def _note(self, event: dict) -> None:
        with self.lock:
            self.events.append(event)

    def of(self, task_ids: set[str]) -> Counter:
        with self.lock:
            return Counter(e["type"] for e in self.events if e.get("uuid") in task_ids)

    def batches(self) -> list[int]:
        """The sizes of the messages that carried the worker's task events."""
        with self.lock:
            return [len(m) for m in self.messages if any(t in TASK_EVENTS for t in m)]

    def seen(self, kind: str) -> bool:
        with self.lock:
            return any(e["type"] == kind for e in self.events)


@pytest.fixture
def listener():
    with app.connection_for_read() as connection:
        receiver = Listener(connection)
        thread = threading.Thread(target=receiver.capture, kwargs={"limit": None, "wakeup": False}, daemon=True)
        thread.start()
        yield receiver
        receiver.should_stop = True
        thread.join(5)


def run(count: int) -> tuple[set[str], str]:
    key = f"events-{uuid.uuid4().hex}"
    return {tasks.flaky.delay(key, 0).id for _ in range(count)}, key


def test_a_busy_worker_sends_its_task_events_in_batches(start_worker, listener, redis_client):
    # With the timer out of the way (a minute), only the size of a batch sends events: 48 tasks
    # make 144 task events, which go out as 6 messages of 24 (Celery's buffer limit), not one
    # message per loop iteration.
    start_worker(extra_env={"JOBS_TASK_EVENTS_FLUSH_INTERVAL": "60"})
    wait_for(lambda: listener.seen("worker-online"), 30)  # subscribed before any task runs
    ids, key = run(48)
    wait_for(lambda: int(redis_client.get(key) or 0) == 48, 30)

    wait_for(lambda: all(listener.of(ids)[kind] == 48 for kind in TASK_EVENTS), 10)
    assert set(listener.of(ids)) == {*TASK_EVENTS, "task-sent"}  # and `task-sent` from this producer
    assert listener.batches() == [24] * 6


def test_a_few_events_go_out_together_on_the_timer(start_worker, listener, redis_client):
    # Fewer than a batch (24): only the timer sends them, all in one or two messages (Celery's
    # own way publishes on nearly every loop iteration: one message for almost every event).
    start_worker(extra_env={"JOBS_TASK_EVENTS_FLUSH_INTERVAL": "1"})
    wait_for(lambda: listener.seen("worker-online"), 30)
    ids, _ = run(2)
    wait_for(lambda: all(listener.of(ids)[kind] == 2 for kind in TASK_EVENTS), 30)
    assert sum(listener.batches()) == 6
    assert len(listener.batches()) <= 2


def test_events_still_waiting_are_sent_before_the_worker_stops(start_worker, listener, redis_client):
    # Events wait up to a minute here, and 5 tasks make 15 (a batch goes out at 24): only the
    # flush on the way out can deliver them.
    worker = start_worker(extra_env={"JOBS_TASK_EVENTS_FLUSH_INTERVAL": "60"})
    wait_for(lambda: listener.seen("worker-online"), 30)
    ids, key = run(5)
    wait_for(lambda: int(redis_client.get(key) or 0) == 5, 30)
    assert listener.of(ids)["task-succeeded"] == 0  # still waiting in the worker

    worker.signal(signal.SIGTERM)
    worker.wait(30)
    wait_for(lambda: all(listener.of(ids)[kind] == 5 for kind in TASK_EVENTS), 10)
