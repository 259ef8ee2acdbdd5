"""`manage.py requeue_dead` and `manage.py dead_letters`."""

from __future__ import annotations

from datetime import timedelta
from io import StringIO

import pytest
from django.core.management import CommandError, call_command
from django.utils import timezone

from jobs.management.commands import requeue_dead
from jobs.models import DeadLetter, OutboxMessage
from tests.jobs.factories import DeadLetterFactory

pytestmark = pytest.mark.django_db


def run(*args, **options):
    out, err = StringIO(), StringIO()
    call_command(*args, stdout=out, stderr=err, **options)
    return out.getvalue(), err.getvalue()


def pending_count():
    return DeadLetter.objects.filter(status="pending").count()


def test_requeue_by_ids(redis_client):
    a, b, _ = DeadLetterFactory.create_batch(3)
    out, _ = run("requeue_dead", str(a.pk), str(b.pk))
    assert "Requeued 2 dead letter(s)." in out
    assert pending_count() == 1
    assert redis_client.llen("normal") == 2


@pytest.mark.parametrize(
    ("args", "message"),
    [
        ((), "Nothing selected"),
        (("1", "--all"), "either ids or --all"),
        (("1", "--task", "x", "--queue", "low"), r"either ids or selectors \(--task, --queue\)"),
        (("--all", "--limit", "0"), "--limit must be a positive number"),
        (("--all", "--rate", "0"), "--rate must be a positive number"),
        (("--since", "yesterday"), "is not an ISO 8601"),
        (("--task", "no.such.task"), "No pending dead letters match"),
    ],
)
def test_requeue_refuses_with_one_readable_line(args, message, redis_client):
    DeadLetterFactory()
    with pytest.raises(CommandError, match=message):
        run("requeue_dead", *args)
    assert pending_count() == 1
    assert redis_client.llen("normal") == 0


def test_unknown_id_requeues_nothing(redis_client):
    row = DeadLetterFactory()
    with pytest.raises(CommandError, match="Unknown dead letter id\\(s\\): 999999"):
        run("requeue_dead", str(row.pk), "999999")
    assert pending_count() == 1
    assert redis_client.llen("normal") == 0


def test_not_pending_id_requeues_nothing(redis_client):
    row = DeadLetterFactory(status=DeadLetter.Status.DISCARDED)
    with pytest.raises(CommandError, match="Not pending"):
        run("requeue_dead", str(row.pk))


def test_selectors_combine(redis_client):
    old = timezone.now() - timedelta(days=3)
    DeadLetterFactory(task_name="a.task", queue="high", failed_at=old)
    target = DeadLetterFactory(task_name="a.task", queue="high", exception_type="TimeoutError", request_id="r-9")
    DeadLetterFactory(task_name="b.task", queue="low")
    since = (timezone.now() - timedelta(days=1)).isoformat()
    out, _ = run(
        "requeue_dead",
        "--task",
        "a.task",
        "--queue",
        "high",
        "--since",
        since,
        "--exception",
        "TimeoutError",
        "--request-id",
        "r-9",
        verbosity=2,
    )
    assert "Requeued 1 dead letter(s)." in out
    assert f"requeued #{target.pk} as task" in out
    assert redis_client.llen("high") == 1


def test_since_accepts_a_plain_date(redis_client):
    DeadLetterFactory()
    out, _ = run("requeue_dead", "--since", timezone.now().date().isoformat())
    assert "Requeued 1" in out


def test_limit_takes_the_oldest(redis_client):
    now = timezone.now()
    oldest = DeadLetterFactory(failed_at=now - timedelta(hours=2))
    DeadLetterFactory(failed_at=now)
    run("requeue_dead", "--all", "--limit", "1")
    oldest.refresh_from_db()
    assert oldest.status == DeadLetter.Status.REQUEUED
    assert pending_count() == 1


def test_dry_run_changes_nothing(redis_client):
    DeadLetterFactory.create_batch(2)
    out, _ = run("requeue_dead", "--all", "--dry-run")
    assert "Would requeue 2 dead letter(s)" in out
    assert pending_count() == 2
    assert redis_client.llen("normal") == 0


def test_progress_bar_on_large_runs(redis_client, monkeypatch):
    monkeypatch.setattr(requeue_dead, "PROGRESS_THRESHOLD", 3)
    DeadLetterFactory.create_batch(3)
    _, err = run("requeue_dead", "--all")
    assert "3/3" in err


def test_redacted_rows_are_reported_as_skipped(redis_client):
    DeadLetterFactory(redacted=True)
    DeadLetterFactory()
    out, err = run("requeue_dead", "--all")
    assert "Requeued 1" in out
    assert "arguments were redacted" in err


def test_publish_failure_exits_non_zero(redis_client, monkeypatch):
    from tests.conftest import reset_broker_pools

    DeadLetterFactory()
    reset_broker_pools()
    monkeypatch.setenv("CELERY_BROKER_URL", "redis://127.0.0.1:1/0")
    try:
        with pytest.raises(CommandError, match=r"Requeued 1 of 1 dead letter\(s\), then stopped.*1 of them wait"):
            run("requeue_dead", "--all")
    finally:
        monkeypatch.undo()
        reset_broker_pools()
    assert pending_count() == 0
    assert OutboxMessage.objects.filter(published_at__isnull=True).count() == 1  # the relay sends it later


def test_dead_letters_list_show_groups():
    row = DeadLetterFactory(kwargs={"n": 1}, request_id="rid-7")
    DeadLetterFactory(exception_type="TimeoutError")
    out, _ = run("dead_letters", "list")
    assert f"#{row.pk}" in out
    out, _ = run("dead_letters", "list", "--task", "nothing")
    assert "No dead letters match." in out
    out, _ = run("dead_letters", "show", str(row.pk))
    assert "PermanentError: cannot ever work" in out
    assert '"n": 1' in out
    assert "rid-7" in out
    out, _ = run("dead_letters", "groups")
    assert "tests.permanent" in out
    assert "TimeoutError" in out
    with pytest.raises(CommandError, match="Unknown dead letter id: 0"):
        run("dead_letters", "show", "0")


def test_dead_letters_groups_when_empty():
    out, _ = run("dead_letters", "groups")
    assert "No pending dead letters." in out


def test_dead_letters_discard():
    row = DeadLetterFactory()
    out, _ = run("dead_letters", "discard", str(row.pk))
    assert "Discarded 1 dead letter(s)." in out
    with pytest.raises(CommandError, match="Unknown dead letter id"):
        run("dead_letters", "discard", "424242")


def test_dead_letters_purge():
    old = timezone.now() - timedelta(days=10)
    DeadLetterFactory(status=DeadLetter.Status.DISCARDED, failed_at=old)
    DeadLetterFactory(failed_at=old)
    out, _ = run("dead_letters", "purge", "--older-than", "7d", "--dry-run")
    assert "Would delete 1" in out
    out, _ = run("dead_letters", "purge", "--older-than", "7d", "--include-pending")
    assert "Deleted 2" in out
    with pytest.raises(CommandError, match="not a duration"):
        run("dead_letters", "purge", "--older-than", "forever")


@pytest.mark.django_db(transaction=True)
def test_output_into_a_pipe_that_closes_early_ends_quietly():
    """`dead_letters show 1 | head`: head stops reading; the command stops without a traceback."""
    import subprocess
    import sys

    from config.env import BASE_DIR
    from tests.integration.conftest import process_env

    dead = DeadLetterFactory(traceback="  File 'x.py', line 1, in f\n" * 10_000)  # ~300 KB: more than a pipe holds
    shown = subprocess.run(  # noqa: S602 - a pipe is the point; the command line is ours
        f"{sys.executable} manage.py dead_letters show {dead.pk} | head -c 200",
        shell=True,
        cwd=BASE_DIR,
        env=process_env(),
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert shown.stdout.startswith("task:")
    assert "Traceback" not in shown.stderr
    assert "BrokenPipeError" not in shown.stderr


def test_every_option_of_list_and_show_says_what_it_takes():
    import argparse

    from jobs.management.commands.dead_letters import Command

    parser = Command().create_parser("manage.py", "dead_letters")
    (subparsers,) = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    for name in ("list", "show"):
        actions = [a for a in subparsers.choices[name]._actions if not isinstance(a, argparse._HelpAction)]
        assert actions
        assert all(action.help for action in actions), [a.dest for a in actions if not a.help]
