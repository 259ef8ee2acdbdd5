"""Row ids as jobs carry them: positive integers a bigint primary key can hold (a larger number
is no id, and SQLite cannot even bind it)."""

from __future__ import annotations

from typing import Any

MAX_ROW_ID = 2**63 - 1


def is_row_id(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and 1 <= value <= MAX_ROW_ID
