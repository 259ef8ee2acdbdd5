"""The one failure path: every way a job ends is recorded, and its app is told, so no row is left
`processing`, `queued` or `sending` with nothing to move it. Database connections cut under the
recorder are replaced, and nothing after a commit can undo what committed."""

from __future__ import annotations

import json
from types import SimpleNamespace

import pytest
from celery.exceptions import TimeLimitExceeded
from django.core.cache import cache
from django.core.files.storage import default_storage
from django.db import InterfaceError, OperationalError, connection

from jobs.models import DeadLetter, OutboxMessage
from jobs.runtime.worker import JobConsumer
from mailer.models import Email
from mailer.services import SentNotRecorded, email_queue, email_send
from tests.thumbnails import images
from thumbnails import services as thumbnail_services
from thumbnails.models import Image
from thumbnails.tasks import generate

pytestmark = pytest.mark.django_db(transaction=True)  # outside a transaction, as in a worker


def _cut(statement_start: str, *, times: int = 1, error: type[Exception] = OperationalError):
    """An execute wrapper failing the first `times` statements that start with `statement_start`,
    as a database restart fails the statement that meets the dead connection."""
    calls = []

    def wrapper(execute, sql, params, many, context):
        if sql.lstrip().upper().startswith(statement_start) and len(calls) < times:
            calls.append(sql)
            raise error("server closed the connection unexpectedly")
        return execute(sql, params, many, context)

    wrapper.calls = calls
    return wrapper


def test_a_thumbnail_given_up_in_the_main_process_is_marked_failed(redis_client):
    """A hard time limit is handled by the worker's main process, which calls `on_failure` there:
    the image used to stay `processing` (only the task body marked it)."""
    image = thumbnail_services.image_create(upload=images.upload(images.jpeg()))
    Image.objects.filter(pk=image.pk).update(status=Image.Status.PROCESSING)
    generate.on_failure(TimeLimitExceeded(600), "hard-1", (image.pk,), {}, None)
    image.refresh_from_db()
    assert image.status == Image.Status.FAILED
    assert "TimeLimitExceeded" in image.error
    assert DeadLetter.objects.get(task_id="hard-1").reason == DeadLetter.Reason.TIME_LIMIT


def test_a_finished_image_is_not_marked_failed_by_a_late_give_up(redis_client):
    image = thumbnail_services.image_create(upload=images.upload(images.jpeg()))
    Image.objects.filter(pk=image.pk).update(status=Image.Status.DONE)
    generate.on_failure(TimeLimitExceeded(600), "hard-2", (image.pk,), {}, None)
    image.refresh_from_db()
    assert image.status == Image.Status.DONE


def test_the_dead_letter_is_written_on_a_new_connection_when_the_old_one_died(redis_client):
    with connection.execute_wrapper(cut := _cut("SELECT", error=InterfaceError)):
        generate.on_failure(RuntimeError("boom"), "cut-1", (999,), {}, None)
    assert cut.calls  # the first statement met the dead connection
    assert DeadLetter.objects.filter(task_id="cut-1").exists()


def test_a_given_up_job_leaves_the_ledger_only_once_its_dead_letter_is_safe(redis_client):
    OutboxMessage.objects.create(task_name="thumbnails.generate", task_id="kept-1", args=[5])
    with connection.execute_wrapper(_cut("INSERT", times=99)):  # the database stays away
        generate.on_failure(RuntimeError("boom"), "kept-1", (5,), {}, None)
    assert OutboxMessage.objects.filter(task_id="kept-1").exists()  # it will run again, not be lost
    generate.on_failure(RuntimeError("boom"), "kept-1", (5,), {}, None)
    assert not OutboxMessage.objects.filter(task_id="kept-1").exists()


def test_a_commit_hook_that_meets_a_database_error_never_undoes_what_committed(redis_client):
    """The UPDATE after the publish used to raise out of `atomic()` after COMMIT: `image_create`
    then deleted the original of an image that had been committed, and the client got a 500."""
    with connection.execute_wrapper(cut := _cut("UPDATE")):
        image = thumbnail_services.image_create(upload=images.upload(images.jpeg()))
    assert cut.calls
    assert Image.objects.filter(pk=image.pk).exists()
    assert default_storage.exists(image.original.name)
    assert redis_client.llen("normal") == 1  # it was published; the relay may publish it again


@pytest.fixture
def smtp(settings):
    from tests.mailer.smtp_server import SMTPServer

    with SMTPServer() as server:
        settings.EMAIL_BACKEND = "django.core.mail.backends.smtp.EmailBackend"
        settings.EMAIL_HOST, settings.EMAIL_PORT = "127.0.0.1", server.port
        settings.EMAIL_USE_TLS = settings.EMAIL_USE_SSL = False
        yield server
    from mailer import backend

    backend.close_connection()


def _email(redis_client) -> Email:
    return email_queue(template="welcome", to=["ada@example.com"], context={"name": "Ada"})


def test_recording_sent_survives_a_connection_cut_after_the_hand_off(smtp, redis_client):
    """An InterfaceError was not caught: the task retried, waited out the lease and sent again."""
    email = _email(redis_client)
    calls = []

    def cut_after_hand_off(execute, sql, params, many, context):
        if 'SET "status"' in sql.replace("`", '"') and smtp.messages and len(calls) < 2:
            calls.append(sql)
            raise InterfaceError("connection already closed")
        return execute(sql, params, many, context)

    with connection.execute_wrapper(cut_after_hand_off):
        sent = email_send(email=email)
    assert calls
    assert sent.status == Email.Status.SENT
    assert len(smtp.messages) == 1


def test_a_hand_off_the_database_would_not_record_is_recorded_next_time_not_resent(smtp, redis_client):
    email = _email(redis_client)

    def database_gone_after_hand_off(execute, sql, params, many, context):
        if smtp.messages and sql.lstrip().upper().startswith("UPDATE"):
            raise OperationalError("the database system is shutting down")
        return execute(sql, params, many, context)

    with connection.execute_wrapper(database_gone_after_hand_off), pytest.raises(SentNotRecorded):
        email_send(email=email)
    assert Email.objects.get(pk=email.pk).status == Email.Status.SENDING
    assert cache.get(f"mailer:handed-off:{email.pk}") is not None

    again = email_send(email=Email.objects.get(pk=email.pk))  # the retry, once the database is back
    assert again.status == Email.Status.SENT
    assert len(smtp.messages) == 1  # not sent a second time
    assert cache.get(f"mailer:handed-off:{email.pk}") is None


def _message(body, headers: dict, content_type: str = "application/json") -> SimpleNamespace:
    return SimpleNamespace(
        headers=headers, body=body, content_type=content_type, delivery_info={"routing_key": "normal"}
    )


def test_a_message_the_worker_cannot_run_keeps_its_arguments_and_no_secret(redis_client):
    """Consumer-level dead letters stored `args=[]` and the raw body unredacted; each requeue of
    one made a new row."""
    body = json.dumps([[7, "x"], {"api_key": "s3cret", "size": 2}, {}]).encode()
    headers = {"task": "no.such.task", "id": "unknown-1", "request_id": "rid-9"}
    consumer = SimpleNamespace(hostname="worker@test")
    JobConsumer._dead_letter(consumer, _message(body, headers), KeyError("no.such.task"), "unknown task")
    row = DeadLetter.objects.get(task_id="unknown-1")
    assert row.args == [7, "x"]
    assert row.kwargs == {"api_key": "***", "size": 2}
    assert row.redacted is True
    assert "s3cret" not in row.raw_message
    assert row.request_id == "rid-9"

    DeadLetter.objects.filter(pk=row.pk).update(status=DeadLetter.Status.REQUEUED)
    again = {**headers, "id": "unknown-2", "dead_letter_id": row.pk}
    JobConsumer._dead_letter(consumer, _message(body, again), KeyError("no.such.task"), "unknown task")
    assert DeadLetter.objects.count() == 1  # the same logical job, back to pending
    row.refresh_from_db()
    assert (row.status, row.failure_count, row.task_id) == (DeadLetter.Status.PENDING, 2, "unknown-2")


def test_web_metrics_count_dead_letters_written_anywhere_and_show_the_ledger(client, redis_client):
    """The dead-letter counter lived in the pool processes, which serve no metrics."""
    generate.on_failure(RuntimeError("boom"), "m-1", (1,), {}, None)
    generate.on_failure(RuntimeError("boom"), "m-2", (2,), {}, None)
    OutboxMessage.objects.create(task_name="jobs.ping", task_id="waiting-1")
    text = client.get("/metrics").content.decode()
    assert 'jobs_dead_letters_created_total{reason="unexpected_error",task="thumbnails.generate"} 2.0' in text
    assert 'jobs_ledger_jobs{state="unpublished"} 1.0' in text
    assert "jobs_ledger_oldest_unfinished_age_seconds" in text


def test_a_task_result_write_rides_out_a_cut_connection_and_never_fails_the_task(redis_client, caplog):
    """Celery writes results outside the task's code; the stock backend's failure on a cut
    connection became the task's own failure (a job that had succeeded was dead-lettered)."""
    from celery import current_app
    from django_celery_results.models import TaskResult

    backend = current_app.backend
    with connection.execute_wrapper(cut := _cut("INSERT", error=OperationalError)):
        backend.store_result("res-1", {"ok": 1}, "SUCCESS")
    assert cut.calls
    assert TaskResult.objects.get(task_id="res-1").status == "SUCCESS"

    with connection.execute_wrapper(_cut("INSERT", times=99)):
        assert backend.store_result("res-2", None, "STARTED") is None  # not raised
    assert "results.not_stored" in caplog.text


def test_a_job_the_broker_can_never_take_ends_through_the_failure_path(redis_client):
    """It used to get a dead letter only: its image stayed `pending` with nothing to move it."""
    from datetime import timedelta

    from django.utils import timezone

    from jobs.runtime.outbox import outbox_relay

    image = thumbnail_services.image_create(upload=images.upload(images.jpeg()))
    OutboxMessage.objects.filter(args=[image.pk]).update(
        published_at=None, options={"queue": "retired-queue"}, created_at=timezone.now() - timedelta(minutes=5)
    )
    outbox_relay()
    image.refresh_from_db()
    assert image.status == Image.Status.FAILED
    assert DeadLetter.objects.get(args=[image.pk]).reason == DeadLetter.Reason.UNPUBLISHABLE
    assert not OutboxMessage.objects.filter(args=[image.pk]).exists()


def test_a_give_up_the_app_could_not_hear_keeps_the_job_in_the_ledger(redis_client, monkeypatch):
    """Else the image would stay `processing` with no ledger row left to bring the job back."""
    OutboxMessage.objects.create(task_name="thumbnails.generate", task_id="deaf-1", args=[5])

    def broken(*args, **kwargs):
        raise OperationalError("the database system is shutting down")

    monkeypatch.setattr(thumbnail_services, "image_mark_failed", broken)
    generate.on_failure(RuntimeError("boom"), "deaf-1", (5,), {}, None)
    assert DeadLetter.objects.filter(task_id="deaf-1").exists()
    assert OutboxMessage.objects.filter(task_id="deaf-1").exists()
