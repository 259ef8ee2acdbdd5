"""The operator's dashboard at /admin/jobs/dashboard/, read from the suite's Redis and database
(no worker: the page's broadcast finds none). With a worker, in a real browser:
tests/integration/test_console_browser.py."""

from __future__ import annotations

import re
import uuid
from datetime import UTC, timedelta

import pytest
from django.contrib.auth.models import Permission
from django.utils import timezone
from django_celery_beat.models import CrontabSchedule, IntervalSchedule, PeriodicTask

from jobs import dashboard
from jobs.dashboard import bar_chart, queue_of
from jobs.models import DeadLetter, DeadLetterEvent, OutboxMessage
from jobs.runtime.results import results_write
from jobs.templatetags.jobs_dashboard import duration
from tests.conftest import reset_broker_pools
from tests.integration import django_tasks as samples
from tests.jobs.factories import DeadLetterFactory

pytestmark = pytest.mark.django_db(transaction=True)

URL = "/admin/jobs/dashboard/"


@pytest.fixture(autouse=True)
def _quick_broadcast(monkeypatch):
    monkeypatch.setattr(dashboard, "INSPECT_TIMEOUT", 0.2)  # no worker runs here: do not wait a second


@pytest.fixture
def staff(django_user_model, client):
    """A staff member who may view dead letters, schedules and unfinished jobs (and change nothing),
    logged in."""
    user = django_user_model.objects.create_user("watcher", password="pw", is_staff=True)
    user.user_permissions.add(
        *Permission.objects.filter(codename__in=["view_deadletter", "view_periodictask", "view_job"]),
    )
    client.force_login(user)
    return user


def history(task_name: str, status: str, done_at, *, periodic: str | None = None, task_id: str | None = None):
    results_write(
        [
            {
                "task_id": task_id or str(uuid.uuid4()),
                "status": status,
                "result": "null",
                "meta": "{}",
                "content_type": "application/json",
                "content_encoding": "utf-8",
                "task_name": task_name,
                "periodic_task_name": periodic,
                "date_created": done_at,
                "date_done": done_at,
            }
        ]
    )


def section(html: str, name: str) -> str:
    found = re.search(rf'<section id="{name}".*?</section>', html, re.S)
    assert found, f"no section {name}"
    return found.group(0)


def test_the_dashboard_is_for_staff_and_listed_in_the_admin_index(client, django_user_model):
    assert client.get(URL).status_code == 302  # to the admin's login
    user = django_user_model.objects.create_user("someone", password="pw")
    client.force_login(user)
    assert client.get(URL).status_code == 302
    user.is_staff = True
    user.save()
    page = client.get(URL)
    assert page.status_code == 200
    assert "<h1>Dashboard</h1>" in page.content.decode()
    index = client.get("/admin/").content.decode()
    assert 'href="/admin/jobs/dashboard/"' in index


def test_queues_show_depth_the_oldest_waiting_job_and_what_finished_in_the_last_hour(client, staff, redis_client):
    first = samples.add.enqueue(1, 2)  # the normal queue, through the ledger
    samples.add.enqueue(3, 4)
    OutboxMessage.objects.filter(task_id=first.id).update(created_at=timezone.now() - timedelta(minutes=7))
    now = timezone.now()
    for _ in range(3):
        history("mailer.send_email", "SUCCESS", now - timedelta(minutes=5))  # routed to high
    history("mailer.send_email", "FAILURE", now - timedelta(minutes=5))
    history("mailer.send_email", "SUCCESS", now - timedelta(hours=2))  # out of the window
    history("mailer.send_email", "STARTED", now)  # not finished

    html = client.get(URL).content.decode()
    queues = section(html, "queues")
    high = re.search(r'<tr id="queue-high">.*?</tr>', queues, re.S).group(0)
    normal = re.search(r'<tr id="queue-normal">.*?</tr>', queues, re.S).group(0)
    assert re.search(r'class="num depth">2<', normal)
    assert re.search(r'class="num oldest">7 min( \d+ s)?<', normal)
    assert re.search(r'class="num depth">0<', high)
    assert re.search(r'class="num succeeded">3<', high)
    assert re.search(r'class="num failed"><span class="bad">1<', high)
    assert "3 succeeded, 1 failed" in high  # the minute's bar says what it holds
    assert "queue-other" not in queues


def test_a_staff_member_sees_dead_letters_and_schedules_only_with_the_permission_to_view_them(
    client, django_user_model
):
    DeadLetterFactory()
    user = django_user_model.objects.create_user("plain", password="pw", is_staff=True)
    client.force_login(user)
    html = client.get(URL).content.decode()
    assert "Seeing dead letters takes the permission jobs.view_deadletter." in section(html, "dead-letters")
    assert "tests.permanent" not in html
    assert "Pending dead letters" not in section(html, "health")
    assert "takes the permission django_celery_beat.view_periodictask" in section(html, "schedules")
    assert "takes the permission jobs.view_job" in section(html, "ledger")
    assert "Unfinished jobs" not in section(html, "health")
    assert "<table" in section(html, "queues")  # the operator's counts stay


def test_a_broker_that_does_not_answer_empties_only_what_it_feeds(client, staff, dead_broker):
    DeadLetterFactory()
    page = client.get(URL)
    assert page.status_code == 200
    html = page.content.decode()
    assert "The broker did not answer" in section(html, "queues")
    assert "ConnectionRefusedError" in html or "OperationalError" in html
    assert re.search(r'class="num depth"><span class="muted">\?', html)
    assert 'Pending <b class="bad">1</b>' in section(html, "dead-letters")
    # The workers are not asked through a broker known to be down (that waited seconds).
    assert "Could not ask the workers: the broker did not answer" in section(html, "workers")


def test_a_broker_key_prefix_is_kept_when_counting_and_peeking(redis_client, monkeypatch):
    """kombu's `global_keyprefix`: its passive declare and LINDEX look for keys without it."""
    from celery import current_app as app

    from jobs.selectors import queue_heads, queue_lengths

    options = {**(app.conf.broker_transport_options or {}), "global_keyprefix": "pfx:"}
    monkeypatch.setitem(app.conf, "broker_transport_options", options)
    reset_broker_pools()
    try:
        sent = app.send_task("tests.permanent", args=["k"], queue="low")
        assert (redis_client.llen("pfx:low"), redis_client.llen("low")) == (1, 0)
        assert queue_lengths(["low", "normal"]) == {"low": 1, "normal": 0}
        assert queue_heads(["low"]) == {"low": [sent.id]}
    finally:
        monkeypatch.undo()
        reset_broker_pools()


def test_dead_letters_by_cause_with_their_trend_and_the_permanent_ones_counted(client, staff):
    now = timezone.now()
    for hours_ago, reason in (
        (0, DeadLetter.Reason.PERMANENT_ERROR),
        (0, "retries_exhausted"),
        (5, "retries_exhausted"),
    ):
        DeadLetterFactory(
            task_name="mailer.send_email",
            exception_type="SMTPDataError",
            reason=reason,
            failed_at=now - timedelta(hours=hours_ago),
        )
    DeadLetterFactory(task_name="thumbnails.generate", exception_type="OSError", failed_at=now - timedelta(days=3))
    DeadLetterFactory(task_name="thumbnails.generate", exception_type="OSError", status=DeadLetter.Status.DISCARDED)

    overview = dashboard.dead_letter_overview(now)
    assert overview["counts"] == {"pending": 4, "requeued": 0, "discarded": 1}
    assert overview["recent"] == 4  # the one of three days ago is out of the 24 hours
    first = overview["groups"][0]
    assert (first["task_name"], first["exception_type"], first["count"], first["permanent"]) == (
        "mailer.send_email",
        "SMTPDataError",
        3,
        1,
    )
    assert first["recent"] == 3
    html = section(client.get(URL).content.decode(), "dead-letters")
    assert "(1 permanent)" in html
    assert "Requeue 3" not in html  # no permission to change dead letters: nothing to click


def test_a_cause_is_requeued_or_discarded_from_the_dashboard_with_its_audit(client, staff, redis_client):
    staff.user_permissions.add(Permission.objects.get(codename="change_deadletter"))
    mail = [DeadLetterFactory(task_name="tests.permanent", exception_type="SMTPDataError") for _ in range(2)]
    other = DeadLetterFactory(task_name="tests.permanent", exception_type="OSError")
    html = section(client.get(URL).content.decode(), "dead-letters")
    assert "Requeue 2" in html
    assert "will likely fail again" in html  # the confirmation names the permanent ones

    page = client.post(
        URL, {"action": "requeue", "task_name": "tests.permanent", "exception_type": "SMTPDataError"}, follow=True
    )
    assert "Requeued 2 dead letters." in page.content.decode()
    assert {row.status for row in DeadLetter.objects.filter(pk__in=[d.pk for d in mail])} == {"requeued"}
    assert DeadLetterEvent.objects.filter(action="requeued", actor="admin:watcher").count() == 2
    assert redis_client.llen("normal") + redis_client.llen("celery") == 2

    client.post(URL, {"action": "discard", "task_name": "tests.permanent", "exception_type": "OSError"})
    other.refresh_from_db()
    assert other.status == DeadLetter.Status.DISCARDED
    assert DeadLetterEvent.objects.get(dead_letter=other, action="discarded").actor == "admin:watcher"


def test_acting_on_dead_letters_needs_the_permission_to_change_them(client, staff):
    row = DeadLetterFactory()
    page = client.post(URL, {"action": "discard", "task_name": row.task_name, "exception_type": row.exception_type})
    assert page.status_code == 403
    row.refresh_from_db()
    assert row.status == DeadLetter.Status.PENDING


def test_schedules_show_their_next_and_last_run_and_how_the_last_one_ended(client, staff):
    every = IntervalSchedule.objects.create(every=30, period=IntervalSchedule.SECONDS)
    ran = timezone.now() - timedelta(seconds=10)
    PeriodicTask.objects.create(name="heartbeat", task="jobs.heartbeat", interval=every, last_run_at=ran)
    PeriodicTask.objects.create(name="off", task="jobs.heartbeat", interval=every, enabled=False)
    at_four = CrontabSchedule.objects.create(minute="0", hour="4", timezone="UTC")
    PeriodicTask.objects.create(name="nightly", task="jobs.daily_report", crontab=at_four)
    history("jobs.heartbeat", "FAILURE", ran, periodic="heartbeat", task_id="beat-run-1")

    rows = {row["task"].name: row for row in dashboard.schedules_overview(timezone.now())["rows"]}
    assert abs((rows["heartbeat"]["next_run"] - (ran + timedelta(seconds=30))).total_seconds()) < 1
    assert rows["heartbeat"]["last_outcome"]["status"] == "FAILURE"
    assert rows["off"]["next_run"] is None
    nightly = rows["nightly"]["next_run"].astimezone(UTC)
    assert (nightly.hour, nightly.minute, nightly.second) == (4, 0, 0)
    assert timedelta(0) < nightly - timezone.now() <= timedelta(days=1)
    html = section(client.get(URL).content.decode(), "schedules")
    assert '?q=beat-run-1">failure</a>' in html
    assert "disabled" in html


def test_the_next_run_is_worked_out_as_beat_does(client, staff):
    now = timezone.now()
    hourly = IntervalSchedule.objects.create(every=1, period=IntervalSchedule.HOURS)
    later = (now + timedelta(hours=2)).replace(microsecond=0)
    PeriodicTask.objects.create(name="starts later", task="jobs.heartbeat", interval=hourly, start_time=later)
    PeriodicTask.objects.create(name="never ran", task="jobs.heartbeat", interval=hourly)
    PeriodicTask.objects.create(
        name="expired", task="jobs.heartbeat", interval=hourly, expires=now - timedelta(minutes=1)
    )
    first = {row["task"].name: row["next_run"] for row in dashboard.schedules_overview(now)["rows"]}
    assert first["starts later"] == later  # its first run is at its start, not an interval after
    assert first["expired"] is None
    created = PeriodicTask.objects.get(name="never ran").date_changed
    assert abs((first["never ran"] - (created + timedelta(hours=1))).total_seconds()) <= 1
    again = {row["task"].name: row["next_run"] for row in dashboard.schedules_overview(timezone.now())["rows"]}
    assert again["never ran"] == first["never ran"]  # not a moment that moves on with every read


def test_the_ledger_section_counts_unfinished_jobs_by_state(client, staff):
    now = timezone.now()
    OutboxMessage.objects.create(task_name="t", task_id="a", created_at=now - timedelta(minutes=3))
    OutboxMessage.objects.create(task_name="t", task_id="b", published_at=now)
    OutboxMessage.objects.create(task_name="t", task_id="c", not_before=now + timedelta(hours=1))
    OutboxMessage.objects.create(task_name="t", task_id="d", published_at=now, missing_since=now)
    ledger = dashboard.ledger_overview()
    assert (ledger["total"], ledger["backlog"], ledger["waiting_for_time"], ledger["missing"]) == (4, 1, 1, 1)
    assert 170 < ledger["oldest_age"] < 200
    assert 'Backlog</a> <b class="warn">1</b>' in section(client.get(URL).content.decode(), "ledger")


def test_a_task_counts_under_the_queue_it_is_routed_to():
    queues = ["high", "normal", "low"]
    assert queue_of("mailer.send_email", queues) == "high"  # CELERY_TASK_ROUTES
    assert queue_of("tests.integration.django_tasks.pair", queues) == "high"  # a Django task of priority 10
    assert queue_of("mailer.tasks.purge_sent_emails", queues) == "low"  # priority -10
    assert queue_of("no.such.task", queues) == "normal"  # the default queue
    assert queue_of(None, queues) == "other"  # history stored without task names


def test_a_chart_is_svg_drawn_on_the_server_with_what_each_bar_holds():
    svg = str(bar_chart([("ok", [0, 2, 4], "green"), ("bad", [0, 0, 4], "red")], ["a", "b", "<c>"], title="T&"))
    assert svg.startswith('<svg class="chart"')
    assert "<title>a: none</title>" in svg
    assert "<title>b: 2 ok</title>" in svg
    assert "<title>&lt;c&gt;: 4 ok, 4 bad</title>" in svg  # labels are escaped
    heights = re.findall(r'height="([\d.]+)" style="fill', svg)
    assert heights == ["9.5", "19.0", "19.0"]  # the tallest bar (4 + 4) fills the chart's 38 pixels
    assert 'aria-label="T&amp;"' in svg


@pytest.mark.parametrize(
    ("seconds", "text"),
    [
        (None, "-"),
        (0.4, "0 s"),
        (59, "59 s"),
        (60, "1 min"),
        (200, "3 min 20 s"),
        (7500, "2 h 5 min"),
        (90000, "1 d 1 h"),
    ],
)
def test_durations_read_as_an_operator_reads_them(seconds, text):
    assert duration(seconds) == text
