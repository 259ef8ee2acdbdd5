"""The job table's transitions (jobs.runtime.store): a run takes the start lease with one
conditional UPDATE; every copy of the message finds it taken, ended or for another attempt and
does nothing; a run ends, retries and gives back only what it holds."""

from __future__ import annotations

from datetime import timedelta

import pytest
from django.db import OperationalError, connection
from django.utils import timezone

from jobs.models import OutboxMessage
from jobs.runtime import store
from jobs.runtime.store import Run, Skip

pytestmark = pytest.mark.django_db

State = OutboxMessage.State


def _job(task_id: str = "job-1", **fields) -> OutboxMessage:
    fields.setdefault("published_at", timezone.now())
    return OutboxMessage.objects.create(task_name="jobs.ping", task_id=task_id, options={"queue": "low"}, **fields)


def _row(task_id: str = "job-1") -> OutboxMessage:
    return OutboxMessage.objects.get(task_id=task_id)


def test_the_first_message_takes_the_lease_and_every_copy_finds_it_taken():
    _job()
    run = store.job_start("job-1", retries=0, hostname="w1")
    assert isinstance(run, Run)
    row = _row()
    assert row.state == State.EXECUTING
    assert row.lease_owner == run.owner
    assert row.lease_owner.startswith(store.owner_prefix("w1"))
    assert row.runs == 1
    assert row.lease_until > timezone.now() + timedelta(seconds=10)  # JOBS_LEASE_SECONDS: 20 by default

    assert store.job_start("job-1", retries=0, hostname="w2") is Skip.COPY
    assert _row().runs == 1


def test_a_copy_of_a_finished_job_does_nothing():
    _job()
    run = store.job_start("job-1", retries=0, hostname="w1")
    assert store.job_finish("job-1", owner=run.owner) is True
    assert not OutboxMessage.objects.exists()
    assert store.job_start("job-1", retries=0, hostname="w1") is Skip.FINISHED


def test_a_message_of_an_earlier_attempt_does_nothing_and_a_later_one_waits_its_turn():
    _job(retries=2)
    assert store.job_start("job-1", retries=1, hostname="w1") is Skip.STALE
    assert store.job_start("job-1", retries=3, hostname="w1") is Skip.EARLY
    assert isinstance(store.job_start("job-1", retries=2, hostname="w1"), Run)


def test_a_job_waiting_in_the_table_starts_only_once_due():
    _job(state=State.RETRYABLE, published_at=None, not_before=timezone.now() + timedelta(minutes=5))
    assert store.job_start("job-1", retries=0, hostname="w1") is Skip.NOT_DUE
    OutboxMessage.objects.update(not_before=timezone.now() - timedelta(seconds=1))
    assert isinstance(store.job_start("job-1", retries=0, hostname="w1"), Run)


def test_a_copy_never_takes_over_a_lapsed_lease_the_sweeper_reclaims_it(redis_client):
    """A lease not renewed may belong to a run cut from the database, its end kept for later: a
    copy that took it over ran the body a second time (found by the chaos run, a 6 s outage)."""
    from jobs.runtime.ledger import ledger_reclaim

    _job(state=State.EXECUTING, lease_owner="w0:1:dead", lease_until=timezone.now() - timedelta(minutes=5))
    assert store.job_start("job-1", retries=0, hostname="w1") is Skip.COPY
    assert ledger_reclaim() == 1
    row = _row()
    assert (row.state, row.crashes) == (State.AVAILABLE, 1)
    assert isinstance(store.job_start("job-1", retries=0, hostname="w1"), Run)


def test_the_sweeper_leaves_a_lapsed_lease_whose_process_still_beats(redis_client):
    from jobs.runtime.ledger import ledger_reclaim

    long_ago = timezone.now() - timedelta(minutes=5)
    _job(state=State.EXECUTING, lease_owner="w0:7:cut-off", lease_until=long_ago)
    store.holder_beat("w0:7:")  # its keeper says, in Redis, that the process lives
    assert ledger_reclaim() == 0
    assert _row().state == State.EXECUTING
    redis_client.delete(store.HOLDER_KEY + "w0:7:")
    assert ledger_reclaim() == 1


def test_the_sweeper_reclaims_nothing_while_redis_cannot_say_who_lives(settings):
    from jobs.runtime.ledger import ledger_reclaim

    settings.JOBS_REDIS_URL = "redis://127.0.0.1:1/0"
    _job(state=State.EXECUTING, lease_owner="w0:1:dead", lease_until=timezone.now() - timedelta(minutes=5))
    assert ledger_reclaim() == 0
    assert _row().state == State.EXECUTING


def test_a_run_ends_only_the_row_it_holds():
    _job(state=State.EXECUTING, lease_owner="w2:9:new", lease_until=timezone.now() + timedelta(seconds=20))
    store.job_finish("job-1", owner="w1:1:old")
    assert OutboxMessage.objects.filter(task_id="job-1").exists()
    store.job_finish("job-1", owner="w2:9:new")
    assert not OutboxMessage.objects.exists()


def test_a_long_retry_waits_in_the_table_and_a_short_one_in_the_broker(settings):
    settings.JOBS_HOLD_IN_BROKER_MAX = 5
    _job()
    run = store.job_start("job-1", retries=0, hostname="w1")
    assert store.job_retry("job-1", retries=1, postponed=0, delay=120, owner=run.owner) is True
    row = _row()
    assert (row.state, row.retries, row.lease_owner, row.published_at) == (State.RETRYABLE, 1, "", None)
    assert timezone.now() + timedelta(seconds=100) < row.not_before < timezone.now() + timedelta(seconds=140)

    OutboxMessage.objects.update(not_before=timezone.now() - timedelta(seconds=1))  # SQLite: Now() is in ms
    run = store.job_start("job-1", retries=1, hostname="w1")
    assert store.job_retry("job-1", retries=2, postponed=0, delay=2, owner=run.owner) is False  # caller publishes
    row = _row()
    assert (row.state, row.retries, row.not_before) == (State.AVAILABLE, 2, None)
    assert row.published_at is not None


def test_a_stopped_run_gives_its_job_back_at_once():
    _job()
    run = store.job_start("job-1", retries=0, hostname="celery@w1")
    assert store.job_release("job-1", owner_prefix=store.owner_prefix("celery@w1", 12345)) is None  # not that one
    assert store.job_release("job-1", owner_prefix=run.owner.rsplit(":", 1)[0] + ":") == 0  # given back, no crash
    assert _row().state == State.AVAILABLE
    run = store.job_start("job-1", retries=0, hostname="celery@w1")
    assert isinstance(run, Run)
    prefix = run.owner.rsplit(":", 1)[0] + ":"
    assert store.job_release("job-1", owner_prefix=prefix, crashed=True) == 1  # its process died: a crash


@pytest.mark.django_db(transaction=True)
def test_an_end_the_database_refused_is_kept_and_written_later_with_the_lease_renewed(redis_client):
    _job()
    run = store.job_start("job-1", retries=0, hostname="w1")
    OutboxMessage.objects.update(lease_until=timezone.now() + timedelta(seconds=1))

    def refuse(execute, sql, params, many, context):
        raise OperationalError("the database system is starting up")

    with connection.execute_wrapper(refuse):
        assert store.job_finish("job-1", owner=run.owner) is False
    assert store.pending_writes() == 1
    assert OutboxMessage.objects.filter(task_id="job-1").exists()

    keeper = store._keeper()
    kept_owner, kept_write = keeper.pending["job-1"]
    keeper.pending["job-1"] = (kept_owner, _still_refused)
    keeper.renewed_at = float("-inf")
    with pytest.raises(OperationalError):
        keeper.tick()  # the write is refused again, but the lease was renewed first
    assert _row().lease_until > timezone.now() + timedelta(seconds=15)

    keeper.pending["job-1"] = (kept_owner, kept_write)
    keeper.tick()  # the database answers: the end is written
    assert store.pending_writes() == 0
    assert not OutboxMessage.objects.exists()


def _still_refused():
    raise OperationalError("still down")


def test_the_keeper_renews_the_lease_of_a_long_run(settings, redis_client):
    settings.JOBS_LEASE_SECONDS = 20
    _job()
    run = store.job_start("job-1", retries=0, hostname="w1")
    OutboxMessage.objects.update(lease_until=timezone.now() + timedelta(seconds=1))
    keeper = store._keeper()
    keeper.started["job-1"] -= 10  # running for 10 s: past a quarter of the lease
    keeper.renewed_at = float("-inf")
    keeper.tick()
    assert _row().lease_until > timezone.now() + timedelta(seconds=15)
    assert redis_client.exists(store.HOLDER_KEY + store.owner_prefix("w1"))  # and it beats in Redis
    store.run_ended("job-1")
    assert store.current_run("job-1") is None
    assert run.task_id == "job-1"


def test_the_sweeper_reclaims_a_lapsed_lease_once_and_gives_up_after_the_limit(settings, redis_client):
    from jobs.models import DeadLetter
    from jobs.runtime.ledger import ledger_reclaim

    settings.JOBS_WORKER_LOST_LIMIT = 3
    long_ago = timezone.now() - timedelta(minutes=5)
    _job("crashed", state=State.EXECUTING, lease_owner="w0:1:a", lease_until=long_ago)
    _job("crashed-often", state=State.EXECUTING, lease_owner="w0:1:b", lease_until=long_ago, crashes=2)
    _job("alive", state=State.EXECUTING, lease_owner="w0:1:c", lease_until=timezone.now() + timedelta(seconds=20))

    assert ledger_reclaim() == 1
    row = _row("crashed")
    assert (row.state, row.crashes, row.lease_owner) == (State.AVAILABLE, 1, "")
    assert row.published_at is not None
    assert not OutboxMessage.objects.filter(task_id="crashed-often").exists()
    assert DeadLetter.objects.get(task_id="crashed-often").reason == DeadLetter.Reason.WORKER_LOST
    assert _row("alive").state == State.EXECUTING
    assert ledger_reclaim() == 0  # once per crash
    from jobs.models import JobAttempt

    attempt = JobAttempt.objects.get(task_id="crashed")  # the job's page shows the crash
    assert (attempt.outcome, attempt.worker) == (JobAttempt.Outcome.CRASHED, "w0:1")


def test_each_failed_attempt_is_kept_with_its_worker_and_error(settings):
    from jobs.models import JobAttempt

    _job()
    run = store.job_start("job-1", retries=0, hostname="w1")
    store.job_retry("job-1", retries=1, postponed=0, delay=600, owner=run.owner, error="SMTPServerDisconnected: bye")
    second = store.job_start("job-1", retries=1, hostname="w2")
    assert second is Skip.NOT_DUE  # waits in the table
    OutboxMessage.objects.filter(task_id="job-1").update(not_before=timezone.now())
    second = store.job_start("job-1", retries=1, hostname="w2")
    assert store.job_release("job-1", owner_prefix=store.owner_prefix("w2"), crashed=True) == 1
    attempts = list(JobAttempt.objects.order_by("pk").values_list("attempt", "outcome", "error"))
    assert attempts == [
        (0, "retried", "SMTPServerDisconnected: bye"),
        (1, "crashed", "its process died"),
    ]
    assert JobAttempt.objects.first().worker == store.owner_prefix("w1").rstrip(":")
    # A retry of a row the run no longer holds writes nothing.
    store.job_retry("job-1", retries=2, postponed=0, delay=1, owner="someone-else")
    assert JobAttempt.objects.count() == 2


def test_nothing_but_the_store_writes_the_job_table():
    """One writer (jobs.runtime.store, with its start under limits per key in jobs.runtime.limits,
    whose transaction holds the keys' lock): every other module of `jobs` only reads the model. A write
    through the ORM (update, delete, create, bulk_create, bulk_update, save on a queryset or a
    manager of OutboxMessage) or raw SQL naming its table elsewhere fails this test."""
    import ast
    from pathlib import Path

    import jobs

    writes = {"update", "delete", "create", "bulk_create", "bulk_update", "get_or_create", "update_or_create"}

    def mentions_model(node: ast.AST) -> bool:
        return any(isinstance(n, ast.Name) and n.id in {"OutboxMessage", "Job"} for n in ast.walk(node))

    root = Path(jobs.__file__).parent
    found = []
    for path in sorted(root.rglob("*.py")):
        relative = path.relative_to(root).as_posix()
        if relative in {"runtime/store.py", "runtime/limits.py", "models.py"} or relative.startswith("migrations/"):
            continue
        source = path.read_text()
        for node in ast.walk(ast.parse(source)):
            if (
                isinstance(node, ast.Call)
                and isinstance(node.func, ast.Attribute)
                and node.func.attr in writes
                and mentions_model(node.func.value)
            ):
                found.append(f"{relative}:{node.lineno}")
        if "_meta.db_table" in source and "OutboxMessage._meta" in source:
            found.append(f"{relative}: raw SQL on the job table")
    assert found == []


@pytest.mark.django_db(transaction=True)
def test_an_end_kept_for_the_database_outlives_the_end_of_its_run():
    """The run's end (`run_ended`, in task_postrun's finally) dropped the kept write with the run:
    the row stayed executing, lapsed, and the body ran again (found in review)."""
    _job()
    run = store.job_start("job-1", retries=0, hostname="w1")

    def refuse(execute, sql, params, many, context):
        raise OperationalError("the database system is starting up")

    with connection.execute_wrapper(refuse):
        assert store.job_finish("job-1", owner=run.owner) is False
    store.run_ended("job-1", run.owner)
    assert store.pending_writes() == 1
    assert store.flush_pending()
    assert not OutboxMessage.objects.exists()


def test_the_publishers_late_update_leaves_a_retry_waiting_in_the_table():
    """A fast worker started the job, failed it and put it back to wait for its retry before the
    web's after-commit UPDATE: that UPDATE marked it published, and nothing ever published it."""
    row = store.job_add(task_name="jobs.ping", task_id="job-1", args=[], kwargs={}, options={})
    run = store.job_start("job-1", retries=0, hostname="w1")
    assert store.job_retry("job-1", retries=1, postponed=0, delay=120, owner=run.owner) is True
    store.job_published(row.pk)
    row = _row()
    assert (row.state, row.published_at) == (State.RETRYABLE, None)


def test_a_relays_late_mark_leaves_a_row_a_run_took_meanwhile():
    """The relay marks its batch published after up to 500 publishes: a row a run started, failed
    and put back for its retry meanwhile was marked published again, its backoff lost."""
    from jobs.runtime.outbox import CLAIM_TTL

    _job(published_at=None, attempts=1)
    claim, rows = store.jobs_claim(OutboxMessage.objects.all(), limit=10, ttl=CLAIM_TTL)
    assert [r.task_id for r in rows] == ["job-1"]
    run = store.job_start("job-1", retries=0, hostname="w1")  # the message got there first
    store.job_retry("job-1", retries=1, postponed=0, delay=120, owner=run.owner)
    store.jobs_published([rows[0].pk], [rows[0].pk], claims={claim})
    row = _row()
    assert (row.state, row.published_at, row.retries) == (State.RETRYABLE, None, 1)
    assert row.not_before is not None


def test_a_deferred_retry_never_overwrites_a_row_another_run_holds():
    """Celery's publish raised, but the broker had the retry: its attempt already runs."""
    _job(retries=1, state=State.EXECUTING, lease_owner="w2:1:next", lease_until=timezone.now() + timedelta(seconds=20))
    store.job_defer_retry(
        task_name="jobs.ping",
        task_id="job-1",
        args=[],
        kwargs={},
        options={},
        headers={},
        not_before=timezone.now() + timedelta(seconds=60),
        retries=1,
        postponed=0,
        owner="w1:1:previous",
    )
    assert (_row().state, _row().lease_owner) == (State.EXECUTING, "w2:1:next")


def test_the_sweeper_leaves_a_lapsed_lease_a_live_worker_says_it_runs(redis_client):
    """A body holding the GIL starves its keeper thread (no renewal, no beat); the worker's main
    process still lists the job among those it runs."""
    from jobs.runtime.ledger import ledger_reclaim, worker_reserved_publish

    _job(state=State.EXECUTING, lease_owner="w0:8:busy", lease_until=timezone.now() - timedelta(minutes=5))
    worker_reserved_publish("w0", ["job-1"])
    assert ledger_reclaim() == 0
    assert _row().state == State.EXECUTING


def _synchronous_commit() -> str:
    with connection.cursor() as cursor:
        cursor.execute("SHOW synchronous_commit")
        return str(cursor.fetchone()[0])


@pytest.mark.django_db(transaction=True)
def test_a_start_and_a_finish_in_autocommit_skip_the_wal_flush_and_nothing_else_does(settings):
    """Only these two statements' own transactions commit asynchronously: a setting that leaked
    into the session would make the next enqueue's INSERT losable by a database crash."""
    if connection.vendor != "postgresql":
        pytest.skip("the suite runs on SQLite here: synchronous_commit is PostgreSQL's")
    prefix, item = store._async_commit()
    with connection.cursor() as cursor:
        cursor.execute(f"{prefix}SELECT current_setting('synchronous_commit') FROM {item}")  # noqa: S608
        assert cursor.fetchone()[0] == "off"  # inside the statement's own transaction
    _job()
    run = store.job_start("job-1", retries=0, hostname="w1")
    assert isinstance(run, Run)
    assert _synchronous_commit() == "on"
    assert store.job_finish("job-1", owner=run.owner)
    assert not OutboxMessage.objects.exists()
    assert _synchronous_commit() == "on"

    settings.JOBS_LEASE_ASYNC_COMMIT = False
    assert store._async_commit() == ("", "")


def test_inside_a_transaction_the_start_and_finish_stay_durable():
    """The caller's transaction (a test's, an eager task inside a request) keeps its other writes
    durable: no statement of the store switches the flush off for it."""
    assert store._async_commit() == ("", "")
    _job()
    run = store.job_start("job-1", retries=0, hostname="w1")
    assert isinstance(run, Run)
    assert store.job_finish("job-1", owner=run.owner)
    if connection.vendor == "postgresql":
        assert _synchronous_commit() == "on"


def test_an_error_with_a_nul_character_does_not_keep_the_retry_from_being_written():
    """PostgreSQL text cannot hold NUL: the attempt's error loses it, the retry is written now."""
    from jobs.models import JobAttempt

    _job()
    run = store.job_start("job-1", retries=0, hostname="w1")
    assert store.job_retry("job-1", retries=1, postponed=0, delay=600, owner=run.owner, error="ValueError: a\x00b")
    assert _row().state == State.RETRYABLE
    assert JobAttempt.objects.get().error == "ValueError: ab"
    assert store.pending_writes() == 0


def test_a_cancelled_job_is_not_brought_back_by_a_retry_the_broker_refused():
    from jobs.services import jobs_cancel

    _job(state=State.AVAILABLE)
    jobs_cancel(task_ids=["job-1"], actor="test")
    store.job_defer_retry(
        task_name="jobs.ping",
        task_id="job-1",
        args=[],
        kwargs={},
        options={"queue": "low"},
        headers={},
        not_before=timezone.now(),
        retries=1,
        postponed=0,
    )
    assert not OutboxMessage.objects.exists()
