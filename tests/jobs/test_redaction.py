"""Redaction: what a dead letter, a log line or a report may store."""

from __future__ import annotations

import json
import uuid
from datetime import UTC, date, datetime
from datetime import time as dt_time
from decimal import Decimal

import pytest
from kombu.utils import json as kombu_json

from jobs.redaction import REDACTED, redact, redact_text


def test_redact_replaces_secret_keys_at_any_depth():
    value = {
        "image_id": 3,
        "password": "hunter2",
        "Authorization": "Bearer x",
        "nested": [{"api_key": "k", "ok": True}, {"deeper": {"client_secret": "s", "token_count": 2}}],
    }
    out, changed = redact(value)
    assert changed is True
    assert out == {
        "image_id": 3,
        "password": REDACTED,
        "Authorization": REDACTED,
        "nested": [{"api_key": REDACTED, "ok": True}, {"deeper": {"client_secret": REDACTED, "token_count": REDACTED}}],
    }


def test_redact_leaves_plain_values_and_makes_them_json_safe():
    out, changed = redact([1, "a", None, 2.5, (3, 4), {"id": 5}])
    assert changed is False
    assert out == [1, "a", None, 2.5, [3, 4], {"id": 5}]


def test_redact_keeps_kombu_types_replayable():
    """What Celery's JSON serializer (kombu's) carries as a tagged object is stored in the same
    form, so a requeued dead letter gives the task the original types back, not their repr()."""
    original = [
        datetime(2024, 5, 1, 12, 30, 15, 123456, tzinfo=UTC),
        date(2024, 5, 1),
        dt_time(12, 30, 15),
        Decimal("12.3400"),
        uuid.UUID("5f2b7c1e-8a3d-4e6f-9b0a-1c2d3e4f5a6b"),
        b"raw bytes",
        b"\xff\xfe not utf-8",
        b"nul \x00 inside",  # stored as kombu's base64 form: PostgreSQL's jsonb refuses \u0000
        {"when": datetime(2024, 5, 1, 9, 0), "amounts": (Decimal("1.5"), 2)},  # noqa: DTZ001 - kombu's naive form
    ]
    out, changed = redact(original)
    assert changed is False
    # Stored in a JSONField (plain json), published again, decoded on the worker by kombu.
    replayed = kombu_json.loads(json.dumps(out))
    assert replayed == [*original[:8], {"when": original[8]["when"], "amounts": [Decimal("1.5"), 2]}]
    assert [type(v) for v in replayed[:8]] == [datetime, date, dt_time, Decimal, uuid.UUID, bytes, bytes, bytes]
    assert "\\u0000" not in json.dumps(out)
    assert out[0] == {"__type__": "datetime", "__value__": "2024-05-01T12:30:15.123456+00:00"}
    # Secrets are still found inside such values' containers.
    assert redact({"at": date(2024, 1, 1), "password": date(2024, 1, 2)}) == (
        {"at": {"__type__": "date", "__value__": "2024-01-01"}, "password": REDACTED},
        True,
    )


@pytest.mark.parametrize("value", [object(), object, {1, 2}, frozenset(), complex(1, 2)])
def test_redact_marks_a_value_it_cannot_store_as_redacted(value):
    out, changed = redact({"n": 1, "value": value})
    assert changed is True  # stored as repr(): the row cannot be replayed as it is
    assert out["n"] == 1
    assert out["value"] == repr(value)[:500]


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        (
            "OperationalError: Error connecting to redis://:s3cret@cache:6379/0: refused",
            "OperationalError: Error connecting to redis://:***@cache:6379/0: refused",
        ),
        ("amqps://app:p%40ss@rabbit:5671// down", "amqps://app:***@rabbit:5671// down"),
        ("redis://cache:6379/0 and ada@example.com", "redis://cache:6379/0 and ada@example.com"),
    ],
)
def test_redact_text_finds_url_passwords_anywhere(text, expected):
    assert redact_text(text) == expected


def test_redact_text_masks_addresses_on_request_and_keeps_the_domain():
    refusal = (
        "SMTPRecipientsRefused: {'ada.lovelace+x@example.com': (550, b'no such user'), 'bob@mail.example.org': ...}"
    )
    masked = redact_text(refusal, addresses=True)
    assert "ada.lovelace" not in masked
    assert "bob@" not in masked
    assert "***@example.com" in masked
    assert "***@mail.example.org" in masked
    assert redact_text("worker celery@pod-7 ready", addresses=True) == "worker celery@pod-7 ready"
