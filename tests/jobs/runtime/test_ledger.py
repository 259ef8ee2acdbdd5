"""The ledger: an accepted job stays known to the database until it has finished, and the
sweeper brings back, with the same identity, a job whose message the broker no longer holds."""

from __future__ import annotations

import json
from datetime import timedelta

import pytest
from django.db import OperationalError, connection
from django.utils import timezone

from jobs.models import DeadLetter, OutboxMessage
from jobs.runtime.ledger import (
    RESERVED_KEY,
    ledger_counts,
    ledger_defer_retry,
    ledger_finish,
    ledger_oldest_age,
    ledger_sweep,
    worker_reserved_publish,
)
from jobs.runtime.outbox import enqueue, outbox_relay

pytestmark = pytest.mark.django_db


def _published(task_id: str, *, ago: float = 600, **fields) -> OutboxMessage:
    """A job published `ago` seconds ago whose message the broker no longer has."""
    return OutboxMessage.objects.create(
        task_name="jobs.ping",
        task_id=task_id,
        options={"queue": "low", "headers": {"request_id": "rid-1", "jobs_ledger": 1}},
        published_at=timezone.now() - timedelta(seconds=ago),
        **fields,
    )


def _queued_ids(redis_client, queue: str = "low") -> list[str]:
    return [json.loads(raw)["headers"]["id"] for raw in redis_client.lrange(queue, 0, -1)]


def _age_missing(task_id: str, seconds: float = 3600) -> None:
    OutboxMessage.objects.filter(task_id=task_id).update(missing_since=timezone.now() - timedelta(seconds=seconds))


def test_a_job_the_broker_lost_is_republished_with_the_same_identity_after_two_sweeps(redis_client):
    _published("lost-1", retries=2)
    first = ledger_sweep()
    assert first == {"reclaimed": 0, "candidates": 1, "missing": 1, "republished": 0}  # seen gone once: not yet
    assert _queued_ids(redis_client) == []
    _age_missing("lost-1")
    assert ledger_sweep()["republished"] == 1

    message = json.loads(redis_client.lindex("low", 0))
    assert message["headers"]["id"] == "lost-1"
    assert message["headers"]["retries"] == 2  # the retries it used stay used
    assert message["headers"]["request_id"] == "rid-1"
    row = OutboxMessage.objects.get(task_id="lost-1")
    assert row.republished == 1
    assert row.missing_since is None
    assert (timezone.now() - row.published_at).total_seconds() < 60
    assert ledger_sweep()["candidates"] == 0  # published again just now: not judged again yet


def test_a_job_whose_message_is_still_queued_is_left_alone(redis_client, django_capture_on_commit_callbacks):
    with django_capture_on_commit_callbacks(execute=True):
        task_id = enqueue("jobs.ping", queue="low")
    OutboxMessage.objects.update(published_at=timezone.now() - timedelta(hours=1))
    _age_missing(task_id)  # even one a previous sweep had missed
    assert ledger_sweep() == {"reclaimed": 0, "candidates": 1, "missing": 0, "republished": 0}
    assert _queued_ids(redis_client) == [task_id]
    assert OutboxMessage.objects.get(task_id=task_id).missing_since is None


def test_a_job_delivered_to_a_live_worker_is_left_alone_and_one_of_a_dead_worker_comes_back(redis_client):
    """A running, prefetched or ETA-held message sits in the transport's `unacked` hash; its worker
    says it holds it. One whose worker was SIGKILLed before it started stays there for the
    visibility timeout (an hour): counted present, it waited that long (found by the chaos run)."""
    message = {"headers": {"id": "running-1", "task": "jobs.ping"}, "body": "W10=", "properties": {}}
    for task_id in ("running-1", "orphan-1"):
        _published(task_id)
        redis_client.hset("unacked", f"tag-{task_id}", json.dumps([{**message, "headers": {"id": task_id}}, "", "low"]))
        _age_missing(task_id)
    worker_reserved_publish("worker-a@host", ["running-1"])
    assert ledger_sweep()["republished"] == 1
    assert _queued_ids(redis_client) == ["orphan-1"]


def test_a_job_a_live_worker_holds_is_left_alone(redis_client):
    """After the broker restarted empty, a worker still runs (or holds for its ETA) what it took."""
    _published("held-1")
    worker_reserved_publish("worker-a@host", ["held-1"])
    _age_missing("held-1")
    assert ledger_sweep()["republished"] == 0


def test_a_worker_that_stopped_refreshing_holds_nothing(redis_client, settings):
    settings.JOBS_LIVENESS_INTERVAL = 1
    _published("held-by-dead-worker")
    redis_client.hset(RESERVED_KEY, "dead@host", json.dumps({"at": 0, "ids": ["held-by-dead-worker"]}))
    _age_missing("held-by-dead-worker")
    assert ledger_sweep()["republished"] == 1
    assert not redis_client.hexists(RESERVED_KEY, "dead@host")  # dropped on the way


def test_two_sweeps_that_judged_the_same_job_lost_publish_it_once(redis_client):
    """The second sweep's claim re-checks what it judged: the first one republished the job."""
    from jobs.runtime.ledger import _republish

    row = _published("raced-1", missing_since=timezone.now() - timedelta(hours=1))
    judged = {"missing_since__lte": timezone.now() - timedelta(seconds=30)}
    assert _republish([row.pk], judged) == 1
    assert _republish([row.pk], judged) == 0
    assert _queued_ids(redis_client) == ["raced-1"]


def test_a_job_lost_too_many_times_becomes_a_dead_letter(redis_client, settings):
    settings.JOBS_LEDGER_REPUBLISH_LIMIT = 2
    _published("lost-often", republished=2, missing_since=timezone.now() - timedelta(hours=1))
    assert ledger_sweep()["republished"] == 0
    dead = DeadLetter.objects.get(task_id="lost-often")
    assert dead.reason == DeadLetter.Reason.LOST_REPEATEDLY
    assert "3 times" in dead.exception_message
    assert _queued_ids(redis_client) == []
    assert not OutboxMessage.objects.filter(task_id="lost-often").exists()


def test_a_republish_the_broker_refused_does_not_count_as_a_loss(redis_client, settings):
    """A full broker refuses the sweeper's send: the job was not sent again, so it has not been
    lost again either (found by the fault suite: six refused sends under a full broker made a job
    a `lost_repeatedly` dead letter that the broker had lost once)."""
    settings.JOBS_LEDGER_REPUBLISH_LIMIT = 2
    _published("lost-full", republished=1, missing_since=timezone.now() - timedelta(hours=1))
    redis_client.config_set("maxmemory", 1)
    try:
        for _ in range(3):
            assert ledger_sweep()["republished"] == 0
    finally:
        redis_client.config_set("maxmemory", 0)
    row = OutboxMessage.objects.get(task_id="lost-full")
    assert (row.republished, row.claim) == (1, "")
    assert not DeadLetter.objects.exists()
    assert ledger_sweep()["republished"] == 1
    assert OutboxMessage.objects.get(task_id="lost-full").republished == 2
    assert _queued_ids(redis_client) == ["lost-full"]


def test_a_backlog_too_large_to_read_is_not_judged(redis_client, monkeypatch, settings):
    """Not even by the time rule: a long backlog would be republished again and again."""
    from jobs.runtime import ledger

    settings.CELERY_BROKER_TRANSPORT_OPTIONS = {
        **settings.CELERY_BROKER_TRANSPORT_OPTIONS,
        "visibility_timeout": 100,
    }  # the job (600 s old) is past the time rule's cutoff
    monkeypatch.setattr(ledger, "SCAN_LIMIT", 1)
    redis_client.lpush("low", json.dumps({"headers": {"id": "x"}}), json.dumps({"headers": {"id": "y"}}))
    _published("unjudged-1", missing_since=timezone.now() - timedelta(hours=1))
    assert ledger_sweep()["republished"] == 0  # 2 queued messages are past the (lowered) limit
    assert "unjudged-1" not in _queued_ids(redis_client)


def test_only_one_process_sweeps_at_a_time(redis_client):
    from jobs.runtime.ledger import ledger_run

    _published("locked-1", missing_since=timezone.now() - timedelta(hours=1))
    assert ledger_run(token="worker-a", ttl=60)["sweep"]["republished"] == 1
    assert "sweep" not in ledger_run(token="beat-b", ttl=60)  # worker-a holds the lock
    assert "sweep" in ledger_run(token="worker-a", ttl=60)  # its holder renews it


def test_young_jobs_are_not_judged(redis_client, settings):
    settings.JOBS_LEDGER_LOST_AFTER = 60
    _published("young-1", ago=10)
    assert ledger_sweep() == {"reclaimed": 0, "candidates": 0, "missing": 0, "republished": 0}


def test_without_a_readable_broker_only_empty_queues_are_judged_and_no_visibility_timeout_waited(
    redis_client, settings, rabbitmq_broker
):
    """RabbitMQ's queues cannot be read without consuming: a queue with a message ready is not
    judged (else a long backlog would be republished again and again); in an empty one, a job no
    live worker holds is lost once seen so twice, the grace apart. It used to wait for the
    visibility timeout plus a minute, which RabbitMQ does not use: an hour as shipped (found by the
    kill-chaos run on RabbitMQ, whose deleted vhost's jobs did not come back)."""
    settings.CELERY_BROKER_TRANSPORT_OPTIONS = {**settings.CELERY_BROKER_TRANSPORT_OPTIONS, "visibility_timeout": 3600}
    settings.JOBS_LIVENESS_INTERVAL = 1
    _published("old-1", ago=200)
    _published("held-2", ago=200)
    worker_reserved_publish("worker-b@host", ["held-2"])
    assert ledger_sweep() == {"reclaimed": 0, "candidates": 2, "missing": 1, "republished": 0}
    _age_missing("old-1", seconds=5)  # JOBS_LEDGER_MISSING_GRACE is 10 s: not yet
    assert ledger_sweep()["republished"] == 0
    _age_missing("old-1")
    assert ledger_sweep()["republished"] == 1
    assert _queued_ids(redis_client) == ["old-1"]
    assert OutboxMessage.objects.get(task_id="held-2").missing_since is None

    _published("lost-3", ago=200, missing_since=timezone.now() - timedelta(hours=1))
    assert ledger_sweep()["republished"] == 0  # `low` now holds a message: it may be this one
    assert OutboxMessage.objects.get(task_id="lost-3").missing_since is None  # that look no longer counts
    redis_client.delete("low")
    assert ledger_sweep() == {"reclaimed": 0, "candidates": 2, "missing": 1, "republished": 0}  # old-1 too young
    _age_missing("lost-3")
    assert ledger_sweep()["republished"] == 1
    assert _queued_ids(redis_client) == ["lost-3"]


def test_a_finished_job_is_forgotten():
    _published("done-1")
    assert ledger_finish("done-1") is True
    assert not OutboxMessage.objects.exists()
    assert ledger_finish("") is False


@pytest.mark.django_db(transaction=True)  # outside a transaction, as at the end of a task
def test_finishing_survives_a_connection_the_database_cut():
    """`ledger_finish` runs at the end of every ledger job: a dead connection is replaced."""
    _published("done-2")
    calls = []

    def cut_once(execute, sql, params, many, context):
        if "DELETE FROM" in sql and not calls:  # (on PostgreSQL after a WITH: jobs.runtime.store._async_commit)
            calls.append(sql)
            raise OperationalError("server closed the connection unexpectedly")
        return execute(sql, params, many, context)

    with connection.execute_wrapper(cut_once):
        assert ledger_finish("done-2") is True
    assert calls
    assert not OutboxMessage.objects.exists()


def test_a_refused_retry_waits_in_the_ledger_and_is_published_when_due(redis_client):
    _published("retry-1")
    assert ledger_defer_retry(
        task_name="jobs.ping",
        task_id="retry-1",
        args=[],
        kwargs={},
        headers={"request_id": "r"},
        queue="low",
        retries=3,
        delay=3600,
    )
    row = OutboxMessage.objects.get(task_id="retry-1")
    assert row.published_at is None
    assert row.retries == 3
    assert outbox_relay()["published"] == 0  # not due yet
    OutboxMessage.objects.update(not_before=timezone.now() - timedelta(seconds=1))
    assert outbox_relay()["published"] == 1
    message = json.loads(redis_client.lindex("low", 0))
    assert (message["headers"]["id"], message["headers"]["retries"]) == ("retry-1", 3)


def test_a_refused_retry_of_a_job_not_in_the_ledger_gets_a_row(redis_client):
    """A task sent by beat or `.delay()` has no row yet: its refused retry must not be lost either."""
    assert ledger_defer_retry(
        task_name="jobs.ping",
        task_id="beat-1",
        args=[1],
        kwargs={"a": 2},
        headers={},
        queue="low",
        retries=1,
        delay=0,
    )
    row = OutboxMessage.objects.get(task_id="beat-1")
    assert (row.args, row.kwargs, row.options["queue"]) == ([1], {"a": 2}, "low")
    assert outbox_relay()["published"] == 1


def test_one_unpublishable_row_does_not_block_the_rows_behind_it(redis_client):
    """A queue this release no longer declares: the broker will never take it. It becomes a dead
    letter; the rows after it still go out (the relay used to stop at the first error)."""
    old = timezone.now() - timedelta(minutes=5)
    OutboxMessage.objects.create(task_name="jobs.ping", task_id="gone-q", options={"queue": "gone"}, created_at=old)
    OutboxMessage.objects.create(task_name="jobs.ping", task_id="fine", options={"queue": "low"}, created_at=old)
    assert outbox_relay()["published"] == 1
    assert _queued_ids(redis_client) == ["fine"]
    dead = DeadLetter.objects.get(task_id="gone-q")
    assert dead.reason == DeadLetter.Reason.UNPUBLISHABLE
    assert not OutboxMessage.objects.filter(task_id="gone-q").exists()


def test_counts_and_oldest_age_for_operators():
    assert ledger_oldest_age() == 0.0
    _published("p-1")
    _published("m-1", missing_since=timezone.now())
    OutboxMessage.objects.create(
        task_name="jobs.ping", task_id="u-1", created_at=timezone.now() - timedelta(seconds=90)
    )
    assert ledger_counts() == {"unpublished": 1, "published": 1, "missing": 1}
    assert 85 < ledger_oldest_age() < 200


def test_jobs_waiting_for_their_time_are_neither_old_nor_backlog():
    """A far `run_after` (Django's Tasks API) or a deferred retry is not a job the broker lost
    or one the relay owes: the age alert and the backlog count them from when they are due."""
    from jobs.runtime.outbox import outbox_backlog

    now = timezone.now()
    OutboxMessage.objects.create(
        task_name="jobs.ping", task_id="later", created_at=now - timedelta(days=3), not_before=now + timedelta(hours=1)
    )
    assert ledger_oldest_age() == 0.0
    assert outbox_backlog() == 0
    OutboxMessage.objects.create(
        task_name="jobs.ping", task_id="due", created_at=now - timedelta(days=3), not_before=now - timedelta(seconds=40)
    )
    assert 35 < ledger_oldest_age() < 120  # overdue since its time came, not since it was accepted
    assert outbox_backlog() == 1


def test_a_retry_noted_in_the_ledger_keeps_the_headers_the_task_carries_on():
    from jobs.runtime.store import job_retry

    _published("h-1")
    job_retry("h-1", retries=2, postponed=0, delay=0, headers={"jobs_attempts": [{"worker": "w1"}]})
    row = OutboxMessage.objects.get(task_id="h-1")
    assert row.retries == 2
    assert row.options["headers"]["jobs_attempts"] == [{"worker": "w1"}]
    assert row.options["headers"]["jobs_ledger"] == 1  # what it had stays


def test_the_ledger_command_reports_and_sweeps(redis_client):
    from io import StringIO

    from django.core.management import call_command

    _published("cmd-1", missing_since=timezone.now() - timedelta(hours=1))
    out = StringIO()
    call_command("ledger", "--sweep", stdout=out)
    text = out.getvalue()
    assert "republished 1 the broker had lost" in text
    assert "Unfinished jobs: 1 (0 waiting to be published, 1 published, 0 missing" in text
    assert "jobs.ping" in text
    assert _queued_ids(redis_client) == ["cmd-1"]

    from django.core.management import CommandError

    with pytest.raises(CommandError, match="--limit must be a positive number"):
        call_command("ledger", "--limit", "-1")


def test_the_admin_lists_the_ledger_and_publishes_again(admin_client, redis_client):
    row = _published("adm-1")
    page = admin_client.get("/admin/jobs/job/?state=queued")
    assert page.status_code == 200
    assert "adm-1" in page.content.decode()
    assert admin_client.get("/admin/jobs/job/add/").status_code == 403
    response = admin_client.post(
        "/admin/jobs/job/", {"action": "publish_again", "_selected_action": [row.pk]}, follow=True
    )
    assert "Published 1 job again" in response.content.decode()
    assert _queued_ids(redis_client) == ["adm-1"]


def test_a_job_brought_back_resumes_with_the_retries_it_used(redis_client):
    """The row keeps the retry count (and the postponements that used no budget): a job the
    sweeper republishes does not start its retries over, nor re-wait its first countdown."""
    row = _published("counted-1", missing_since=timezone.now() - timedelta(hours=1))
    OutboxMessage.objects.filter(pk=row.pk).update(options={**row.options, "countdown": 30}, retries=3, postponed=2)
    assert ledger_sweep()["republished"] == 1
    message = json.loads(redis_client.lindex("low", 0))
    assert message["headers"]["retries"] == 3
    assert message["headers"]["jobs_postponed"] == 2
    assert message["headers"]["eta"] is None  # its countdown passed long ago


@pytest.mark.django_db(transaction=True)
def test_the_relay_never_publishes_inside_a_transaction(redis_client, publishes_in_transaction):
    """It used to publish under SELECT ... FOR UPDATE inside atomic(): on SQLite every other writer
    waited for the broker while the write lock was held."""
    old = timezone.now() - timedelta(minutes=5)
    for task_id in ("tx-1", "tx-2"):
        OutboxMessage.objects.create(task_name="jobs.ping", task_id=task_id, options={"queue": "low"}, created_at=old)
    assert outbox_relay()["published"] == 2
    assert publishes_in_transaction == [False, False]


def test_the_sweep_reads_a_broker_whose_keys_carry_a_prefix(redis_client):
    """A Redis shared by two sites (`global_keyprefix`): kombu prefixes its own commands, not the
    LRANGE and HVALS the sweep reads with, so every queued job looked lost and ran twice."""
    from celery import current_app
    from kombu import Connection

    from jobs.runtime.ledger import broker_view

    before = current_app.conf.broker_transport_options
    options = {**(before or {}), "global_keyprefix": "site1:"}
    current_app.conf.broker_transport_options = options
    try:
        with Connection(current_app.conf.broker_url, transport_options=options) as conn:
            current_app.send_task("jobs.ping", task_id="queued-1", queue="low", connection=conn)
        redis_client.hset("site1:unacked", "tag-1", json.dumps([{"headers": {"id": "running-1"}}, "", "low"]))
        assert redis_client.llen("site1:low") == 1  # where kombu put it
        view = broker_view()
    finally:
        current_app.conf.broker_transport_options = before
    assert {"queued-1", "running-1"} <= view.ids


def test_a_backlog_in_one_queue_leaves_the_others_judged(redis_client):
    from celery import current_app

    from jobs.runtime.ledger import broker_view

    for n in range(30):
        current_app.send_task("jobs.ping", task_id=f"backlog-{n}", queue="low")
    current_app.send_task("jobs.ping", task_id="urgent-1", queue="high")
    view = broker_view(limit=10)
    assert view.unjudged == {"low"}
    assert "urgent-1" in view.ids


def test_a_long_list_is_read_whole_while_producers_push(redis_client):
    """Pages counted from the tail (the oldest end) do not shift as kombu pushes at the head: a
    read that pages from index 0 lost the oldest messages under a fast producer."""
    from jobs.runtime.ledger import read_list

    redis_client.rpush("q", *[json.dumps({"headers": {"id": f"old-{n}"}}) for n in range(25)])
    pushed = iter(range(1000))
    real_lrange = redis_client.lrange

    def lrange_while_pushing(key, start, end):
        for _ in range(7):  # a producer pushes 7 new messages at the head per page read
            redis_client.lpush("q", json.dumps({"headers": {"id": f"new-{next(pushed)}"}}))
        return real_lrange(key, start, end)

    redis_client.lrange = lrange_while_pushing
    messages = read_list(redis_client, "q", limit=10_000, page=10)
    ids = {json.loads(raw)["headers"]["id"] for raw in messages}
    assert {f"old-{n}" for n in range(25)} <= ids


def test_the_ledger_command_says_so_when_another_process_sweeps(redis_client):
    """It raised a KeyError (a traceback) whenever a worker held the sweep lock."""
    from io import StringIO

    from django.core.management import call_command

    from jobs.runtime.ledger import SWEEP_LOCK_KEY

    redis_client.set(SWEEP_LOCK_KEY, "a-worker", px=60_000)
    out = StringIO()
    call_command("ledger", "--sweep", stdout=out)
    assert "Another process sweeps now" in out.getvalue()


def test_a_view_only_staff_user_sees_the_ledger_but_cannot_publish_or_delete(client, django_user_model, redis_client):
    """Publishing again changes what runs: it takes `jobs.change_job`, not the view (it had
    `permissions=["view"]`); and nobody deletes an unfinished job's row from the admin."""
    from tests.conftest import grant

    row = _published("perm-1")
    viewer = grant(django_user_model.objects.create_user("viewer", password="pw", is_staff=True), "jobs.view_job")
    client.force_login(viewer)
    page = client.get("/admin/jobs/job/")
    assert page.status_code == 200
    assert "perm-1" in page.content.decode()
    assert 'value="publish_again"' not in page.content.decode()
    client.post("/admin/jobs/job/", {"action": "publish_again", "_selected_action": [row.pk]})
    assert _queued_ids(redis_client) == []

    operator = grant(viewer, "jobs.change_job", "jobs.delete_job")
    client.force_login(operator)
    page = client.get("/admin/jobs/job/").content.decode()
    assert 'value="publish_again"' in page
    assert 'value="delete_selected"' not in page
    assert client.get(f"/admin/jobs/job/{row.pk}/delete/").status_code == 403
    client.post("/admin/jobs/job/", {"action": "publish_again", "_selected_action": [row.pk]})
    assert _queued_ids(redis_client) == ["perm-1"]
    assert OutboxMessage.objects.filter(pk=row.pk).exists()
