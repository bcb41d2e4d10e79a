"""Helpers for integration tests: deterministic bars, polling, test accounts."""

from __future__ import annotations

import contextlib
import datetime as dt
import random
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, TypeVar

import psutil
import redis
from celery import Celery
from flask import Flask
from flask.testing import FlaskClient
from sqlalchemy import Connection, Engine, insert, text

from api.auth import issue_tokens
from shared.infra.models import Symbol, User, UserRole
from shared.jobs.fairness import PRIORITY_STEPS
from shared.marketdata import store
from shared.marketdata.series import COLUMNS, DEFAULT_TIMEFRAME, day_ts

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


def copy_bars(conn: Connection, rows: list[dict[str, Any]]) -> None:
    """Store daily bars through the product's write path (``store.store_columns``), in ``conn``'s transaction."""
    by_symbol: dict[str, list[dict[str, Any]]] = {}
    for row in rows:
        by_symbol.setdefault(row["symbol"], []).append(row)
    incoming = {}
    for symbol, own in by_symbol.items():
        own.sort(key=lambda r: r["date"])
        incoming[symbol] = store.columns_of(
            [day_ts(r["date"]) for r in own], *([float(r[name]) for r in own] for name in COLUMNS)
        )
    store.store_columns(conn, DEFAULT_TIMEFRAME, incoming)


def stored_rows(engine: Engine, timeframe: str = DEFAULT_TIMEFRAME) -> list[tuple[Any, ...]]:
    """Every stored bar at ``timeframe`` as (symbol, date, open, high, low, close, volume), by symbol and date,
    read through the product's read path with a cache of its own (what another process would read)."""
    with engine.connect() as conn:
        symbols = list(conn.scalars(text("SELECT symbol FROM bar_series WHERE timeframe = :tf"), {"tf": timeframe}))
        found = store.read_series(conn, symbols, timeframe, cache=store.ChunkCache(0))
    rows: list[tuple[Any, ...]] = []
    for symbol in sorted(found):
        c = found[symbol].columns
        days = (c.ts // 86_400).astype("datetime64[D]").astype(dt.date).tolist()
        rows.extend(zip([symbol] * len(days), days, c.open.tolist(), c.high.tolist(), c.low.tolist(),
                        c.close.tolist(), [int(v) for v in c.volume.tolist()], strict=True))  # fmt: skip
    return rows


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


ZYGOTE_MARK = "shared.sandbox.zygote"  # in a zygote's command line, and so in every child it forks


def sandbox_processes(root_pid: int) -> tuple[list[psutil.Process], list[psutil.Process]]:
    """(zygotes, forked sandbox children) in the process tree under ``root_pid``: a child keeps its zygote's
    command line, and its parent is a zygote."""
    zygotes: list[psutil.Process] = []
    children: list[psutil.Process] = []
    for process in psutil.Process(root_pid).children(recursive=True):
        with contextlib.suppress(psutil.Error):
            if ZYGOTE_MARK not in " ".join(process.cmdline()):
                continue
            parent = process.parent()
            forked = parent is not None and ZYGOTE_MARK in " ".join(parent.cmdline())
            (children if forked else zygotes).append(process)
    return zygotes, children
