"""What a dead letter, a log line or a report may store: secrets redacted at any depth."""

from __future__ import annotations

import base64
import json
import re
from collections.abc import Mapping
from typing import Any

from kombu.utils import json as kombu_json

REDACTED = "***"
#: What a secret's key looks like (case aside); also a PostgreSQL and SQLite regular expression.
SECRET_KEY_PATTERN = r"pass(word|wd|phrase)?|secret|token|authori[sz]ation|api[-_]?key|credential|cookie|session"  # noqa: S105 - a pattern
_SECRET_KEY = re.compile(SECRET_KEY_PATTERN, re.IGNORECASE)


def is_secret_key(key: object) -> bool:
    return isinstance(key, str) and bool(_SECRET_KEY.search(key))


def redact(value: Any) -> tuple[Any, bool]:
    """A JSON-safe copy of `value` with secret-looking keys at any depth replaced by `***`,
    and whether the copy cannot be replayed as the original (something was replaced).

    Values Celery's JSON serializer (kombu's) carries as tagged objects - `datetime`, `date`,
    `time`, `Decimal`, `UUID`, `bytes` and any type registered with `kombu.utils.json` - are
    stored in kombu's own tagged form, `{"__type__": ..., "__value__": ...}`, so publishing the
    stored arguments again gives the task the original types. Anything else kombu cannot encode
    is stored as its `repr()` and counts as replaced."""
    redacted = False

    def walk(item: Any) -> Any:
        nonlocal redacted
        if isinstance(item, Mapping):
            out = {}
            for key, sub in item.items():
                if is_secret_key(key):
                    out[str(key)] = REDACTED
                    redacted = True
                else:
                    out[str(key)] = walk(sub)
            return out
        if isinstance(item, list | tuple):
            return [walk(sub) for sub in item]
        if item is None or isinstance(item, str | int | float | bool):
            return item
        if isinstance(item, bytes) and b"\x00" in item:
            # kombu would tag these as text ("bytes"), but PostgreSQL's jsonb refuses \u0000:
            # kombu's other tag for bytes, base64, decodes to the same value.
            return {"__type__": "base64", "__value__": base64.b64encode(item).decode("ascii")}
        try:
            # Exactly what the message would carry (kombu's encoder), as plain JSON values.
            encoded = json.loads(kombu_json.dumps(item))
        except Exception:  # noqa: BLE001 - not serializable (TypeError), circular, a failing __json__
            redacted = True
            return repr(item)[:500]
        return walk(encoded)  # plain JSON now; still looks for secret keys inside

    return walk(value), redacted


#: `scheme://user:password@`: the password of a URL written anywhere in a text.
_URL_PASSWORD = re.compile(r"(?P<head>\b[a-z][a-z0-9+.-]*://[^\s:/@]*:)(?P<password>[^\s@/]+)@", re.IGNORECASE)
#: An email address: the local part goes, the domain stays (useful, and not the person).
_ADDRESS = re.compile(r"[A-Za-z0-9.!#$%&'*+/=?^_`{|}~-]+@(?P<domain>[A-Za-z0-9-]+(?:\.[A-Za-z0-9-]+)*\.[A-Za-z]{2,})")


def redact_text(text: str, *, addresses: bool = False) -> str:
    """`text` with URL passwords (anywhere in it, e.g. inside an exception message) replaced by
    `***`, and with `addresses`, the local part of every email address too."""
    text = _URL_PASSWORD.sub(lambda m: f"{m['head']}{REDACTED}@", text)
    if addresses:
        text = _ADDRESS.sub(lambda m: f"{REDACTED}@{m['domain']}", text)
    return text
