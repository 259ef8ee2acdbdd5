"""Beat sends every due entry of a tick at once, recorded with its messages in one transaction
(jobs/runtime/beat.py): fast with thousands of schedules, never a tick twice, never one lost."""

from __future__ import annotations

import json
from datetime import timedelta

import pytest
from celery import current_app
from django.db import DataError, OperationalError, connection
from django.test.utils import CaptureQueriesContext
from django.utils import timezone
from django_celery_beat.models import IntervalSchedule, PeriodicTask, PeriodicTasks

from jobs.models import OutboxMessage
from jobs.runtime import beat, outbox

pytestmark = pytest.mark.django_db(transaction=True)  # django-celery-beat commits and closes connections


def schedules(count: int, *, due: bool, prefix: str = "s") -> list[PeriodicTask]:
    every_minute, _ = IntervalSchedule.objects.get_or_create(every=60, period=IntervalSchedule.SECONDS)
    last = timezone.now() - timedelta(seconds=61 if due else 1)
    return PeriodicTask.objects.bulk_create(
        PeriodicTask(name=f"{prefix}-{n}", task="jobs.ping", interval=every_minute, last_run_at=last, expire_seconds=50)
        for n in range(count)
    )


def queued(redis_client) -> list[dict]:
    """The messages waiting in the `low` queue (where `jobs.ping` is routed)."""
    return [json.loads(raw)["headers"] for raw in redis_client.lrange("low", 0, -1)]


@pytest.fixture
def scheduler(redis_client):
    return beat.LockedDatabaseScheduler(app=current_app, lazy=True)


def test_a_tick_sends_every_due_entry_with_a_few_statements(scheduler, redis_client):
    schedules(60, due=True)
    schedules(5, due=False, prefix="later")
    before = timezone.now()

    with CaptureQueriesContext(connection) as queries:
        scheduler.tick()

    sent = queued(redis_client)
    assert sorted(h["periodic_task_name"] for h in sent) == sorted(f"s-{n}" for n in range(60))
    assert all(h["jobs_ledger"] == 1 and h["expires"] for h in sent)
    # 60 sends cost a fixed handful of statements, not two or three per entry as before.
    assert len(queries) < 20, [q["sql"][:80] for q in queries]
    ran = PeriodicTask.objects.filter(name__startswith="s-")
    assert ran.filter(last_run_at__gte=before, total_run_count=1).count() == 60
    assert PeriodicTask.objects.filter(name__startswith="later-", total_run_count=0).count() == 5
    # Each message is in the ledger, published, until a worker finishes it.
    assert OutboxMessage.objects.filter(task_name="jobs.ping", published_at__isnull=False).count() == 60

    scheduler.tick()  # nothing more is due
    assert len(queued(redis_client)) == 60


def test_a_tick_the_database_refuses_sends_nothing_and_the_next_sends_all(scheduler, redis_client, caplog):
    schedules(10, due=True)

    def refuse(execute, sql, params, many, context):
        if sql.lstrip().upper().startswith("UPDATE"):
            raise OperationalError("the database system is shutting down")
        return execute(sql, params, many, context)

    with connection.execute_wrapper(refuse):
        assert scheduler.tick() == beat.RETRY_AFTER_ERROR
    assert "beat.tick_failed" in caplog.text
    assert queued(redis_client) == []
    assert not OutboxMessage.objects.exists()

    scheduler.tick()  # the schedule is read again: every entry is still due, and sent once
    assert len(queued(redis_client)) == 10
    assert PeriodicTask.objects.filter(total_run_count=1).count() == 10


def test_a_leader_the_database_keeps_refusing_hands_the_lock_to_a_standby(scheduler, redis_client, caplog):
    """Cut from the database but not from Redis, a leader would renew a lock it cannot use for
    ever and no beat would send: after `handover_after` seconds of failing ticks it gives the
    lock back and rests, and a standby that reaches the database sends the tick once."""
    schedules(3, due=True)
    standby = beat.LockedDatabaseScheduler(app=current_app, lazy=True)

    def refuse(execute, sql, params, many, context):
        raise OperationalError("could not connect to server: No route to host")

    with connection.execute_wrapper(refuse):
        assert scheduler.tick() == beat.RETRY_AFTER_ERROR
        assert scheduler.lock.held  # one failing tick is not yet a reason
        scheduler._failing_since -= scheduler.handover_after
        assert scheduler.tick() == beat.RETRY_AFTER_ERROR
    assert "beat.handing_over" in caplog.text
    assert not scheduler.lock.held
    assert redis_client.get(beat.LOCK_KEY) is None
    assert scheduler.tick() == scheduler.standby_poll  # resting: it does not take the lock back
    assert "lost the beat lock" not in caplog.text  # it gave the lock up; nobody took it
    assert queued(redis_client) == []

    standby.tick()
    assert standby.lock.held
    assert sorted(h["periodic_task_name"] for h in queued(redis_client)) == ["s-0", "s-1", "s-2"]
    scheduler.lock.resting_until = 0.0
    scheduler.tick()  # rested: the lock is the standby's now
    assert not scheduler.lock.held
    assert len(queued(redis_client)) == 3


def test_a_tick_the_broker_refuses_is_recorded_and_left_to_the_ledger(scheduler, redis_client, monkeypatch):
    schedules(3, due=True)
    real_publish = outbox.publish

    def broker_down(message, *, producer=None):
        raise ConnectionError("Error 111 connecting to the broker")

    monkeypatch.setattr(outbox, "publish", broker_down)
    scheduler.tick()
    assert queued(redis_client) == []
    # The runs are recorded (a standby would not send them again) and the messages wait.
    assert PeriodicTask.objects.filter(total_run_count=1).count() == 3
    waiting = OutboxMessage.objects.filter(published_at__isnull=True)
    assert waiting.count() == 3
    assert not waiting.exclude(claim="").exists()  # released for the relay

    monkeypatch.setattr(outbox, "publish", real_publish)
    published, error = outbox.ledger_publish_now(list(waiting.values_list("task_id", flat=True)))
    assert (published, error) == (3, "")
    assert len(queued(redis_client)) == 3


def test_an_expired_tick_in_the_ledger_is_forgotten_not_republished(redis_client):
    """Skipped by the worker (too late), it must not stay in the ledger: the sweeper would take
    it for lost and publish it again, to expire again."""
    from jobs.runtime.worker import JobRequest

    message = OutboxMessage.objects.create(task_name="jobs.ping", task_id="tick-1", published_at=timezone.now())
    request = JobRequest.__new__(JobRequest)
    request._request_dict = {"id": message.task_id, "periodic_task_name": "jobs: ping", "jobs_ledger": 1}
    request.id = message.task_id
    request._ledger_forget()
    assert not OutboxMessage.objects.filter(task_id="tick-1").exists()


def test_an_entry_that_cannot_be_sent_is_left_out_and_the_others_go(scheduler, redis_client, caplog):
    tasks = schedules(4, due=True)
    PeriodicTask.objects.filter(pk=tasks[0].pk).update(kwargs="[1]")  # valid JSON, not a mapping

    scheduler.tick()
    assert sorted(h["periodic_task_name"] for h in queued(redis_client)) == ["s-1", "s-2", "s-3"]
    assert [r.schedule for r in caplog.records if r.msg == "beat.entry_unsendable"] == ["s-0"]
    # Its run was not recorded either (no message went with it): nothing saved it apart.
    scheduler.close()
    assert PeriodicTask.objects.get(name="s-0").total_run_count == 0


def test_a_row_the_database_refuses_holds_back_no_other(scheduler, redis_client, caplog):
    tasks = schedules(4, due=True)
    PeriodicTask.objects.filter(pk=tasks[2].pk).update(args='["poison"]')

    def refuse_poison(execute, sql, params, many, context):
        if sql.lstrip().upper().startswith("INSERT") and "poison" in repr(params):
            raise DataError("unsupported Unicode escape sequence")
        return execute(sql, params, many, context)

    with connection.execute_wrapper(refuse_poison):
        scheduler.tick()
    assert sorted(h["periodic_task_name"] for h in queued(redis_client)) == ["s-0", "s-1", "s-3"]
    assert [r.schedule for r in caplog.records if r.msg == "beat.entry_unsendable"] == ["s-2"]
    assert PeriodicTask.objects.get(name="s-2").total_run_count == 0
    assert PeriodicTask.objects.filter(total_run_count=1).count() == 3


def test_a_beat_that_lost_its_lock_during_a_pause_sends_nothing(scheduler, redis_client, caplog, monkeypatch):
    schedules(3, due=True)
    scheduler.tick()  # leads, sends the three
    scheduler._checked_at = -3600.0
    assert scheduler.schedule  # notes when the schedules last changed
    PeriodicTask.objects.update(last_run_at=timezone.now() - timedelta(seconds=61))  # due again
    PeriodicTasks.update_changed()
    scheduler._checked_at = -3600.0  # it reads the schedule again
    refresh = scheduler._refresh_heap

    def paused_after_the_lock_check() -> None:
        # A long pause (GC, a frozen VM) after the tick checked the lock: the lock expired and
        # another beat took it, and this one has not asked Redis since.
        redis_client.set(beat.LOCK_KEY, "another-beat", px=30_000)
        scheduler.lock.renewed_at -= 3600
        refresh()

    monkeypatch.setattr(scheduler, "_refresh_heap", paused_after_the_lock_check)
    assert scheduler.tick() == beat.RETRY_AFTER_ERROR
    assert len(queued(redis_client)) == 3  # nothing more
    failed = [r.error for r in caplog.records if r.msg == "beat.tick_failed"]
    assert failed == ["RuntimeError: the beat lock was lost before the batch was recorded"]
    assert PeriodicTask.objects.filter(total_run_count=1).count() == 3  # nor recorded


def test_the_relay_forgets_an_expired_tick_instead_of_publishing_it(redis_client):
    past = (timezone.now() - timedelta(seconds=5)).isoformat()
    OutboxMessage.objects.create(
        task_name="jobs.ping",
        task_id="late-tick",
        attempts=1,
        options={"queue": "low", "expires": past, "headers": {"periodic_task_name": "jobs: ping"}},
    )
    OutboxMessage.objects.create(
        task_name="jobs.ping", task_id="late-job", attempts=1, options={"queue": "low", "expires": past}
    )
    outbox.outbox_relay()
    assert list(OutboxMessage.objects.values_list("task_id", flat=True)) == ["late-job"]
    assert [h["id"] for h in queued(redis_client)] == ["late-job"]  # its worker dead-letters it


def queued_messages(redis_client) -> list[tuple[dict, list, dict]]:
    """The messages waiting in the `low` queue, decoded as a worker decodes them: (headers, args,
    kwargs), kombu's tagged JSON (a Decimal, a datetime) turned back into its value."""
    import base64

    from kombu.utils.json import loads

    messages = []
    for raw in redis_client.lrange("low", 0, -1):
        envelope = json.loads(raw)
        args, kwargs, _embed = loads(base64.b64decode(envelope["body"]))
        messages.append((envelope["headers"], args, kwargs))
    return messages


def test_an_entry_plain_json_cannot_hold_is_sent_beside_the_others_not_instead(scheduler, redis_client, caplog):
    """kwargs typed in kombu's tagged form (`{"__type__": "decimal", ...}`) are read by
    django-celery-beat as a Decimal, which the ledger's JSON column cannot hold: the whole batch
    failed at every tick and beat sent nothing at all."""
    from decimal import Decimal

    tasks = schedules(2, due=True)
    PeriodicTask.objects.filter(pk=tasks[0].pk).update(kwargs='{"ms": {"__type__": "decimal", "__value__": "1"}}')
    before = timezone.now()

    assert scheduler.tick() != beat.RETRY_AFTER_ERROR
    assert "beat.tick_failed" not in caplog.text
    sent = {
        headers["periodic_task_name"]: (headers, kwargs) for headers, _args, kwargs in queued_messages(redis_client)
    }
    assert sorted(sent) == ["s-0", "s-1"]
    # The plain one through the ledger, as ever.
    assert sent["s-1"][0]["jobs_ledger"] == 1
    assert OutboxMessage.objects.get().task_id == sent["s-1"][0]["id"]
    # The other straight to the broker, its Decimal encoded as Celery encodes it (as
    # django-celery-beat's own scheduler sends it), with the same headers and expiry.
    headers, kwargs = sent["s-0"]
    assert kwargs == {"ms": Decimal("1")}
    assert isinstance(kwargs["ms"], Decimal)
    assert "jobs_ledger" not in headers
    assert headers["expires"]
    assert headers["task"] == "jobs.ping"
    assert [r.schedule for r in caplog.records if r.msg == "beat.entry_sent_outside_ledger"] == ["s-0"]
    # Both runs are recorded: a standby taking over now would not send either again.
    assert PeriodicTask.objects.filter(last_run_at__gte=before, total_run_count=1).count() == 2

    scheduler.tick()  # nothing more is due
    assert len(queued_messages(redis_client)) == 2


def test_an_entry_that_fails_to_record_otherwise_holds_back_no_other(scheduler, redis_client, caplog):
    """Not every refusal is a DatabaseError: psycopg raises ValueError for a NUL character, an
    encoder TypeError. It must cost that entry only, not the tick."""
    tasks = schedules(3, due=True)
    PeriodicTask.objects.filter(pk=tasks[1].pk).update(args='["poison"]')

    def refuse_poison(execute, sql, params, many, context):
        if sql.lstrip().upper().startswith("INSERT") and "poison" in repr(params):
            raise ValueError("A string literal cannot contain NUL (0x00) characters.")
        return execute(sql, params, many, context)

    with connection.execute_wrapper(refuse_poison):
        assert scheduler.tick() != beat.RETRY_AFTER_ERROR
    assert "beat.tick_failed" not in caplog.text
    assert sorted(h["periodic_task_name"] for h in queued(redis_client)) == ["s-0", "s-2"]
    assert [r.schedule for r in caplog.records if r.msg == "beat.entry_unsendable"] == ["s-1"]
    assert PeriodicTask.objects.get(name="s-1").total_run_count == 0


@pytest.mark.parametrize(
    ("kwargs", "fits"),
    [
        ({"n": 1, "s": "é", "l": [None, True, 1.5]}, True),
        ({"ms": __import__("decimal").Decimal("1")}, False),
        ({"at": timezone.now()}, False),
        ({"id": __import__("uuid").uuid4()}, False),
        ({"x": float("nan")}, False),  # PostgreSQL's jsonb refuses NaN
        ({"s": "a\x00b"}, False),  # and a NUL character
    ],
)
def test_what_the_ledger_cannot_hold_is_told_before_it_is_written(kwargs, fits):
    row = OutboxMessage(task_name="jobs.ping", task_id="t", args=[], kwargs=kwargs, options={"queue": "low"})
    assert (beat._ledger_refusal(row) == "") is fits


def test_a_leader_fenced_off_by_a_newer_one_records_and_sends_nothing(scheduler, redis_client, caplog):
    """Redis forgets the lock (a restart, a failover that lost the last writes): a standby takes
    it while the leader, which asks Redis only every TTL/10 seconds, still believes it leads. Its
    next batch must not go out beside the new leader's."""
    import time

    schedules(3, due=True)
    scheduler.tick()  # leads, sends the three
    assert len(queued(redis_client)) == 3
    scheduler._checked_at = -3600.0
    assert scheduler.schedule  # notes when the schedules last changed

    redis_client.delete(beat.LOCK_KEY)  # Redis restarted: no lock any more
    newer = beat.LockedDatabaseScheduler(app=current_app, lazy=True)
    newer.tick()  # takes the lock, and a newer token; nothing is due
    assert len(queued(redis_client)) == 3
    newer._checked_at = -3600.0
    assert newer.schedule

    PeriodicTask.objects.update(last_run_at=timezone.now() - timedelta(seconds=61))  # due again
    PeriodicTasks.update_changed()
    scheduler._checked_at = -3600.0  # the old leader reads the schedule again...
    scheduler.lock.renewed_at = time.monotonic()  # ...and has not asked Redis since
    scheduler.tick()
    assert len(queued(redis_client)) == 3  # nothing sent
    assert PeriodicTask.objects.filter(total_run_count=1).count() == 3  # nor recorded
    assert OutboxMessage.objects.count() == 3
    assert [r.msg for r in caplog.records if r.msg == "beat.fenced"] == ["beat.fenced"]
    assert "beat.tick_failed" not in caplog.text
    assert not scheduler.lock.held  # it stands down

    newer._checked_at = -3600.0
    newer.tick()  # the leader sends them, once
    assert len(queued(redis_client)) == 6
    assert PeriodicTask.objects.filter(total_run_count=2).count() == 3
    scheduler.tick()  # the old one waits as a standby
    assert len(queued(redis_client)) == 6


def test_the_next_run_is_the_entry_django_celery_beat_would_build_again_from_its_row(scheduler):
    """`reserve` copies the entry instead of building it again from the row (which parsed its
    arguments from JSON once more per send): the same entry, field for field."""
    from django_celery_beat.schedulers import ModelEntry

    every_minute, _ = IntervalSchedule.objects.get_or_create(every=60, period=IntervalSchedule.SECONDS)
    task = PeriodicTask.objects.create(
        name="tenant-1",
        task="jobs.ping",
        interval=every_minute,
        args=json.dumps([1, "a"]),
        kwargs=json.dumps({"k": [2]}),
        headers=json.dumps({"h": "v"}),
        queue="low",
        priority=3,
        expire_seconds=50,
        last_run_at=timezone.now() - timedelta(seconds=61),
    )
    entry = ModelEntry(task, app=current_app)
    following = scheduler.reserve(entry)
    rebuilt = ModelEntry(task, app=current_app)
    fields = ("name", "task", "args", "kwargs", "options", "last_run_at", "total_run_count")
    assert {f: getattr(following, f) for f in fields} == {f: getattr(rebuilt, f) for f in fields}
    assert following.schedule == rebuilt.schedule
    assert (following.total_run_count, entry.total_run_count) == (1, 0)  # the entry itself unchanged
    assert following.last_run_at > entry.last_run_at
    assert following.model is task
    assert task.total_run_count == 1


def test_a_send_keeps_celerys_settings_at_hand_and_gives_them_back(settings):
    """The reads of each send come from Celery's first map for the length of a batch, with the
    values the site set; afterwards a changed Django setting is read again, and what the app had
    set on its own configuration before is still there."""
    from config.celery import app
    from jobs.runtime.beat import SEND_SETTINGS, _send_settings_at_hand

    changes = app.conf.changes
    had = {key: changes.pop(key) for key in SEND_SETTINGS if key in changes}  # (an earlier test's)
    changes["task_repr_maxlevels"] = 7
    try:
        with _send_settings_at_hand(app.conf):
            assert set(SEND_SETTINGS) <= set(changes)
            assert changes["task_repr_maxlevels"] == 7
            assert changes["broker_pool_acquire_timeout"] == app.conf.broker_pool_acquire_timeout
        assert changes["task_repr_maxlevels"] == 7
        assert set(SEND_SETTINGS) & set(changes) == {"task_repr_maxlevels"}
        settings.CELERY_TASK_SEND_SENT_EVENT = not app.conf.task_send_sent_event
        assert app.conf.task_send_sent_event is settings.CELERY_TASK_SEND_SENT_EVENT
    finally:
        changes.pop("task_repr_maxlevels", None)
        changes.update(had)


def test_after_a_full_batch_the_next_tick_follows_at_once(scheduler, redis_client, monkeypatch):
    """A burst bigger than a tick's batch goes out batch after batch with no pause in between
    (a pause of TICK_SPACING per batch held a burst of 10 000 back 2 s); the last batch, not full,
    waits for the next due entry as before."""
    monkeypatch.setattr(beat, "BATCH", 4)
    schedules(10, due=True)
    schedules(1, due=False, prefix="later")
    assert scheduler.tick() == 0
    assert scheduler.tick() == 0
    assert len(queued(redis_client)) == 8
    assert beat.TICK_SPACING <= scheduler.tick() <= scheduler.max_interval  # the last two
    assert len(queued(redis_client)) == 10


def test_a_full_batch_of_one_entry_again_and_again_does_not_tick_at_once(scheduler, redis_client, monkeypatch):
    """An interval shorter than a tick fills a batch with the same entry: the next tick waits its
    spacing, so beat does not spin on it."""
    monkeypatch.setattr(beat, "BATCH", 4)
    every_microsecond, _ = IntervalSchedule.objects.get_or_create(every=1, period=IntervalSchedule.MICROSECONDS)
    PeriodicTask.objects.create(name="hasty", task="jobs.ping", interval=every_microsecond)
    assert scheduler.tick() >= beat.TICK_SPACING
