"""The retry policy: delays, backoff, jitter and their bounds."""

from __future__ import annotations

import random

import pytest
from hypothesis import given
from hypothesis import strategies as st

from jobs.retries import retry_delay


class _Fixed(random.Random):
    def __init__(self, value: float) -> None:
        super().__init__()
        self.value = value

    def random(self) -> float:
        return self.value


def test_default_sequence_without_jitter():
    delays = [retry_delay(n, base=60, cap=3600, rng=_Fixed(0.0)) for n in range(1, 6)]
    assert delays == [60, 120, 240, 480, 960]


def test_jitter_adds_at_most_ten_percent():
    assert retry_delay(3, base=60, cap=3600, rng=_Fixed(0.999999)) == pytest.approx(240 * 1.1, rel=1e-5)


def test_cap_applies_before_jitter():
    assert retry_delay(10, base=60, cap=3600, rng=_Fixed(0.0)) == 3600
    assert retry_delay(10, base=60, cap=3600, rng=_Fixed(0.5)) == 3600 * 1.05


def test_never_below_base_even_when_cap_is_smaller():
    assert retry_delay(1, base=60, cap=10, rng=_Fixed(0.0)) == 60
    assert retry_delay(4, base=60, cap=10, rng=_Fixed(0.0)) == 60


def test_ceiling_is_a_hard_bound():
    assert retry_delay(10, base=60, cap=3600, ceiling=3240, rng=_Fixed(0.9)) == 3240


def test_float_base_is_allowed():
    assert retry_delay(2, base=0.25, cap=10, rng=_Fixed(0.0)) == 0.5


@pytest.mark.parametrize(("attempt", "base"), [(0, 60), (1, 0), (1, -1)])
def test_invalid_arguments(attempt, base):
    with pytest.raises(ValueError, match=r"attempt|base"):
        retry_delay(attempt, base=base, cap=3600)


@given(
    attempt=st.integers(min_value=1, max_value=60),
    base=st.floats(min_value=0.001, max_value=10_000),
    cap=st.floats(min_value=0, max_value=100_000),
)
def test_delay_bounds_hold_for_any_input(attempt, base, cap):
    delay = retry_delay(attempt, base=base, cap=cap)
    nominal = min(base * 2 ** (attempt - 1), max(cap, base))
    assert base <= delay <= nominal * 1.1 + 1e-9
