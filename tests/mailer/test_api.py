"""`POST /api/emails/` and `GET /api/emails/<id>/`: staff only, by session or HTTP basic auth."""

from __future__ import annotations

import base64
import json

import pytest
from django.contrib.auth import get_user_model
from django.test import Client

from mailer.models import Email
from tests.conftest import grant

pytestmark = pytest.mark.django_db

URL = "/api/emails/"
PAYLOAD = {"template": "welcome", "to": ["ada@example.com"], "context": {"name": "Ada"}}


def basic(username: str, password: str) -> dict[str, str]:
    token = base64.b64encode(f"{username}:{password}".encode()).decode()
    return {"HTTP_AUTHORIZATION": f"Basic {token}"}


@pytest.fixture
def staff_user():
    return grant(get_user_model().objects.create_user("staff", "staff@example.com", "s3cret-pass", is_staff=True))


@pytest.fixture
def plain_user():
    return get_user_model().objects.create_user("plain", "plain@example.com", "s3cret-pass")


def post(client: Client, body, **extra):
    data = body if isinstance(body, str | bytes) else json.dumps(body)
    # CONTENT_TYPE keeps the header on an empty body (the test client drops it there).
    return client.post(URL, data=data, content_type="application/json", CONTENT_TYPE="application/json", **extra)


def test_staff_with_basic_auth_queues_an_email(client, staff_user, django_capture_on_commit_callbacks):
    with django_capture_on_commit_callbacks() as callbacks:
        response = post(client, PAYLOAD, HTTP_X_REQUEST_ID="rid-api-1", **basic("staff", "s3cret-pass"))
    assert response.status_code == 202, response.content
    email = Email.objects.get()
    assert response.json() == {"id": email.pk, "status": "queued"}
    assert len(callbacks) == 1
    assert email.request_id == "rid-api-1"
    assert email.to == ["ada@example.com"]


def test_basic_auth_needs_no_csrf_token(staff_user, django_capture_on_commit_callbacks):
    client = Client(enforce_csrf_checks=True)
    with django_capture_on_commit_callbacks():
        response = post(client, PAYLOAD, **basic("staff", "s3cret-pass"))
    assert response.status_code == 202


def test_no_credentials_is_401_with_a_challenge(client, django_capture_on_commit_callbacks):
    with django_capture_on_commit_callbacks() as callbacks:
        response = post(client, PAYLOAD)
    assert response.status_code == 401
    assert response["WWW-Authenticate"].startswith("Basic realm=")
    assert response.json() == {"error": "authentication required"}
    assert callbacks == []
    assert not Email.objects.exists()


@pytest.mark.parametrize(
    "header",
    [
        basic("staff", "wrong"),
        basic("nobody", "s3cret-pass"),
        {"HTTP_AUTHORIZATION": "Basic !!!not-base64"},
        {"HTTP_AUTHORIZATION": "Basic " + base64.b64encode(b"no-colon").decode()},
    ],
)
def test_bad_credentials_are_401(client, staff_user, header):
    response = post(client, PAYLOAD, **header)
    assert response.status_code == 401
    assert "WWW-Authenticate" in response
    assert not Email.objects.exists()


def test_inactive_staff_is_refused(client, staff_user):
    staff_user.is_active = False
    staff_user.save()
    assert post(client, PAYLOAD, **basic("staff", "s3cret-pass")).status_code == 401


def test_non_staff_is_403(client, plain_user, django_capture_on_commit_callbacks):
    with django_capture_on_commit_callbacks() as callbacks:
        response = post(client, PAYLOAD, **basic("plain", "s3cret-pass"))
    assert response.status_code == 403
    assert response.json() == {"error": "staff only"}
    assert callbacks == []
    client.force_login(plain_user)
    assert post(client, PAYLOAD).status_code == 403
    assert client.get(f"{URL}1/").status_code == 403


def test_session_post_needs_the_csrf_token(staff_user, django_capture_on_commit_callbacks):
    client = Client(enforce_csrf_checks=True)
    client.force_login(staff_user)
    with django_capture_on_commit_callbacks() as callbacks:
        response = post(client, PAYLOAD)
    assert response.status_code == 403
    assert response.json() == {"error": "CSRF verification failed"}
    assert callbacks == []

    client.get("/admin/")  # sets the CSRF cookie, as the admin pages do
    token = client.cookies["csrftoken"].value
    with django_capture_on_commit_callbacks() as callbacks:
        response = post(client, PAYLOAD, HTTP_X_CSRFTOKEN=token)
    assert response.status_code == 202, response.content
    assert len(callbacks) == 1


@pytest.mark.parametrize(
    ("body", "message", "code"),
    [
        ({**PAYLOAD, "template": "nope"}, "unknown email template 'nope'", "unknown_template"),
        ({**PAYLOAD, "to": ["not-an-address"]}, "invalid email address 'not-an-address'", "invalid_address"),
        (
            {**PAYLOAD, "to": ["a@example.com\nBcc: b@example.com"]},
            "a recipient contains a line break",
            "header_injection",
        ),
        ({**PAYLOAD, "context": {"name": "x\nBcc: b@example.com"}}, "the subject must be one line", "header_injection"),
        ({**PAYLOAD, "to": []}, "to must be a non-empty list of addresses", "invalid_address"),
    ],
)
def test_refusals_are_400_with_the_reason(client, staff_user, django_capture_on_commit_callbacks, body, message, code):
    with django_capture_on_commit_callbacks() as callbacks:
        response = post(client, body, **basic("staff", "s3cret-pass"))
    assert response.status_code == 400
    assert response.json()["error"] == message
    assert response.json()["code"] == code
    assert callbacks == []
    assert not Email.objects.exists()


@pytest.mark.parametrize(
    ("body", "message"),
    [
        ("{not json", "the body must be JSON"),
        (b"\xff\xfe", "the body must be JSON"),
        ("", 'the body must be a JSON object {"template", "to", "context"}'),
        ("[1, 2]", 'the body must be a JSON object {"template", "to", "context"}'),
        ({"to": ["a@example.com"]}, "template must be a string"),
        ({"template": "welcome", "to": "a@example.com"}, "to must be a list of addresses"),
        ({"template": "welcome", "to": ["a@example.com"], "context": []}, "context must be an object"),
    ],
)
def test_malformed_bodies_are_400(client, staff_user, django_capture_on_commit_callbacks, body, message):
    with django_capture_on_commit_callbacks() as callbacks:
        response = post(client, body, **basic("staff", "s3cret-pass"))
    assert response.status_code == 400
    assert response.json()["error"] == message
    assert callbacks == []


def test_a_context_left_out_is_empty_and_welcome_needs_a_name(client, staff_user, django_capture_on_commit_callbacks):
    with django_capture_on_commit_callbacks() as callbacks:
        response = post(client, {"template": "welcome", "to": ["a@example.com"]}, **basic("staff", "s3cret-pass"))
    assert response.status_code == 400
    assert response.json()["field"] == "context.name"
    assert callbacks == []


def test_detail_shows_status_attempts_and_error(client, staff_user, django_capture_on_commit_callbacks):
    with django_capture_on_commit_callbacks():
        email_id = post(client, PAYLOAD, **basic("staff", "s3cret-pass")).json()["id"]
    response = client.get(f"{URL}{email_id}/", **basic("staff", "s3cret-pass"))
    assert response.status_code == 200
    assert response.json() == {
        "id": email_id,
        "status": "queued",
        "attempts": 0,
        "error": None,
        "delivery_status": None,
    }

    Email.objects.filter(pk=email_id).update(status="failed", attempts=3, last_error="SMTPDataError: 451")
    client.force_login(staff_user)  # the session works as well
    body = client.get(f"{URL}{email_id}/").json()
    assert (body["status"], body["attempts"], body["error"]) == ("failed", 3, "SMTPDataError: 451")


def test_detail_needs_staff_and_unknown_is_404(client, staff_user):
    assert client.get(f"{URL}1/").status_code == 401
    response = client.get(f"{URL}999999/", **basic("staff", "s3cret-pass"))
    assert response.status_code == 404
    assert response.json() == {"error": "email not found"}


def test_wrong_methods_are_405_json(client, staff_user):
    response = client.get(URL, **basic("staff", "s3cret-pass"))
    assert response.status_code == 405
    assert response.json() == {"error": "method not allowed"}
    assert client.delete(f"{URL}1/", **basic("staff", "s3cret-pass")).status_code == 405


def test_an_oversized_body_is_413_json_and_queues_nothing(client, staff_user, django_capture_on_commit_callbacks):
    huge = {**PAYLOAD, "context": {"filler": "x" * (3 * 1024 * 1024)}}  # above DATA_UPLOAD_MAX_MEMORY_SIZE
    with django_capture_on_commit_callbacks() as callbacks:
        response = post(client, huge, **basic("staff", "s3cret-pass"))
    assert response.status_code == 413
    assert response.json()["error"] == "request body too large"
    assert not Email.objects.exists()
    assert callbacks == []


def test_a_context_without_what_the_template_needs_is_a_400_naming_it(client, staff_user):
    """`welcome` without `name` would send "Welcome to jobsite, !": refused, nothing queued."""
    response = post(client, {**PAYLOAD, "context": {"nickname": "Ada"}}, **basic("staff", "s3cret-pass"))
    assert response.status_code == 400
    body = response.json()
    assert body["field"] == "context.name"
    assert body["code"] == "missing_context"
    assert "name" in body["error"]
    assert not Email.objects.exists()


@pytest.mark.parametrize(
    ("method", "path", "body", "needed"),
    [
        (
            "post",
            "/api/emails/",
            {"template": "welcome", "to": ["a@example.com"], "context": {"name": "A"}},
            "mailer.add_email",
        ),
        ("get", "/api/emails/{email}/", None, "mailer.view_email"),
        ("post", "/api/emails/purge/", {"older_than_days": 90}, "mailer.delete_email"),
        ("get", "/api/emails/purge/00000000-0000-0000-0000-000000000000/", None, "mailer.view_email"),
        ("get", "/api/jobs/stats/", None, "jobs.view_deadletter"),
    ],
)
def test_staff_without_the_model_permission_is_refused_and_nothing_changes(client, method, path, body, needed):
    """`is_staff` alone opens no endpoint: each needs the model permission of what it reads or
    changes (CONTRACT: a view-only staff member changes nothing anywhere)."""
    email = Email.objects.create(from_email="s@example.com", template="welcome", subject="Hi", to=["a@example.com"])
    plain = get_user_model().objects.create_user("plain", password="plain-pass-1", is_staff=True)
    client.force_login(plain)
    kwargs = {"data": json.dumps(body), "content_type": "application/json"} if body is not None else {}
    response = getattr(client, method)(path.format(email=email.pk), **kwargs)
    assert response.status_code == 403
    assert response.json() == {"error": f"permission {needed} required", "permission": needed}
    assert Email.objects.count() == 1


def test_a_view_only_staff_user_reads_emails_but_queues_and_purges_none(client):
    email = Email.objects.create(from_email="s@example.com", template="welcome", subject="Hi", to=["a@example.com"])
    viewer = grant(
        get_user_model().objects.create_user("viewer", password="view-pass-1", is_staff=True), "mailer.view_email"
    )
    client.force_login(viewer)
    assert client.get(f"/api/emails/{email.pk}/").status_code == 200
    body = {"template": "welcome", "to": ["b@example.com"], "context": {"name": "B"}}
    queued = client.post("/api/emails/", data=json.dumps(body), content_type="application/json")
    assert (queued.status_code, queued.json()["permission"]) == (403, "mailer.add_email")
    purge = client.post("/api/emails/purge/", data='{"older_than_days": 1}', content_type="application/json")
    assert (purge.status_code, purge.json()["permission"]) == (403, "mailer.delete_email")
    assert list(Email.objects.values_list("pk", flat=True)) == [email.pk]


def test_the_stats_need_the_task_results_permission_as_well(client):
    viewer = grant(
        get_user_model().objects.create_user("half", password="half-pass-1", is_staff=True), "jobs.view_deadletter"
    )
    client.force_login(viewer)
    response = client.get("/api/jobs/stats/")
    assert (response.status_code, response.json()["permission"]) == (403, "django_celery_results.view_taskresult")


def test_an_api_token_carries_its_users_permissions_only(client):
    """A token lets its staff user in without a password; what the user may not do, the token may
    not either."""
    from jobs.services import api_token_create

    viewer = grant(
        get_user_model().objects.create_user("tok", password="tok-pass-1", is_staff=True), "mailer.view_email"
    )
    _row, token = api_token_create(user=viewer, name="script")
    body = {"template": "welcome", "to": ["b@example.com"], "context": {"name": "B"}}
    response = client.post(
        "/api/emails/", data=json.dumps(body), content_type="application/json", HTTP_AUTHORIZATION=f"Bearer {token}"
    )
    assert (response.status_code, response.json()["permission"]) == (403, "mailer.add_email")
    assert not Email.objects.exists()
