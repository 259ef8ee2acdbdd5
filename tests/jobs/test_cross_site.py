"""Staff writes refuse cross-site requests, even when the browser attaches cached Basic credentials.

A browser that once answered the Basic prompt sends those credentials with every request to the
site, cross-site form posts and `fetch(..., {mode: "no-cors"})` included, and SameSite cookies do
not cover them. So every state-changing staff endpoint refuses a body that is not
`application/json` (415) and an `Origin`/`Sec-Fetch-Site` of another site (403), before it even
checks the password, and does nothing.
"""

from __future__ import annotations

import base64
import json

import pytest
from django.contrib.auth import get_user_model
from django.contrib.auth.models import Permission
from django.test import Client, RequestFactory

from jobs.http import json_object
from jobs.models import DeadLetter, OutboxMessage
from mailer.models import Email
from tests.conftest import grant
from tests.jobs.factories import DeadLetterFactory

pytestmark = pytest.mark.django_db

EMAILS = "/api/emails/"
DEAD_LETTERS = "/api/jobs/dead-letters/"
PAYLOAD = {"template": "welcome", "to": ["ada@example.com"], "context": {"name": "Ada"}}
JSON_PAYLOAD = json.dumps(PAYLOAD)
# What `<form enctype="text/plain">` with one field named `{"template": ..., "context": {"pad": "`
# and the value `"}}` sends: `name=value`, which is valid JSON.
TEXT_PLAIN_FORM = '{"template": "welcome", "to": ["ada@example.com"], "context": {"pad": "="}}\r\n'

CROSS_SITE_HEADERS = [
    pytest.param({"Origin": "https://evil.example"}, id="origin-evil"),
    pytest.param({"Origin": "null"}, id="origin-null"),
    pytest.param({"Origin": "https://testserver"}, id="origin-other-scheme"),
    pytest.param({"Origin": "http://testserver.evil.example"}, id="origin-suffix"),
    pytest.param({"Sec-Fetch-Site": "cross-site"}, id="fetch-cross-site"),
    pytest.param({"Sec-Fetch-Site": "same-site"}, id="fetch-same-site"),
    pytest.param({"Origin": "http://testserver", "Sec-Fetch-Site": "cross-site"}, id="fetch-wins-over-origin"),
]
NOT_JSON = [
    pytest.param("text/plain", TEXT_PLAIN_FORM, id="text-plain-form"),
    pytest.param("text/plain;charset=UTF-8", JSON_PAYLOAD, id="text-plain-fetch"),
    pytest.param("application/x-www-form-urlencoded", JSON_PAYLOAD, id="urlencoded"),
    pytest.param("multipart/form-data; boundary=x", JSON_PAYLOAD, id="multipart"),
    pytest.param("application/json-seq", JSON_PAYLOAD, id="json-prefix"),
    pytest.param(None, JSON_PAYLOAD, id="no-content-type"),
]


def basic(username: str, password: str) -> dict[str, str]:
    return {"Authorization": "Basic " + base64.b64encode(f"{username}:{password}".encode()).decode()}


STAFF = basic("staff", "s3cret-pass")


@pytest.fixture
def staff_user():
    return grant(get_user_model().objects.create_user("staff", "staff@example.com", "s3cret-pass", is_staff=True))


@pytest.fixture
def ops():
    """Staff allowed to view and change dead letters."""
    user = get_user_model().objects.create_user("ops", password="pw", is_staff=True)
    user.user_permissions.set(
        Permission.objects.filter(content_type__app_label="jobs", codename__in=["view_deadletter", "change_deadletter"])
    )
    return basic("ops", "pw")


def send(client: Client, url: str, body: str = "", content_type: str | None = "application/json", **headers):
    """A POST exactly as given: `content_type=None` sends no Content-Type (Django cannot tell an
    empty header from a missing one), and an empty body keeps its Content-Type (the test client
    would drop it)."""
    content_type = content_type or ""
    return client.generic("POST", url, data=body, headers=headers, CONTENT_TYPE=content_type)


def assert_nothing_queued(callbacks) -> None:
    assert callbacks == []
    assert not Email.objects.exists()
    assert not OutboxMessage.objects.exists()


# --- POST /api/emails/ ---------------------------------------------------------------------------


@pytest.mark.parametrize(("content_type", "body"), NOT_JSON)
def test_a_body_that_is_not_json_is_415_even_with_valid_basic_credentials(
    client, staff_user, django_capture_on_commit_callbacks, content_type, body
):
    with django_capture_on_commit_callbacks() as callbacks:
        response = send(client, EMAILS, body, content_type, **STAFF)
    assert response.status_code == 415, response.content
    assert "application/json required" in response.json()["error"]
    assert_nothing_queued(callbacks)


@pytest.mark.parametrize("headers", CROSS_SITE_HEADERS)
def test_json_from_another_site_is_403_even_with_valid_basic_credentials(
    client, staff_user, django_capture_on_commit_callbacks, headers
):
    with django_capture_on_commit_callbacks() as callbacks:
        response = send(client, EMAILS, JSON_PAYLOAD, **headers, **STAFF)
    assert response.status_code == 403, response.content
    assert response.json()["error"] == "cross-site request refused"
    assert_nothing_queued(callbacks)


def test_cross_site_is_refused_before_the_password_is_checked(
    client, staff_user, monkeypatch, django_capture_on_commit_callbacks
):
    def authenticate(*args, **kwargs):
        raise AssertionError("a cross-site request must not cost a password hash")

    monkeypatch.setattr("jobs.auth.authenticate", authenticate)
    with django_capture_on_commit_callbacks() as callbacks:
        wrong = send(client, EMAILS, JSON_PAYLOAD, Origin="https://evil.example", **basic("staff", "wrong"))
        form = send(client, EMAILS, TEXT_PLAIN_FORM, "text/plain", **STAFF)
    assert (wrong.status_code, form.status_code) == (403, 415)
    assert_nothing_queued(callbacks)


@pytest.mark.parametrize(
    "headers",
    [
        pytest.param({}, id="a-script-without-origin"),
        pytest.param({"Origin": "http://testserver"}, id="same-origin"),
        pytest.param({"Origin": "http://testserver", "Sec-Fetch-Site": "same-origin"}, id="same-origin-fetch"),
        pytest.param({"Sec-Fetch-Site": "none"}, id="fetch-site-none"),
    ],
)
def test_same_origin_json_and_scripts_still_queue(client, staff_user, django_capture_on_commit_callbacks, headers):
    with django_capture_on_commit_callbacks() as callbacks:
        response = send(client, EMAILS, JSON_PAYLOAD, "application/json; charset=utf-8", **headers, **STAFF)
    assert response.status_code == 202, response.content
    assert len(callbacks) == 1
    assert Email.objects.get().to == ["ada@example.com"]
    assert OutboxMessage.objects.count() == 1


def test_csrf_trusted_origins_are_same_origin(client, staff_user, settings, django_capture_on_commit_callbacks):
    """The origin the browser sees behind a proxy may differ from the one Django sees: the
    operator lists it in DJANGO_CSRF_TRUSTED_ORIGINS, as for the admin."""
    settings.CSRF_TRUSTED_ORIGINS = ["https://jobs.example.com"]
    with django_capture_on_commit_callbacks() as callbacks:
        trusted = send(client, EMAILS, JSON_PAYLOAD, Origin="https://jobs.example.com", **STAFF)
        other = send(client, EMAILS, JSON_PAYLOAD, Origin="https://evil.example.com", **STAFF)
    assert (trusted.status_code, other.status_code) == (202, 403)
    assert len(callbacks) == 1


def test_a_session_write_needs_json_as_well_as_the_csrf_token(staff_user, django_capture_on_commit_callbacks):
    browser = Client(enforce_csrf_checks=True)
    browser.force_login(staff_user)
    browser.get("/admin/")  # sets the CSRF cookie
    token = browser.cookies["csrftoken"].value
    with django_capture_on_commit_callbacks() as callbacks:
        form = send(browser, EMAILS, TEXT_PLAIN_FORM, "text/plain", **{"X-CSRFToken": token})
        evil = send(browser, EMAILS, JSON_PAYLOAD, **{"X-CSRFToken": token, "Sec-Fetch-Site": "cross-site"})
    assert (form.status_code, evil.status_code) == (415, 403)
    assert_nothing_queued(callbacks)
    with django_capture_on_commit_callbacks() as callbacks:
        response = send(browser, EMAILS, JSON_PAYLOAD, Origin="http://testserver", **{"X-CSRFToken": token})
    assert response.status_code == 202, response.content
    assert len(callbacks) == 1


def test_a_cross_site_read_is_still_answered(client, staff_user, ops):
    """Reads change nothing, and the other site cannot read the answer (no CORS)."""
    headers = {"Sec-Fetch-Site": "cross-site", "Origin": "https://evil.example"}
    email = Email.objects.create(template="welcome", to=["ada@example.com"], subject="Hi")
    assert client.get(f"{EMAILS}{email.pk}/", headers={**headers, **STAFF}).status_code == 200
    assert client.get(DEAD_LETTERS, headers={**headers, **ops}).status_code == 200


# --- the dead-letter API -------------------------------------------------------------------------


def dead_letter_writes(row: DeadLetter) -> list[tuple[str, str]]:
    return [
        (f"{DEAD_LETTERS}{row.pk}/requeue/", ""),
        (f"{DEAD_LETTERS}{row.pk}/discard/", ""),
        (f"{DEAD_LETTERS}requeue/", json.dumps({"ids": [row.pk]})),
        (f"{DEAD_LETTERS}requeue/", json.dumps({"all": True})),
    ]


def assert_untouched(row: DeadLetter, redis_client) -> None:
    row.refresh_from_db()
    assert row.status == DeadLetter.Status.PENDING
    assert not row.events.exists()
    assert redis_client.llen("normal") == 0


@pytest.mark.parametrize("headers", CROSS_SITE_HEADERS)
def test_dead_letter_writes_from_another_site_are_403(client, ops, redis_client, headers):
    row = DeadLetterFactory()
    for url, body in dead_letter_writes(row):
        response = send(client, url, body, **headers, **ops)
        assert response.status_code == 403, (url, response.content)
        assert response.json()["error"] == "cross-site request refused"
    assert_untouched(row, redis_client)


@pytest.mark.parametrize(
    ("content_type", "body"),
    [
        *NOT_JSON,
        pytest.param("text/plain", "", id="empty-text-plain-form"),
        pytest.param("application/x-www-form-urlencoded", "", id="empty-urlencoded-form"),
        pytest.param(None, "", id="no-body-no-content-type"),
    ],
)
def test_dead_letter_writes_without_json_are_415(client, ops, redis_client, content_type, body):
    row = DeadLetterFactory()
    for url, json_body in dead_letter_writes(row):
        response = send(client, url, (json_body or body) if body else "", content_type, **ops)
        assert response.status_code == 415, (url, response.content)
        assert "application/json required" in response.json()["error"]
    assert_untouched(row, redis_client)


def test_dead_letter_writes_with_json_from_the_same_origin_still_work(client, ops, redis_client):
    first, second = DeadLetterFactory.create_batch(2)
    same_origin = {"Origin": "http://testserver", "Sec-Fetch-Site": "same-origin"}
    assert send(client, f"{DEAD_LETTERS}{first.pk}/requeue/", **same_origin, **ops).status_code == 202
    assert send(client, f"{DEAD_LETTERS}{second.pk}/discard/", "", **ops).status_code == 200
    first.refresh_from_db()
    second.refresh_from_db()
    assert (first.status, second.status) == ("requeued", "discarded")
    assert redis_client.llen("normal") == 1


# --- json_object ---------------------------------------------------------------------------------


@pytest.mark.parametrize("content_type", ["text/plain", "application/x-www-form-urlencoded", "application/jsonp"])
def test_json_object_refuses_a_body_that_is_not_json(content_type):
    request = RequestFactory().generic("POST", "/", data=JSON_PAYLOAD, content_type=content_type)
    response = json_object(request, "{}")
    assert response.status_code == 415
    assert "application/json required" in json.loads(response.content)["error"]


def test_json_object_takes_json_with_parameters():
    request = RequestFactory().generic("POST", "/", data=JSON_PAYLOAD, content_type="Application/JSON; charset=utf-8")
    assert json_object(request, "{}") == PAYLOAD
