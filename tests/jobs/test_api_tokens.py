"""API tokens for the staff API: made by an admin (shown once), checked cheaply, revocable."""

from __future__ import annotations

import json
import re
from datetime import timedelta

import pytest
from django.utils import timezone

from jobs.models import ApiToken
from jobs.services import api_token_create, api_token_hash
from tests.conftest import grant

pytestmark = pytest.mark.django_db

STATS = "/api/jobs/stats/"


@pytest.fixture
def staff_user(django_user_model):
    return grant(django_user_model.objects.create_user("ops", "ops@example.com", "pw", is_staff=True))


def bearer(token: str) -> dict[str, str]:
    return {"HTTP_AUTHORIZATION": f"Bearer {token}"}


def test_an_admin_makes_a_token_that_is_shown_once_and_stored_as_a_hash(admin_client, staff_user):
    response = admin_client.post(
        "/admin/jobs/apitoken/add/", {"user": staff_user.pk, "name": "monitoring"}, follow=True
    )
    assert response.status_code == 200
    raw = re.search(r'<code id="new-api-token">([^<]+)</code>', response.content.decode()).group(1)
    assert raw not in str(response.cookies)  # not carried in a message cookie
    token = ApiToken.objects.get()
    assert (token.user, token.name, token.prefix) == (staff_user, "monitoring", raw[:8])
    assert token.key_hash == api_token_hash(raw)
    assert raw not in json.dumps(list(ApiToken.objects.values()), default=str)  # only the hash is kept
    page = admin_client.get(f"/admin/jobs/apitoken/{token.pk}/change/").content.decode()
    assert raw not in page


def test_a_token_lets_its_staff_user_in_without_a_password_check(client, staff_user, monkeypatch):
    _, raw = api_token_create(user=staff_user, name="script")

    def no_password_hashing(*args, **kwargs):
        raise AssertionError("a token must not run the password hasher")

    monkeypatch.setattr("jobs.auth.authenticate", no_password_hashing)
    response = client.get(STATS, **bearer(raw))
    assert response.status_code == 200, response.content


def test_a_token_writes_without_a_csrf_token_but_never_cross_site(
    client, staff_user, django_capture_on_commit_callbacks
):
    _, raw = api_token_create(user=staff_user, name="script")
    body = json.dumps({"template": "welcome", "to": ["a@example.com"], "context": {"name": "Ada"}})
    with django_capture_on_commit_callbacks():
        response = client.post("/api/emails/", body, content_type="application/json", **bearer(raw))
    assert response.status_code == 202
    refused = client.post(
        "/api/emails/", body, content_type="application/json", HTTP_ORIGIN="https://evil.example", **bearer(raw)
    )
    assert refused.status_code == 403


@pytest.mark.parametrize("case", ["wrong", "revoked", "inactive", "not staff", "empty"])
def test_a_token_that_is_wrong_revoked_or_whose_user_may_not_is_refused(client, staff_user, case):
    token, raw = api_token_create(user=staff_user, name="script")
    if case == "wrong":
        raw = raw[:-1] + ("A" if raw[-1] != "A" else "B")
    elif case == "revoked":
        ApiToken.objects.filter(pk=token.pk).update(revoked_at=timezone.now())
    elif case == "inactive":
        staff_user.is_active = False
        staff_user.save()
    elif case == "not staff":
        staff_user.is_staff = False
        staff_user.save()
    elif case == "empty":
        raw = ""
    response = client.get(STATS, **bearer(raw))
    assert response.status_code == (403 if case == "not staff" else 401)
    assert "error" in response.json()


def test_last_used_is_written_at_most_once_a_minute(client, staff_user):
    token, raw = api_token_create(user=staff_user, name="script")
    client.get(STATS, **bearer(raw))
    token.refresh_from_db()
    first = token.last_used_at
    assert first is not None
    client.get(STATS, **bearer(raw))
    token.refresh_from_db()
    assert token.last_used_at == first
    ApiToken.objects.filter(pk=token.pk).update(last_used_at=first - timedelta(minutes=2))
    client.get(STATS, **bearer(raw))
    token.refresh_from_db()
    assert token.last_used_at > first - timedelta(minutes=1)


def test_revoking_in_the_admin_stops_the_token(admin_client, client, staff_user):
    token, raw = api_token_create(user=staff_user, name="script")
    admin_client.post(
        "/admin/jobs/apitoken/", {"action": "revoke_selected", "_selected_action": [token.pk]}, follow=True
    )
    token.refresh_from_db()
    assert token.revoked_at is not None
    assert client.get(STATS, **bearer(raw)).status_code == 401


def test_a_staff_member_without_superuser_makes_tokens_for_themselves_only(client, django_user_model, staff_user):
    from django.contrib.auth.models import Permission

    clerk = django_user_model.objects.create_user("clerk", "clerk@example.com", "pw", is_staff=True)
    clerk.user_permissions.add(*Permission.objects.filter(codename__in=["add_apitoken", "view_apitoken"]))
    boss = django_user_model.objects.create_superuser("boss", "boss@example.com", "pw")
    client.force_login(clerk)
    form = client.get("/admin/jobs/apitoken/add/").content.decode()
    assert f'value="{clerk.pk}"' in form
    assert f'value="{boss.pk}"' not in form  # a token acts with its holder's permissions
    refused = client.post("/admin/jobs/apitoken/add/", {"user": boss.pk, "name": "escalate"})
    assert refused.status_code == 200  # the form refuses the choice
    assert not ApiToken.objects.filter(user=boss).exists()
    made = client.post("/admin/jobs/apitoken/add/", {"user": clerk.pk, "name": "mine"})
    assert made.status_code == 200
    assert ApiToken.objects.filter(user=clerk, name="mine").exists()
