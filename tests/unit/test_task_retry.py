"""When a shard task retries and when it gives up, and how long it waits (full jitter below a doubling ceiling)."""

from __future__ import annotations

import random

import sqlalchemy.exc

from shared.sandbox.runner import SandboxUnavailable
from worker.tasks import MAX_BACKOFF_S, retry_countdown


def db_outage() -> sqlalchemy.exc.OperationalError:
    return sqlalchemy.exc.OperationalError("SELECT 1", {}, Exception("connection refused"))


def ceiling(low: float, high: float) -> float:
    return high  # the longest wait full jitter may draw


def test_other_failures_get_a_bounded_number_of_attempts_with_backoff() -> None:
    exc = SandboxUnavailable("cannot start")
    assert [retry_countdown(exc, attempt, 3, uniform=ceiling) for attempt in (1, 2, 3, 4)] == [2.0, 4.0, 8.0, None]


def test_database_outages_are_retried_as_long_as_they_last() -> None:
    assert retry_countdown(db_outage(), 1, 3, uniform=ceiling) == 2.0
    assert retry_countdown(db_outage(), 50, 3, uniform=ceiling) == MAX_BACKOFF_S


def test_waits_are_jittered_between_zero_and_the_ceiling() -> None:
    rng = random.Random(7)
    for attempt, high in ((1, 2.0), (3, 8.0), (50, float(MAX_BACKOFF_S))):
        waits = [retry_countdown(db_outage(), attempt, 3, uniform=rng.uniform) for _ in range(500)]
        assert all(w is not None and 0.0 <= w <= high for w in waits)
        assert len(set(waits)) > 400  # drawn, not one fixed delay
    assert retry_countdown(SandboxUnavailable("x"), 4, 3) is None  # the default (random) draw still gives up
