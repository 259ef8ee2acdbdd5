"""The retry policy: how long a job waits before its next attempt."""

from __future__ import annotations

import random

JITTER = 0.10


def retry_delay(
    attempt: int,
    *,
    base: float,
    cap: float,
    ceiling: float | None = None,
    rng: random.Random | None = None,
) -> float:
    """Seconds to wait before retry number `attempt` (1 for the first retry).

    `base * 2**(attempt-1)`, capped at `cap`, plus up to 10 % random jitter, never below `base`.
    `ceiling` is a hard upper bound applied last (kept below the broker's visibility timeout so
    Redis never redelivers a retry it still holds).
    """
    if attempt < 1:
        raise ValueError("attempt counts from 1")
    if base <= 0:
        raise ValueError("base must be positive")
    delay = min(base * 2.0 ** (attempt - 1), max(cap, base))
    delay += delay * JITTER * (rng.random() if rng is not None else random.random())  # noqa: S311 - jitter
    delay = max(delay, base)
    if ceiling is not None:
        delay = min(delay, ceiling)
    return delay
