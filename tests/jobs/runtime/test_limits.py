"""Limits per key (jobs.limits, jobs.runtime.limits): a start over a concurrency or rate limit
makes its job wait in the table as `throttled`; the slot a run held comes back when its row ends,
is retried, or its lease expires; waiting jobs of a key start in order of arrival."""

from __future__ import annotations

import threading
import time
from datetime import timedelta

import pytest
from celery.exceptions import Ignore
from django.db import connection
from django.utils import timezone

from jobs.exceptions import PermanentError
from jobs.limits import Limit, LimitError, LimitKey, limit_keys, task_limits
from jobs.models import LimitHold, OutboxMessage
from jobs.runtime import store
from jobs.runtime.limits import Throttled, holds_purge, job_start_limited, limits_in_use, run_ended
from jobs.runtime.outbox import outbox_relay_due
from jobs.runtime.store import Run, Skip

pytestmark = pytest.mark.django_db

State = OutboxMessage.State


def _job(task_id: str, **fields) -> OutboxMessage:
    fields.setdefault("published_at", timezone.now())
    return OutboxMessage.objects.create(task_name="jobs.ping", task_id=task_id, options={"queue": "low"}, **fields)


def _row(task_id: str) -> OutboxMessage:
    return OutboxMessage.objects.get(task_id=task_id)


def _start(task_id: str, *keys: LimitKey, host: str = "w1"):
    return job_start_limited(task_id, retries=0, hostname=host, keys=list(keys))


def _concurrency(number: int, key: str = "acme") -> LimitKey:
    return LimitKey("sync", key, "concurrency", number, 1.0)


def _rate(number: int, per: float, key: str = "") -> LimitKey:
    return LimitKey("provider", key, "rate", number, per)


def _finish(run: Run) -> None:
    store.job_finish(run.task_id, owner=run.owner)
    store.run_ended(run.task_id, run.owner)
    run_ended(run)


# --- declaring limits -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("options", "error"),
    [
        ({"name": "a b", "concurrency": 1}, "letters, digits"),
        ({"name": "x"}, "give one of concurrency= or rate="),
        ({"name": "x", "concurrency": 1, "rate": 1}, "give one of concurrency= or rate="),
        ({"name": "x", "concurrency": 0}, "whole number >= 1"),
        ({"name": "x", "rate": True}, "whole number >= 1"),
        ({"name": "x", "rate": 5, "per": 0}, "more than 0"),
        ({"name": "x", "rate": 5, "per": 90_000}, "at most a day"),
        ({"name": "x", "concurrency": 1, "key": 42}, "format string or a callable"),
    ],
)
def test_a_limit_declared_wrongly_says_what_is_wrong(options, error):
    with pytest.raises(LimitError, match=error):
        Limit(**options)


def _task(*limits, run=None):
    def default_run(customer_id, region="eu", *, force=False):
        return None

    return type("Task", (), {"name": "tests.sync", "limits": limits, "run": staticmethod(run or default_run)})()


def test_keys_come_from_the_arguments_by_name_by_position_or_from_a_callable():
    task = _task(
        Limit("by-name", concurrency=2, key="{customer_id}:{region}"),
        Limit("by-position", concurrency=1, key="c{0}"),
        Limit("computed", rate=3, per=2, key=lambda customer_id, **kw: f"{customer_id % 2}"),
        Limit("global", rate=10),
    )
    keys = limit_keys(task, [7], {"force": True})
    assert keys == [
        LimitKey("by-name", "7:eu", "concurrency", 2, 1.0),
        LimitKey("by-position", "c7", "concurrency", 1, 1.0),
        LimitKey("computed", "1", "rate", 3, 2.0),
        LimitKey("global", "", "rate", 10, 1.0),
    ]
    assert limit_keys(_task(), [1], {}) == []


def test_a_key_the_arguments_cannot_give_is_a_clear_error():
    with pytest.raises(LimitError, match=r"limit 'sync': no key from the job's arguments \(KeyError"):
        limit_keys(_task(Limit("sync", concurrency=1, key="{tenant}")), [1], {})
    with pytest.raises(LimitError, match="at most 200 characters"):
        limit_keys(_task(Limit("sync", concurrency=1, key=lambda *a, **k: "x" * 201)), [1], {})
    with pytest.raises(LimitError, match="a limit is named twice"):
        task_limits(_task(Limit("sync", concurrency=1), Limit("sync", rate=1)))
    with pytest.raises(LimitError, match=r"are jobs\.limits\.Limit"):
        task_limits(_task("sync"))


# --- concurrency ------------------------------------------------------------------------------------


def test_a_third_start_of_a_key_limited_to_two_waits_in_the_table_and_other_keys_do_not():
    for name in ("a", "b", "c", "other"):
        _job(name)
    first, second = _start("a", _concurrency(2)), _start("b", _concurrency(2))
    assert isinstance(first, Run)
    assert isinstance(second, Run)
    assert first.limits == (("sync", "acme"),)

    third = _start("c", _concurrency(2))
    assert isinstance(third, Throttled)
    row = _row("c")
    assert row.state == State.THROTTLED
    assert row.published_at is None
    assert row.runs == 0
    assert row.retries == 0  # no retry spent
    # Without a wake-up it rechecks when the first running lease could lapse.
    assert row.not_before == min(_row("a").lease_until, _row("b").lease_until)
    assert LimitHold.objects.filter(task_id="c", started_at__isnull=True).count() == 1

    assert isinstance(_start("other", _concurrency(2, key="globex")), Run)


def test_a_run_that_ends_wakes_the_oldest_waiting_job_which_starts_before_newer_ones():
    for name in ("a", "b", "c", "d"):
        _job(name)
    first = _start("a", _concurrency(1))
    assert isinstance(_start("b", _concurrency(1)), Throttled)
    assert isinstance(_start("c", _concurrency(1)), Throttled)

    _finish(first)
    assert _row("b").not_before <= timezone.now()  # due now: the relay publishes it
    assert _row("c").not_before > timezone.now()

    # A job that arrives meanwhile queues behind the ones that wait.
    assert isinstance(_start("d", _concurrency(1)), Throttled)
    # A woken job published by the relay is `available` and still first in line.
    OutboxMessage.objects.filter(task_id="b").update(state=State.AVAILABLE, published_at=timezone.now())
    assert isinstance(_start("c", _concurrency(1)), Skip)  # not due: its message waits
    woken = _start("b", _concurrency(1))
    assert isinstance(woken, Run)
    assert not LimitHold.objects.filter(task_id="b", started_at__isnull=True).exists()


def test_a_slot_comes_back_when_its_run_retries_and_when_its_lease_expires():
    for name in ("a", "b", "c"):
        _job(name)
    first = _start("a", _concurrency(1))
    assert isinstance(_start("b", _concurrency(1)), Throttled)
    store.job_retry("a", retries=1, postponed=0, delay=600, owner=first.owner)
    OutboxMessage.objects.filter(task_id="b").update(not_before=timezone.now())
    second = _start("b", _concurrency(1))
    assert isinstance(second, Run)

    # Its process dies: nothing ends the row, the lease runs out.
    assert isinstance(_start("c", _concurrency(1)), Throttled)
    OutboxMessage.objects.filter(task_id="b").update(lease_until=timezone.now() - timedelta(seconds=1))
    OutboxMessage.objects.filter(task_id="c").update(not_before=timezone.now())
    assert isinstance(_start("c", _concurrency(1)), Run)


def test_copies_and_early_or_stale_messages_are_told_apart_as_without_limits():
    _job("a", retries=1)
    assert _start("missing", _concurrency(1)) is Skip.FINISHED
    assert job_start_limited("a", retries=0, hostname="w", keys=[_concurrency(1)]) is Skip.STALE
    assert job_start_limited("a", retries=2, hostname="w", keys=[_concurrency(1)]) is Skip.EARLY
    assert isinstance(job_start_limited("a", retries=1, hostname="w", keys=[_concurrency(1)]), Run)
    assert job_start_limited("a", retries=1, hostname="w", keys=[_concurrency(1)]) is Skip.COPY


def test_a_unique_key_held_while_queued_is_freed_by_a_limited_start():
    _job("a", unique_key="invoice:1", unique_while_running=False)
    assert isinstance(_start("a", _concurrency(1)), Run)
    assert _row("a").unique_key is None


# --- rate -------------------------------------------------------------------------------------------


def test_a_rate_limit_lets_n_starts_into_any_window_and_the_next_waits_for_the_oldest_to_leave_it():
    for name in ("a", "b", "c", "d"):
        _job(name)
    for name in ("a", "b", "c"):
        run = _start(name, _rate(3, 10))
        assert isinstance(run, Run)
        assert run.limits == ()  # no slot to give back: starts count for their window
        _finish(run)
    throttled = _start("d", _rate(3, 10))
    assert isinstance(throttled, Throttled)
    oldest = LimitHold.objects.filter(name="provider", started_at__isnull=False).order_by("started_at").first()
    assert throttled.until == oldest.started_at + timedelta(seconds=10)
    # Other keys of the same limit have windows of their own.
    _job("e")
    assert isinstance(_start("e", _rate(3, 10, key="other")), Run)

    # The window moves on: the oldest start leaves it.
    LimitHold.objects.filter(pk=oldest.pk).update(started_at=timezone.now() - timedelta(seconds=11))
    OutboxMessage.objects.filter(task_id="d").update(not_before=timezone.now())
    assert isinstance(_start("d", _rate(3, 10)), Run)


def test_a_job_over_two_limits_waits_for_the_later_one():
    for name in ("a", "b"):
        _job(name)
    assert isinstance(_start("a", _concurrency(1), _rate(1, 60)), Run)
    throttled = _start("b", _concurrency(1), _rate(1, 60))
    assert isinstance(throttled, Throttled)
    assert throttled.limit == "provider"  # the minute of the rate, not the lease of the slot
    assert LimitHold.objects.filter(task_id="b", started_at__isnull=True).count() == 2


# --- the relay, the reads, the purge ----------------------------------------------------------------


def test_the_relay_publishes_a_throttled_job_once_due(django_capture_on_commit_callbacks, redis_client):
    _job("a")
    _job("b")
    _start("a", _concurrency(1))
    _start("b", _concurrency(1))
    assert outbox_relay_due() == 0
    OutboxMessage.objects.filter(task_id="b").update(not_before=timezone.now() - timedelta(seconds=1))
    assert outbox_relay_due() == 1
    row = _row("b")
    assert row.state == State.AVAILABLE
    assert row.published_at is not None


def test_limits_in_use_and_the_purge_count_only_what_holds():
    for name in ("a", "b", "c", "d"):
        _job(name)
    first = _start("a", _concurrency(1))
    _start("b", _concurrency(1))
    _finish(_start("c", _rate(5, 30)))
    use = {u.name: u for u in limits_in_use()}
    assert (use["sync"].running, use["sync"].throttled, use["sync"].keys) == (1, 1, 1)
    assert (use["provider"].recent, use["provider"].running) == (1, 0)

    # A crashed run leaves its hold behind; the job ended elsewhere; the rate start is old.
    OutboxMessage.objects.filter(task_id="a").update(lease_owner="someone-else")
    OutboxMessage.objects.filter(task_id="b").delete()
    LimitHold.objects.filter(name="provider").update(counts_until=timezone.now() - timedelta(seconds=1))
    assert holds_purge() == 3
    assert not LimitHold.objects.exists()
    assert first.limits


# --- the worker's side: lease_take and skip_copy ------------------------------------------------------


class _Request:
    def __init__(self, task_id: str, args=(), kwargs=None):
        self.id = task_id
        self.args = list(args)
        self.kwargs = kwargs or {}
        self.retries = 0
        self.hostname = "w1"
        self.jobs_ledger = 1
        self.called_directly = False
        self.is_eager = False
        self.delivery_info = {"routing_key": "low"}
        self.task = "tests.sync"


def test_a_worker_acknowledges_a_throttled_message_and_refuses_a_job_without_a_key(monkeypatch):
    from jobs.runtime import task as task_module

    monkeypatch.setattr("jobs.runtime.pause.is_paused", lambda queue: False)
    limited = _task(Limit("sync", concurrency=1, key="{customer_id}"))
    _job("a")
    _job("b")
    first = _Request("a", [1])
    task_module.lease_take(first, limited)
    assert isinstance(first.jobs_run, Run)

    second = _Request("b", [1])
    task_module.lease_take(second, limited)
    assert second.jobs_skip == "throttled"
    with pytest.raises(Ignore):
        task_module.skip_copy(second)
    assert _row("b").state == State.THROTTLED

    _job("c")
    broken = _Request("c", [], {"region": "us"})
    task_module.lease_take(broken, limited)
    assert isinstance(broken.jobs_run, Run)  # started without its limits, to end at once
    with pytest.raises(PermanentError, match="no key from the job's arguments"):
        task_module.limit_refused(broken)


@pytest.mark.django_db(transaction=True)
def test_two_workers_racing_for_the_last_slot_take_it_once():
    if connection.vendor != "postgresql":
        pytest.skip("the suite runs on SQLite here: it serializes every write, there is no race to lose")
    for n in range(8):
        _job(f"j{n}")
    barrier = threading.Barrier(8)
    outcomes: list[object] = []

    def worker(n: int) -> None:
        try:
            barrier.wait(timeout=10)
            outcomes.append(_start(f"j{n}", _concurrency(2), host=f"w{n}"))
        finally:
            connection.close()

    threads = [threading.Thread(target=worker, args=(n,)) for n in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=30)
    assert len(outcomes) == 8
    assert sum(isinstance(o, Run) for o in outcomes) == 2
    assert OutboxMessage.objects.filter(state=State.EXECUTING).count() == 2
    assert OutboxMessage.objects.filter(state=State.THROTTLED).count() == 6


# --- seen by operators: the jobs page, the API, the dashboard, /metrics -------------------------------


def test_a_throttled_job_and_each_limits_use_are_shown_to_operators(client, watcher, monkeypatch):
    from jobs import dashboard

    monkeypatch.setattr(dashboard, "INSPECT_TIMEOUT", 0.2)  # no worker runs here
    for name in ("a", "b", "c"):
        _job(name)
    _start("a", _concurrency(1, key="tenant-7"))
    _start("b", _concurrency(1, key="tenant-7"))
    _finish(_start("c", _rate(5, 30)))

    body = client.get("/api/jobs/jobs/b/").json()
    assert body["state"] == "throttled"
    assert body["waits_for"] == [{"limit": "sync", "key": "tenant-7"}]
    assert body["due_at"] is not None
    listed = client.get("/api/jobs/jobs/?state=throttled").json()
    assert [job["id"] for job in listed["results"]] == ["b"]
    assert client.get("/api/jobs/jobs/counts/").json()["counts"]["throttled"] == 1

    page = client.get(f"/admin/jobs/job/{_row('b').pk}/change/").content.decode()
    assert "limit sync for key “tenant-7”" in page
    assert "over its limit, rechecks in" in page
    listing = client.get("/admin/jobs/job/?state=throttled").content.decode()
    assert "/admin/jobs/job/{}/change/".format(_row("b").pk) in listing
    assert "/admin/jobs/job/{}/change/".format(_row("a").pk) not in listing

    html = client.get("/admin/jobs/dashboard/").content.decode()
    table = html[html.index('<table id="limits">') :]
    table = table[: table.index("</table>")]
    assert '<td>sync</td><td>concurrency</td><td class="num">1</td>' in table
    assert '<td>provider</td><td>rate</td><td class="num">-</td><td class="num">1</td>' in table

    metrics = client.get("/metrics").content.decode()
    assert 'jobs_limit_running{limit="sync"} 1.0' in metrics
    assert 'jobs_limit_throttled{limit="sync"} 1.0' in metrics
    assert 'jobs_limit_recent_starts{limit="provider"} 1.0' in metrics
    assert "tenant-7" not in metrics  # keys are no labels


def test_the_system_check_names_limits_declared_wrongly_or_differently_under_one_name(monkeypatch):
    from celery import current_app

    from jobs.checks import check_limits

    assert check_limits() == []  # the project's and the tests' own tasks
    monkeypatch.setitem(current_app.tasks, "a.one", _task(Limit("shared", concurrency=2)))
    monkeypatch.setitem(current_app.tasks, "b.two", _task(Limit("shared", concurrency=3)))
    monkeypatch.setitem(current_app.tasks, "c.bad", _task("not a limit"))
    messages = {(m.id, m.msg.split(":")[0] if m.msg.startswith("Task ") else m.msg) for m in check_limits()}
    assert ("jobs.E003", "Task c.bad") in messages
    assert (
        "jobs.E003",
        "Tasks a.one and b.two declare the limit 'shared' differently "
        "(concurrency 2 per 1 s, and concurrency 3 per 1 s).",
    ) in messages


@pytest.mark.parametrize("free", [True, False], ids=["starts", "throttles"])
def test_a_row_the_relay_marks_published_after_the_worker_read_it_still_starts_or_waits(monkeypatch, free):
    """The relay marks a row `available` once the broker took its message, which can be after a
    worker received that message and read the row as `throttled`: the start (or the throttle)
    went by the state read, found nothing, and acknowledged the message: the job waited for the
    sweeper's "missing from the broker" (40 s in a test)."""
    from jobs.runtime import limits

    for name in ("a", "b"):
        _job(name)
    if not free:
        _start("a", _concurrency(1))
    OutboxMessage.objects.filter(task_id="b").update(
        state=State.THROTTLED, not_before=timezone.now() - timedelta(seconds=1), published_at=None
    )
    read = limits._lock_and_read

    def read_then_relay_marks(cursor, task_id, keys):
        found = read(cursor, task_id, keys)
        OutboxMessage.objects.filter(task_id=task_id).update(
            state=State.AVAILABLE, published_at=timezone.now(), not_before=None
        )
        return found

    monkeypatch.setattr(limits, "_lock_and_read", read_then_relay_marks)
    outcome = _start("b", _concurrency(1))
    row = _row("b")
    if free:
        assert isinstance(outcome, Run)
        assert row.state == State.EXECUTING
    else:
        assert isinstance(outcome, Throttled)
        assert row.state == State.THROTTLED
        assert row.published_at is None  # the relay publishes it again when due


def test_a_run_given_back_by_its_worker_wakes_the_next_job_and_a_retry_keeps_its_place():
    for name in ("a", "b"):
        _job(name)
    first = _start("a", _concurrency(1))
    assert isinstance(_start("b", _concurrency(1)), Throttled)
    prefix = store.owner_prefix("w1")
    assert store.job_release("a", owner_prefix=prefix, crashed=True) is not None
    from jobs.runtime.limits import release_ended

    release_ended("a", prefix)
    assert _row("b").not_before <= timezone.now()  # not the dead run's lease end
    assert first.limits

    # The same job waits again (a retry of it throttled) before its earlier run's end is seen:
    # that end forgets its own start, not the job's new place in line.
    OutboxMessage.objects.filter(task_id="b").update(state=State.AVAILABLE)
    second = _start("b", _concurrency(1))
    assert isinstance(second, Run)
    _job("c")
    assert isinstance(_start("c", _concurrency(1)), Throttled)
    LimitHold.objects.create(name="sync", key="acme", kind="concurrency", task_id="b", job_id=_row("b").pk)
    run_ended(second)
    assert LimitHold.objects.filter(task_id="b", started_at__isnull=True).exists()
    assert not LimitHold.objects.filter(task_id="b", started_at__isnull=False).exists()


@pytest.mark.django_db(transaction=True)
def test_a_run_that_ends_while_a_start_decides_to_wait_wakes_that_job():
    """The start saw the run still running; the run ended and woke nobody (the start's place in
    line was not committed yet); the start then made its job wait for the old lease's end with
    the slot free. The end now waits for the keys' locks, as a start does."""
    if connection.vendor != "postgresql":
        pytest.skip("the suite runs on SQLite here: it serializes every write, there is no race to lose")
    from django.db import transaction

    from jobs.runtime import limits

    for name in ("a", "b"):
        _job(name)
    first = _start("a", _concurrency(1))
    holding = threading.Event()
    keys = [_concurrency(1)]

    def start_that_waits() -> None:
        try:
            with transaction.atomic(), connection.cursor() as cursor:
                now, _row_read = limits._lock_and_read(cursor, "b", keys)
                holding.set()
                time.sleep(1.0)  # meanwhile the run ends
                limits._throttle(cursor, "b", _row("b").pk, 0, keys, now + timedelta(seconds=20))
        finally:
            connection.close()

    thread = threading.Thread(target=start_that_waits)
    thread.start()
    assert holding.wait(10)
    store.job_finish("a", owner=first.owner)
    run_ended(first)  # waits for the start's commit
    thread.join(10)
    row = _row("b")
    assert row.state == State.THROTTLED
    assert row.not_before <= timezone.now()


@pytest.mark.django_db(transaction=True)
def test_the_purge_forgets_rate_starts_by_the_databases_clock_not_the_sweepers(monkeypatch):
    if connection.vendor != "postgresql":
        pytest.skip("the suite runs on SQLite here: one host, one clock")
    from jobs.runtime import limits

    for name in ("a", "b"):
        _job(name)
    _finish(_start("a", _rate(1, 60)))
    ahead = timezone.now() + timedelta(seconds=61)
    monkeypatch.setattr(limits.timezone, "now", lambda: ahead)  # the sweeper's host runs ahead
    holds_purge()
    monkeypatch.undo()
    assert isinstance(_start("b", _rate(1, 60)), Throttled)
