"""The retry delay: capped exponential ceiling, full jitter below it."""

from __future__ import annotations

import random

import pytest

from shared.jobs.backoff import ceiling_s, full_jitter_s


def test_ceiling_doubles_from_the_base_up_to_the_cap() -> None:
    assert [ceiling_s(attempt, 10.0, 3600.0) for attempt in range(4)] == [10.0, 20.0, 40.0, 80.0]
    assert ceiling_s(9, 10.0, 3600.0) == 3600.0  # 5120 capped
    assert ceiling_s(100_000, 1.0, 60.0) == 60.0  # no overflow however long an outage lasts
    with pytest.raises(ValueError, match="attempt"):
        ceiling_s(-1, 1.0, 60.0)


@pytest.mark.parametrize("attempt", [0, 1, 2, 5, 6, 7, 50, 10_000])
def test_delays_stay_within_zero_and_the_ceiling(attempt: int) -> None:
    rng = random.Random(attempt)
    high = ceiling_s(attempt, 1.0, 60.0)
    delays = [full_jitter_s(attempt, 1.0, 60.0, uniform=rng.uniform) for _ in range(2000)]
    assert all(0.0 <= d <= high for d in delays)
    # full jitter: the draws spread over the whole window, not bunched at the ceiling
    assert min(delays) < 0.1 * high and max(delays) > 0.9 * high


def test_the_window_ends_are_reachable_and_never_exceeded() -> None:
    assert full_jitter_s(3, 2.0, 60.0, uniform=lambda low, high: high) == 16.0
    assert full_jitter_s(3, 2.0, 60.0, uniform=lambda low, high: low) == 0.0
    # a uniform that overshoots (float rounding in a custom one) is clamped into the window
    assert full_jitter_s(3, 2.0, 60.0, uniform=lambda low, high: high + 1) == 16.0
    assert full_jitter_s(3, 2.0, 60.0, uniform=lambda low, high: low - 1) == 0.0
