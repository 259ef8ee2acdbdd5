"""The mailer with a real worker, a real Redis and a real local SMTP server (aiosmtpd)."""

from __future__ import annotations

import pytest
from celery.result import AsyncResult

from jobs.models import DeadLetter, OutboxMessage
from jobs.services import dead_letters_requeue
from mailer.models import Email
from mailer.services import Attachment, email_queue
from mailer.tasks import send_email
from tests.conftest import grant
from tests.integration.conftest import wait_for
from tests.mailer.smtp_server import SMTPServer
from tests.mailer.test_queue import PDF, PNG

pytestmark = [pytest.mark.django_db(transaction=True), pytest.mark.integration]


@pytest.fixture
def smtp_server():
    with SMTPServer() as server:
        yield server


@pytest.fixture
def mail_worker(start_worker, smtp_server, settings):
    """Starts a worker that sends through `smtp_server`, with quick retries."""

    def start(**options):
        env = {
            "EMAIL_URL": smtp_server.url,
            "EMAIL_TIMEOUT": "5",
            "MEDIA_ROOT": str(settings.MEDIA_ROOT),
            "TASK_RETRY_BACKOFF_BASE": "0.2",
            "TASK_RETRY_BACKOFF_MAX": "2",
            "TASK_MAX_RETRIES": "2",
            "DEAD_LETTER_ALERT_EMAILS": "",
            # An idle worker waits out the whole soft shutdown before it exits; keep teardown short.
            "CELERY_SHUTDOWN_TIMEOUT": "1",
            **options.pop("extra_env", {}),
        }
        return start_worker(extra_env=env, **options)

    return start


def queue(name: str = "Ada", **kwargs) -> Email:
    return email_queue(template="welcome", to=[f"{name.lower()}@example.com"], context={"name": name}, **kwargs)


def sent(email: Email) -> Email | None:
    email.refresh_from_db()
    return email if email.status == Email.Status.SENT else None


def test_message_arrives_with_text_html_and_attachments(mail_worker, smtp_server):
    mail_worker()
    email = queue(
        request_id="rid-mail-1",
        attachments=[
            Attachment(filename="invoice.pdf", content=PDF, content_type="application/pdf"),
            Attachment(filename="logo.png", content=PNG, content_type="image/png", content_id="logo"),
        ],
    )
    wait_for(lambda: sent(email))
    assert email.attempts == 1
    assert email.last_error == ""

    [message] = smtp_server.messages
    assert message["Message-ID"] == email.message_id
    assert message["Subject"] == "Welcome to jobsite, Ada!"
    assert message["To"] == "ada@example.com"
    assert "Hello Ada," in message.get_body(preferencelist=("plain",)).get_content()
    assert "<h1" in message.get_body(preferencelist=("html",)).get_content()
    attachments = {part.get_filename(): part for part in message.iter_attachments()}
    assert attachments["invoice.pdf"].get_content() == PDF
    assert attachments["invoice.pdf"].get_content_type() == "application/pdf"
    assert [p.get_payload(decode=True) for p in message.walk() if p["Content-ID"] == "<logo>"] == [PNG]
    assert smtp_server.handler.envelopes == [("noreply@localhost", ["ada@example.com"])]


def test_451_is_retried_then_dead_lettered_and_a_requeue_delivers_once(mail_worker, smtp_server):
    smtp_server.handler.data_reply = "451 4.3.0 Temporary local problem, try again later"
    mail_worker()
    email = queue()
    row = wait_for(lambda: DeadLetter.objects.filter(task_name="mailer.send_email").first())
    assert row.reason == DeadLetter.Reason.RETRIES_EXHAUSTED
    assert row.retries == 2
    assert row.exception_type == "SMTPDataError"
    assert row.queue == "high"
    assert row.args == [email.pk]  # the id, nothing of the email
    email = wait_for(lambda: Email.objects.filter(pk=email.pk, status=Email.Status.FAILED).first())
    assert email.attempts == 3  # the first try and two retries
    assert "451" in email.last_error
    assert smtp_server.messages == []

    smtp_server.handler.data_reply = None  # the server recovers
    result = dead_letters_requeue(dead_letters=DeadLetter.objects.filter(pk=row.pk), actor="ops")
    assert result.count == 1
    assert AsyncResult(result.requeued[0][1]).get(timeout=30) == "sent"
    email.refresh_from_db()
    assert email.status == Email.Status.SENT
    assert email.attempts == 4
    assert email.last_error == ""
    assert [m["Message-ID"] for m in smtp_server.messages] == [email.message_id]
    row.refresh_from_db()
    assert row.status == DeadLetter.Status.REQUEUED


def test_a_refused_recipient_fails_the_email_for_the_user_without_a_dead_letter(mail_worker, smtp_server):
    """The address is the user's mistake: the email ends failed with a message saying so, counted
    and logged at WARNING, but no dead letter pages the operator (docs/operations.md)."""
    smtp_server.handler.rcpt_reply = "550 5.1.1 No such user here"
    worker = mail_worker()
    email = queue()
    email = wait_for(lambda: Email.objects.filter(pk=email.pk, status=Email.Status.FAILED).first())
    assert email.attempts == 1
    assert email.last_error.startswith("The receiving mail server refused the address for good: ada@example.com")
    wait_for(lambda: '"job.user_error"' in worker.log())
    assert not DeadLetter.objects.exists()
    # Forgotten in the ledger: its row ends a moment after the email is marked failed.
    wait_for(lambda: not OutboxMessage.objects.filter(task_name="mailer.send_email").exists())
    wait_for(lambda: "raised expected:" in worker.log())  # Celery's own line: not at ERROR either
    assert not [line for line in worker.log().splitlines() if '"level": "ERROR"' in line]


def test_a_redelivered_task_does_not_send_twice(mail_worker, smtp_server):
    mail_worker()
    email = queue()
    wait_for(lambda: sent(email))
    # The same task again, as Redis would redeliver it after a lost acknowledgement.
    assert send_email.apply_async((email.pk,)).get(timeout=30) == "sent"
    email.refresh_from_db()
    assert email.attempts == 1
    assert len(smtp_server.messages) == 1


def test_duplicate_deliveries_running_at_once_send_once(mail_worker, smtp_server):
    email = queue()
    duplicates = [send_email.apply_async((email.pk,)) for _ in range(3)]
    mail_worker(concurrency=2)
    for result in duplicates:
        assert result.get(timeout=30) == "sent"
    email.refresh_from_db()
    assert email.status == Email.Status.SENT
    assert email.attempts == 1
    assert [m["Message-ID"] for m in smtp_server.messages] == [email.message_id]
    assert not DeadLetter.objects.exists()


def test_one_worker_process_reuses_its_smtp_connection(mail_worker, smtp_server):
    mail_worker(concurrency=1)
    emails = [queue(name) for name in ("Ada", "Bob", "Cy", "Dee")]
    for email in emails:
        wait_for(lambda email=email: sent(email))
    assert len(smtp_server.messages) == 4
    assert smtp_server.handler.connections == 1


def test_a_deleted_email_fails_for_good_with_the_reason(mail_worker, smtp_server):
    email = queue()
    email_id = email.pk
    email.delete()
    mail_worker()
    result = send_email.apply_async((email_id,))
    with pytest.raises(Exception, match="does not exist"):
        result.get(timeout=30)
    assert smtp_server.messages == []
    row = wait_for(lambda: DeadLetter.objects.filter(task_id=result.id).first())
    assert row.exception_message == f"email {email_id} does not exist"
    assert row.failure_count == 1  # not retried


def test_a_copy_that_finds_the_email_being_sent_waits_for_the_lease_without_using_its_retries(mail_worker, smtp_server):
    """The copy used to retry with the normal backoff and budget: with a short backoff it gave up
    before the lease ended and the email stayed `sending` forever. Now it waits for the lease,
    outside the budget (here no retry at all is allowed), takes the email over and sends it once."""
    from django.db import transaction
    from django.utils import timezone

    mail_worker(extra_env={"TASK_MAX_RETRIES": "0", "MAILER_SENDING_LEASE_SECONDS": "3"})
    with transaction.atomic():  # published on commit, so the task finds the email already held
        email = queue("Grace")
        # An attempt that died mid hand-off a moment ago holds the lease.
        Email.objects.filter(pk=email.pk).update(status=Email.Status.SENDING, handed_off_at=timezone.now(), attempts=1)
    wait_for(lambda: sent(email), timeout=30)
    assert email.attempts == 2  # the held attempt, then the copy once the lease ended
    assert len(smtp_server.messages) == 1
    assert not DeadLetter.objects.exists()


def test_an_expired_email_task_ends_failed_with_a_dead_letter_not_stuck_queued(mail_worker, smtp_server):
    """A revoked or expired task used to end with no record: the email stayed `queued`."""
    from datetime import timedelta

    from django.utils import timezone

    from jobs.tasks import heartbeat

    mail_worker()
    email = Email.objects.create(to=["eve@example.com"], template="welcome", subject="Hi", body_text="Hi")
    expires = timezone.now() + timedelta(seconds=1)
    # A periodic tick that comes too late is skipped, not kept: the next tick runs. Beat sends it
    # through the ledger, which forgets it then (else the sweeper would send it again).
    tick = OutboxMessage.objects.create(task_name="jobs.heartbeat", task_id="late-tick", published_at=timezone.now())
    heartbeat.apply_async(
        countdown=2,
        expires=expires,
        task_id=tick.task_id,
        headers={"periodic_task_name": "jobs: heartbeat", "jobs_ledger": 1},
    )
    send_email.apply_async((email.pk,), countdown=2, expires=expires)
    row = wait_for(lambda: DeadLetter.objects.filter(task_name="mailer.send_email").first(), timeout=30)
    assert row.reason == DeadLetter.Reason.REVOKED
    assert "expired" in row.exception_message
    assert row.args == [email.pk]  # replayable
    # The dead letter is written first, then the app is told (a moment later under load).
    wait_for(lambda: Email.objects.get(pk=email.pk).status == Email.Status.FAILED, timeout=10)
    assert smtp_server.messages == []
    import time

    time.sleep(1)  # the tick was due at the same moment
    assert not DeadLetter.objects.filter(task_name="jobs.heartbeat").exists()
    wait_for(lambda: not OutboxMessage.objects.filter(task_id="late-tick").exists(), timeout=10)


def test_a_pool_process_killed_mid_hand_off_releases_the_email_at_once(mail_worker, smtp_server):
    """The dead attempt's claim used to hold the email `sending` for the whole lease (the task
    time limit plus the email timeout, 10 minutes): the worker's main process now releases it."""
    import os
    import signal

    import psutil

    smtp_server.handler.rcpt_delay = 5.0  # the hand-off is under way when the process dies
    worker = mail_worker(concurrency=1)
    email = queue("Lin")
    assert smtp_server.handler.rcpt_started.wait(20)
    [pool_process] = psutil.Process(worker.process.pid).children()
    os.kill(pool_process.pid, signal.SIGKILL)
    wait_for(lambda: sent(email), timeout=30)
    assert email.attempts == 2
    assert [m["Message-ID"] for m in smtp_server.messages] == [email.message_id]
    assert not DeadLetter.objects.exists()


@pytest.mark.parametrize("pool", ["shipped", "threads"])
def test_the_mail_pool_sends_each_email_once_beside_another_worker(mail_worker, smtp_server, pool):
    """The `high` worker as `make run`, compose and k8s start it (or the threads pool), with the
    all-queues worker competing for the same queue: every email arrives once, whole, with its own
    Message-ID, and is recorded sent at its first attempt. (Concurrent slots sharing one SMTP
    session, or a claim read back from the wrong row, would break it.)"""
    from django.db import transaction

    from bench.mail import shipped_pool

    name, concurrency = shipped_pool() if pool == "shipped" else ("threads", 8)
    with transaction.atomic():
        emails = [queue(f"User{i}") for i in range(60)]
    mail_worker(queues="high", concurrency=concurrency, extra_args=["-P", name])
    mail_worker(concurrency=2)
    ids = [email.pk for email in emails]
    wait_for(lambda: Email.objects.filter(pk__in=ids, status=Email.Status.SENT).count() == len(ids), timeout=60)
    received = [message["Message-ID"] for message in smtp_server.messages]
    assert sorted(received) == sorted(email.message_id for email in emails)
    assert set(Email.objects.filter(pk__in=ids).values_list("attempts", flat=True)) == {1}


def test_a_purge_enqueued_through_the_api_runs_on_the_low_queue_and_reports_its_count(
    mail_worker, smtp_server, client, django_user_model
):
    """Django's Tasks API in the site: the view enqueues `purge_sent_emails`, a worker that
    consumes only `low` runs it, and the detail view reads the outcome through get_result."""
    from datetime import timedelta

    from django.utils import timezone

    from tests.mailer.test_api import basic

    mail_worker(queues="low")
    fields = {"from_email": "site@example.com", "template": "welcome", "subject": "Hi", "to": ["a@example.com"]}
    Email.objects.create(**fields, status=Email.Status.SENT, sent_at=timezone.now() - timedelta(days=200))
    Email.objects.create(**fields, status=Email.Status.SENT, sent_at=timezone.now())
    grant(django_user_model.objects.create_user("staff", "staff@example.com", "s3cret-pass", is_staff=True))
    auth = basic("staff", "s3cret-pass")

    created = client.post("/api/emails/purge/", data='{"older_than_days": 90}', content_type="application/json", **auth)
    assert created.status_code == 202, created.content
    url = created.json()["url"]

    def done():
        body = client.get(url, **auth).json()
        return body if body["status"] in {"SUCCESSFUL", "FAILED"} else None

    body = wait_for(done, timeout=30)
    assert body["status"] == "SUCCESSFUL"
    assert body["purged"] == 1
    assert body["attempts"] == 1
    assert body["errors"] == []
    assert body["enqueued_at"] <= body["started_at"] <= body["finished_at"]
    assert Email.objects.count() == 1
