"""Nothing hangs: a storm of health probes starves nothing, and a frozen PostgreSQL or Redis (SIGSTOP: the kernel still
ACKs TCP, the server answers nothing) makes every request of a real gunicorn API answer within 5 s (a JSON 503 where
the frozen server is needed), and everything answers normally within 5 s of the server waking up."""

from __future__ import annotations

import contextlib
import http.client
import json
import secrets
import shutil
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import psutil
import psycopg2
import psycopg2.extensions
import pytest
import redis
from sqlalchemy import Engine

from api import create_app
from shared.infra import dbadmin, migrate
from shared.infra.config import Settings
from shared.infra.db import Bounds, install_deadlines, make_engine
from shared.marketdata import store
from shared.ops.embedded import EmbeddedPostgres, EmbeddedRedis
from tests.helpers import TEST_PASSWORD, ApiUser, make_user, seed_bars
from tests.integration.test_events import running_api

pytestmark = pytest.mark.slow  # scheduled first (tests/conftest.py)

Server = tuple[str, int]
BOUND_S = 5.0  # the bound: every answer during a freeze, and recovery after it
PROBES = 200
CALC = {"script": "result = close[-1]", "column_name": "c", "stock_symbols": ["FRZ0"]}


def call(server: Server, method: str, path: str, user: ApiUser | None = None, body: Any = None,
         timeout_s: float = 30) -> tuple[int, Any, float]:  # fmt: skip
    """(status, JSON body, seconds) of one request on a new connection."""
    started = time.monotonic()
    conn = http.client.HTTPConnection(*server, timeout=timeout_s)
    try:
        headers = {**(user.headers if user else {}), "Content-Type": "application/json"}
        conn.request(method, path, body=json.dumps(body) if body is not None else None, headers=headers)
        response = conn.getresponse()
        raw = response.read()
        status = response.status
    finally:
        conn.close()
    try:
        payload = json.loads(raw) if raw else None
    except ValueError:
        payload = raw.decode(errors="replace")
    return status, payload, time.monotonic() - started


def endpoints(user: ApiUser) -> dict[str, Callable[[Server], tuple[int, Any, float]]]:
    """What a frozen server must not hang: reads, a submission, the scripts list, login, health, metrics."""
    job = "/api/jobs/00000000-0000-0000-0000-000000000000"
    login = {"username": user.username, "password": TEST_PASSWORD}
    return {
        "job": lambda s: call(s, "GET", job, user),
        "results": lambda s: call(s, "GET", f"{job}/results", user),
        "submit": lambda s: call(s, "POST", "/api/custom-calculations/execute", user, CALC),
        "scripts": lambda s: call(s, "GET", "/api/custom-calculations/scripts", user),
        "login": lambda s: call(s, "POST", "/api/auth/login", None, login),
        "health": lambda s: call(s, "GET", "/api/health"),
        "ready": lambda s: call(s, "GET", "/api/health/ready"),
        "metrics": lambda s: call(s, "GET", "/metrics"),
        "live": lambda s: call(s, "GET", "/api/health/live"),
    }


def all_at_once(server: Server, calls: dict[str, Callable[[Server], tuple[int, Any, float]]]) -> dict[str, Any]:
    with ThreadPoolExecutor(len(calls)) as pool:
        futures = {name: pool.submit(fn, server) for name, fn in calls.items()}
        return {name: future.result() for name, future in futures.items()}


def until_answered(server: Server, calls: dict[str, Callable[[Server], tuple[int, Any, float]]],
                   good: dict[str, set[int]], timeout_s: float) -> float:  # fmt: skip
    """Seconds until every call answers one of its good statuses (asked again and again)."""
    started = time.monotonic()
    pending = dict(calls)
    last: dict[str, Any] = {}
    while pending:
        for name, fn in list(pending.items()):
            status, body, _ = fn(server)
            last[name] = (status, str(body)[:200])
            if status in good[name]:
                del pending[name]
        assert time.monotonic() - started < timeout_s, f"not recovered within {timeout_s} s: {last}"
        time.sleep(0.05)
    return time.monotonic() - started


def _frozen(procs: list[psutil.Process]) -> contextlib.AbstractContextManager[None]:
    @contextlib.contextmanager
    def freeze() -> Iterator[None]:
        for proc in procs:
            proc.suspend()
        try:
            yield
        finally:
            for proc in procs:
                with contextlib.suppress(psutil.Error):
                    proc.resume()

    return freeze()


# --- a storm of probes -------------------------------------------------------------------------------------------


def test_a_storm_of_health_probes_starves_nothing(
    settings: Settings, api_state: Engine, test_password_hash: str, celery_worker: object
) -> None:
    seed_bars(api_state, ["FRZ0"], days=40)
    app = create_app(settings)
    user = make_user(app, api_state, "stormy", test_password_hash)
    app.extensions["alphaforge"].engine.dispose()
    with running_api(settings, ALPHAFORGE_HEALTH_CACHE="1") as server:
        paths = ["/api/health", "/api/health/ready", "/api/health/live"]
        start = threading.Barrier(PROBES)

        def probe(n: int) -> tuple[int, Any, float]:
            start.wait()
            return call(server, "GET", paths[n % 3], timeout_s=60)

        storm_started = time.monotonic()
        with ThreadPoolExecutor(PROBES) as pool:
            answers = list(pool.map(probe, range(PROBES)))
        storm_s = time.monotonic() - storm_started
        assert all(status in (200, 503) for status, _, _ in answers), {s for s, _, _ in answers}
        assert all(status == 200 for (status, _, _), n in zip(answers, range(PROBES), strict=True) if n % 3 == 2)

        latencies = []
        for _ in range(10):
            status, body, seconds = call(server, "POST", "/api/custom-calculations/execute", user, CALC)
            assert status == 202, body
            latencies.append(seconds)
            status, body, seconds = call(server, "GET", f"/api/jobs/{body['job_id']}", user)
            assert status == 200, body
            latencies.append(seconds)
        worst_probe = max(s for _, _, s in answers)
        print(f"\n[storm] {PROBES} concurrent probes answered in {storm_s:.2f} s (slowest {worst_probe:.2f} s); "
              f"then 10 submissions and 10 polls: slowest {max(latencies) * 1000:.0f} ms")  # fmt: skip
        assert max(latencies) < 1.0, latencies


# --- a frozen PostgreSQL -----------------------------------------------------------------------------------------


@pytest.fixture
def own_postgres() -> Iterator[tuple[EmbeddedPostgres, str]]:
    data_dir = Path(tempfile.mkdtemp(prefix="af-frz-", dir="/tmp"))
    server = EmbeddedPostgres(data_dir / "pg")
    try:
        database_url = dbadmin.create_database(server.start(), f"af_frozen_{secrets.token_hex(4)}")
        migrate.upgrade(database_url)
        yield server, database_url
    finally:
        server.stop()
        shutil.rmtree(data_dir, ignore_errors=True)


def _postgres_processes(server: EmbeddedPostgres) -> list[psutil.Process]:
    root = psutil.Process(int((server.data_dir / "postmaster.pid").read_text().split()[0]))
    return [root, *root.children(recursive=True)]


def test_a_frozen_database_is_a_503_within_seconds_and_the_api_recovers(
    settings: Settings, own_postgres: tuple[EmbeddedPostgres, str], test_password_hash: str
) -> None:
    server_pg, database_url = own_postgres
    base, _, _ = settings.require_redis_url().rpartition("/")
    own = settings.with_overrides(database_url=database_url, redis_url=f"{base}/11")  # no worker consumes it
    client = redis.Redis.from_url(own.require_redis_url())
    client.flushdb()
    engine = make_engine(database_url, pool_size=1)
    app = create_app(own)
    try:
        user = make_user(app, engine, "frosty", test_password_hash)
        calls = endpoints(user)
        with running_api(own) as server:
            before = all_at_once(server, calls)  # every pooled connection is open and warm
            assert before["job"][0] == 404 and before["live"][0] == 200, before
            with _frozen(_postgres_processes(server_pg)):
                frozen = all_at_once(server, calls)
                again = all_at_once(server, calls)  # now the pools hold dead connections, or none
            for answers in (frozen, again):
                slow = {name: round(s, 2) for name, (_, _, s) in answers.items() if s >= BOUND_S}
                assert not slow, f"answered after more than {BOUND_S} s: {slow}"
                for name, (status, body, _) in answers.items():
                    if name == "live":
                        assert status == 200
                        continue
                    assert status == 503, (name, status, body)
                    if name in ("health", "ready"):
                        assert body["database"]["ok"] is False
                    else:
                        assert set(body["error"]) == {"code", "message", "details"}, body
                        assert body["error"]["code"] == "service_unavailable"
            good = {name: {200} for name in calls} | {"job": {404}, "results": {404}, "submit": {202},
                                                       "ready": {503}, "health": {200}}  # fmt: skip
            recovered_s = until_answered(server, calls, good, BOUND_S)
        worst = max(s for answers in (frozen, again) for _, _, s in answers.values())
        print(f"\n[frozen database] slowest answer while frozen {worst:.2f} s; every endpoint answered normally "
              f"{recovered_s:.2f} s after it woke")  # fmt: skip
    finally:
        client.flushdb()
        client.close()
        app.extensions["alphaforge"].engine.dispose()
        engine.dispose()


class _FreezeOnFirstLook(store.ChunkCache):
    """A cache that freezes the database the first time a read looks into it: between the read's metadata statement
    and its COPY of the chunks' bytes."""

    def __init__(self, server: EmbeddedPostgres) -> None:
        super().__init__(0)
        self.server, self.freeze, self.frozen = server, contextlib.ExitStack(), False

    def get(self, key: store.ChunkKey) -> Any:
        if not self.frozen:  # every process of the server, the reader's own backend included
            self.frozen = True
            self.freeze.enter_context(_frozen(_postgres_processes(self.server)))
        return super().get(key)


def test_a_workers_bar_copy_on_a_frozen_database_ends_at_its_deadline(
    own_postgres: tuple[EmbeddedPostgres, str],
) -> None:
    """A worker reads bars by COPY, for which the wait callback is taken out: a watchdog ends it at the statement's
    deadline instead, the callback is back afterwards, and the next read works once the database wakes."""
    server_pg, database_url = own_postgres
    install_deadlines()
    bounds = Bounds(connect_s=2, ping_s=1, statement_s=1.0, lock_s=1.0, idle_in_transaction_s=5, pool_checkout_s=2)
    engine = make_engine(database_url, pool_size=1, bounds=bounds)
    cache = _FreezeOnFirstLook(server_pg)
    try:
        seed_bars(engine, ["FRZ1", "FRZ2"], days=50)
        store.configure(0, copy=True)
        began = time.monotonic()
        with pytest.raises(psycopg2.OperationalError), engine.connect() as conn:
            store.read_series(conn, ["FRZ1", "FRZ2"], "1d", cache=cache)
        took = time.monotonic() - began
        assert cache.frozen and took < BOUND_S, f"the COPY ended after {took:.2f} s"
        assert psycopg2.extensions.get_wait_callback() is not None  # bounded waits again
    finally:
        cache.freeze.close()
        store.configure(256, copy=False)
    with engine.connect() as conn:  # the pool dropped the dead connection: a fresh one reads
        assert set(store.read_series(conn, ["FRZ1", "FRZ2"], "1d", cache=store.ChunkCache(0))) == {"FRZ1", "FRZ2"}
    engine.dispose()
    print(f"\n[frozen database] a worker's bar COPY ended {took:.2f} s after it began (statement bound 1 s)")


# --- a frozen Redis ----------------------------------------------------------------------------------------------


@pytest.fixture
def own_redis() -> Iterator[EmbeddedRedis]:
    data_dir = Path(tempfile.mkdtemp(prefix="af-frz-redis-", dir="/tmp"))
    server = EmbeddedRedis(data_dir)
    server.start()
    try:
        yield server
    finally:
        server.stop()
        shutil.rmtree(data_dir, ignore_errors=True)


def test_a_frozen_redis_is_a_503_within_seconds_and_the_api_recovers(
    settings: Settings, api_state: Engine, own_redis: EmbeddedRedis, test_password_hash: str
) -> None:
    own = settings.with_overrides(redis_url=f"redis://127.0.0.1:{own_redis.port}/0")
    app = create_app(own)
    try:
        user = make_user(app, api_state, "icy", test_password_hash)
        calls = endpoints(user)
        assert own_redis._proc is not None
        with running_api(own) as server:
            before = all_at_once(server, calls)
            assert before["job"][0] == 404, before
            with _frozen([psutil.Process(own_redis._proc.pid)]):
                frozen = all_at_once(server, calls)
                again = all_at_once(server, calls)
            for answers in (frozen, again):
                slow = {name: round(s, 2) for name, (_, _, s) in answers.items() if s >= BOUND_S}
                assert not slow, f"answered after more than {BOUND_S} s: {slow}"
                for name, (status, body, _) in answers.items():
                    # Token revocation lives in Redis and fails closed; login's throttling fails open; liveness
                    # and the database-only parts need no Redis.
                    expected = {"live": {200}, "login": {200, 503}, "metrics": {200, 503}}.get(name, {503})
                    assert status in expected, (name, status, body)
                    if status == 503 and name not in ("health", "ready"):
                        assert body["error"]["code"] == "service_unavailable", body
            good = {name: {200} for name in calls} | {"job": {404}, "results": {404}, "submit": {202},
                                                       "ready": {503}}  # fmt: skip
            recovered_s = until_answered(server, calls, good, BOUND_S)
        worst = max(s for answers in (frozen, again) for _, _, s in answers.values())
        print(f"\n[frozen redis] slowest answer while frozen {worst:.2f} s; every endpoint answered normally "
              f"{recovered_s:.2f} s after it woke")  # fmt: skip
    finally:
        app.extensions["alphaforge"].engine.dispose()
