"""Sending through django-anymail's Postmark backend, with a real worker, against a local HTTP
stub that stands in for Postmark's API."""

from __future__ import annotations

import base64
import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from jobs.models import DeadLetter
from mailer.models import Email
from mailer.services import Attachment, email_queue
from tests.integration.conftest import wait_for
from tests.mailer.test_queue import PDF

pytestmark = [pytest.mark.django_db(transaction=True), pytest.mark.integration]

TOKEN = "pm-server-token-for-tests"


class PostmarkStub:
    """Answers `POST /email` like Postmark does; `script` holds the answers to give first
    (status, body), after which every request succeeds."""

    def __init__(self) -> None:
        self.requests: list[dict] = []
        self.script: list[tuple[int, dict]] = []
        self._count = 0
        stub = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
                stub.requests.append({"path": self.path, "headers": dict(self.headers), "json": json.loads(body)})
                status, answer = stub.answer()
                data = json.dumps(answer).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def log_message(self, *args) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def answer(self) -> tuple[int, dict]:
        if self.script:
            return self.script.pop(0)
        self._count += 1
        to = self.requests[-1]["json"].get("To", "")
        return 200, {
            "To": to,
            "SubmittedAt": "2026-11-24T10:00:00Z",
            "MessageID": f"pm-msg-{self._count}",
            "ErrorCode": 0,
            "Message": "OK",
        }

    def __enter__(self) -> PostmarkStub:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def postmark():
    with PostmarkStub() as stub:
        yield stub


@pytest.fixture
def postmark_worker(start_worker, postmark, settings):
    return start_worker(
        extra_env={
            "ANYMAIL_ESP": "postmark",
            "POSTMARK_SERVER_TOKEN": TOKEN,
            "ANYMAIL_API_URL": postmark.url,
            "EMAIL_TIMEOUT": "5",
            "MEDIA_ROOT": str(settings.MEDIA_ROOT),
            "TASK_RETRY_BACKOFF_BASE": "0.2",
            "TASK_RETRY_BACKOFF_MAX": "2",
            "TASK_MAX_RETRIES": "3",
            "DEAD_LETTER_ALERT_EMAILS": "",
            "CELERY_SHUTDOWN_TIMEOUT": "1",
        }
    )


def queue(**kwargs) -> Email:
    return email_queue(template="welcome", to=["ada@example.com"], context={"name": "Ada"}, **kwargs)


def status_is(email: Email, status: str) -> Email | None:
    email.refresh_from_db()
    return email if email.status == status else None


def test_success_records_the_provider_message_id(postmark, postmark_worker):
    email = queue(attachments=[Attachment(filename="invoice.pdf", content=PDF, content_type="application/pdf")])
    wait_for(lambda: status_is(email, Email.Status.SENT))
    assert email.provider_message_id == "pm-msg-1"
    assert email.attempts == 1

    [request] = postmark.requests
    assert request["path"] == "/email"
    assert request["headers"]["X-Postmark-Server-Token"] == TOKEN
    payload = request["json"]
    assert payload["To"] == "ada@example.com"
    assert payload["From"] == "noreply@localhost"
    assert payload["Subject"] == "Welcome to jobsite, Ada!"
    assert "Hello Ada," in payload["TextBody"]
    assert "<h1" in payload["HtmlBody"]
    assert {"Name": "Message-ID", "Value": email.message_id} in payload["Headers"]
    [attachment] = payload["Attachments"]
    assert attachment["Name"] == "invoice.pdf"
    assert attachment["ContentType"] == "application/pdf"
    assert base64.b64decode(attachment["Content"]) == PDF


def test_server_error_is_retried_then_succeeds(postmark, postmark_worker):
    postmark.script = [
        (500, {"ErrorCode": 500, "Message": "Internal server error"}),
        (503, {"ErrorCode": 503, "Message": "Service unavailable"}),
    ]
    email = queue()
    wait_for(lambda: status_is(email, Email.Status.SENT))
    assert email.attempts == 3
    assert email.provider_message_id == "pm-msg-1"
    assert len(postmark.requests) == 3
    assert not DeadLetter.objects.exists()


def test_rate_limit_is_retried(postmark, postmark_worker):
    postmark.script = [(429, {"ErrorCode": 429, "Message": "Rate limit exceeded"})]
    email = queue()
    wait_for(lambda: status_is(email, Email.Status.SENT))
    assert email.attempts == 2


def test_invalid_request_is_permanent_and_dead_lettered(postmark, postmark_worker):
    postmark.script = [(422, {"ErrorCode": 300, "Message": "Invalid 'From' address: 'noreply@localhost'."})]
    email = queue()
    row = wait_for(lambda: DeadLetter.objects.filter(task_name="mailer.send_email").first())
    assert row.reason == DeadLetter.Reason.PERMANENT_ERROR
    assert row.retries == 0
    assert row.exception_type == "AnymailRequestsAPIError"
    email = wait_for(lambda: status_is(email, Email.Status.FAILED))
    assert email.attempts == 1
    assert "Invalid 'From' address" in email.last_error
    assert len(postmark.requests) == 1


def test_an_inactive_recipient_fails_the_email_for_the_user(postmark, postmark_worker):
    postmark.script = [
        (
            422,
            {
                "ErrorCode": 406,
                "Message": "You tried to send to a recipient that has been marked as inactive.\n"
                "Found inactive addresses: ada@example.com.\nInactive recipients are ones that have generated a hard "
                "bounce or a spam complaint.",
            },
        ),
    ]
    email = queue()
    wait_for(lambda: status_is(email, Email.Status.FAILED))  # the user's address: no dead letter
    email.refresh_from_db()
    assert email.last_error.startswith("The mail provider refused the address for good")
    assert not DeadLetter.objects.exists()
