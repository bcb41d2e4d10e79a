"""When a shard task retries and when it gives up."""

from __future__ import annotations

import sqlalchemy.exc

from shared.sandbox.runner import SandboxUnavailable
from worker.tasks import MAX_BACKOFF_S, retry_countdown


def db_outage() -> sqlalchemy.exc.OperationalError:
    return sqlalchemy.exc.OperationalError("SELECT 1", {}, Exception("connection refused"))


def test_other_failures_get_a_bounded_number_of_attempts_with_backoff() -> None:
    exc = SandboxUnavailable("cannot start")
    assert [retry_countdown(exc, attempt, 3) for attempt in (1, 2, 3, 4)] == [2.0, 4.0, 8.0, None]


def test_database_outages_are_retried_as_long_as_they_last() -> None:
    assert retry_countdown(db_outage(), 1, 3) == 2.0
    assert retry_countdown(db_outage(), 50, 3) == MAX_BACKOFF_S
