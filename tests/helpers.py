"""Helpers for integration tests: deterministic bars, polling, test accounts."""

from __future__ import annotations

import datetime as dt
import io
import random
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, TypeVar

import redis
from celery import Celery
from flask import Flask
from flask.testing import FlaskClient
from sqlalchemy import Connection, Engine, insert

from api.auth import issue_tokens
from shared.infra.models import DailyBar, Symbol, User, UserRole
from shared.jobs.fairness import PRIORITY_STEPS

FINAL = {"succeeded", "partial", "failed", "cancelled"}

T = TypeVar("T")


def wait_until(predicate: Callable[[], T], timeout_s: float, what: str, *, poll_s: float = 0.05) -> T:
    """Poll ``predicate`` until it returns something truthy (returned); fail after ``timeout_s``.

    A deadline, never a fixed sleep: on a quiet machine it returns as soon as the condition holds, on a loaded
    one it waits as long as the deadline allows.
    """
    deadline = time.monotonic() + timeout_s
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"not after {timeout_s} s: {what}")
        time.sleep(poll_s)


def business_days(start: dt.date, count: int) -> list[dt.date]:
    days: list[dt.date] = []
    day = start
    while len(days) < count:
        if day.weekday() < 5:
            days.append(day)
        day += dt.timedelta(days=1)
    return days


def seed_bars(engine: Engine, symbols: list[str], *, days: int = 300, seed: int = 7) -> dict[str, list[dict[str, Any]]]:
    """Insert a seeded random walk per symbol; returns the rows per symbol (oldest first)."""
    rng = random.Random(seed)
    dates = business_days(dt.date(2023, 1, 2), days)
    by_symbol: dict[str, list[dict[str, Any]]] = {}
    rows: list[dict[str, Any]] = []
    for symbol in symbols:
        price = rng.uniform(10, 500)
        series = []
        for date in dates:
            open_ = price * (1 + rng.gauss(0, 0.005))
            price *= 1 + rng.gauss(0.0003, 0.02)
            close = price
            high = max(open_, close) * (1 + abs(rng.gauss(0, 0.004)))
            low = min(open_, close) * (1 - abs(rng.gauss(0, 0.004)))
            row = {"symbol": symbol, "date": date, "open": open_, "high": high, "low": low, "close": close,
                   "volume": rng.randint(1_000, 5_000_000)}  # fmt: skip
            series.append(row)
            rows.append(row)
        by_symbol[symbol] = series
    with engine.begin() as conn:
        conn.execute(insert(Symbol), [{"symbol": s, "is_synthetic": True} for s in symbols])
        copy_bars(conn, rows)
    return by_symbol


_BAR_COLUMNS = ("symbol", "date", "open", "high", "low", "close", "volume")


def copy_bars(conn: Connection, rows: list[dict[str, Any]]) -> None:
    """Insert daily bars with one COPY (an INSERT of 400,000 rows takes ~15 s, COPY ~1 s). ``repr`` of a float
    is its shortest exact text, so PostgreSQL stores the very doubles the caller holds."""
    symbols = {row["symbol"] for row in rows}
    assert not any(set(s) & set("\t\n\\") for s in symbols), symbols  # COPY's text format would need escapes
    buffer = io.StringIO("".join(
        f"{r['symbol']}\t{r['date'].isoformat()}\t{float(r['open'])!r}\t{float(r['high'])!r}\t{float(r['low'])!r}\t"
        f"{float(r['close'])!r}\t{int(r['volume'])}\n"
        for r in rows
    ))  # fmt: skip
    with conn.connection.driver_connection.cursor() as cursor:  # type: ignore[union-attr]
        cursor.copy_expert(f"COPY {DailyBar.__tablename__} ({', '.join(_BAR_COLUMNS)}) FROM STDIN", buffer)


_KOMBU_PRIORITY_SEP = "\x06\x16"  # kombu's Redis transport: queue ``q`` at priority p > 0 is the list ``q\x06\x16p``


def broker_queue_length(client: redis.Redis, queue: str) -> int:
    """Messages waiting in ``queue`` on the Redis broker, over all its priority lists."""
    return sum(int(client.llen(queue if p == 0 else f"{queue}{_KOMBU_PRIORITY_SEP}{p}")) for p in PRIORITY_STEPS)


def broker_holds_task(client: redis.Redis, queues: list[str], task_id: str) -> bool:
    """True while the broker still has the task's message: waiting in one of ``queues``, or delivered to a worker
    and not yet acknowledged (kombu's ``unacked`` hash)."""
    needle = task_id.encode()
    for queue in queues:
        for p in PRIORITY_STEPS:
            name = queue if p == 0 else f"{queue}{_KOMBU_PRIORITY_SEP}{p}"
            if any(needle in message for message in client.lrange(name, 0, -1)):
                return True
    return any(needle in message for message in client.hvals("unacked"))


def worker_holds_task(app: Celery, task_ids: str | list[str], destination: list[str] | None = None) -> bool:
    """True while a worker has one of the tasks reserved (prefetched) or running. A worker that does not answer
    the inspection counts as holding them: absence must be observed, never assumed. Without ``destination`` the
    inspection waits its whole timeout for replies (it cannot know how many workers there are)."""
    wanted = {task_ids} if isinstance(task_ids, str) else set(task_ids)
    inspect = app.control.inspect(destination=destination, timeout=1.0)
    reserved, active = inspect.reserved(), inspect.active()
    if reserved is None or active is None:
        return True
    return any(task["id"] in wanted for tasks in [*reserved.values(), *active.values()] for task in tasks)


def wait_for_job(client: FlaskClient, job_id: str, timeout_s: float = 90) -> dict[str, Any]:
    deadline = time.monotonic() + timeout_s
    while True:
        response = client.get(f"/api/jobs/{job_id}")
        assert response.status_code == 200, response.json
        body: dict[str, Any] = response.json  # type: ignore[assignment]
        if body["status"] in FINAL:
            return body
        if time.monotonic() > deadline:
            raise AssertionError(f"job {job_id} not finished after {timeout_s} s: {body}")
        time.sleep(0.05)


def all_results(client: FlaskClient, job_id: str, page_size: int = 1000) -> list[dict[str, Any]]:
    rows: list[dict[str, Any]] = []
    cursor = None
    while True:
        query = f"?limit={page_size}" + (f"&cursor={cursor}" if cursor else "")
        response = client.get(f"/api/jobs/{job_id}/results{query}")
        assert response.status_code == 200, response.json
        page: dict[str, Any] = response.json  # type: ignore[assignment]
        rows.extend(page["results"])
        cursor = page["next_cursor"]
        if not cursor:
            return rows


TEST_PASSWORD = "correct horse battery staple"


@dataclass(frozen=True)
class ApiUser:
    id: str
    username: str
    password: str
    role: str
    access_token: str
    refresh_token: str

    @property
    def headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.access_token}"}


def make_user(
    app: Flask, engine: Engine, username: str, password_hash: str, *, role: UserRole = UserRole.USER
) -> ApiUser:
    """An account with password TEST_PASSWORD (``password_hash`` is its hash) and a token pair from ``app``."""
    with engine.begin() as conn:
        user_id = conn.execute(
            insert(User).values(username=username, password_hash=password_hash, role=role.value).returning(User.id)
        ).scalar_one()
    with app.app_context():
        tokens = issue_tokens(user_id)
    return ApiUser(user_id, username, TEST_PASSWORD, role.value, tokens["access_token"], tokens["refresh_token"])


def authed_client(app: Flask, user: ApiUser) -> FlaskClient:
    """A test client that sends the user's access token with every request."""
    client = app.test_client()
    client.environ_base["HTTP_AUTHORIZATION"] = f"Bearer {user.access_token}"
    return client
