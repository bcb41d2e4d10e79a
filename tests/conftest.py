"""Test harness: real PostgreSQL, real Redis, a real Celery worker process.

Servers: ``ALPHAFORGE_TEST_DATABASE_URL`` (any database on a server where we may create databases)
and ``ALPHAFORGE_TEST_REDIS_URL`` (a Redis database the tests may flush) point the tests at running
servers; when unset, the tests start the embedded servers themselves. Each run works in a fresh
database ``af_test_<random>`` that is dropped at the end.

``./alphaforge test`` runs three pytest-xdist processes (pyproject.toml), a file at a time each: every process has
its own servers (or its own database on the given PostgreSQL server), worker and data directory, so that what a
file does to its stack (a Redis restart, a paused PostgreSQL) never reaches a test of another process. Tests use
fixed database numbers on their Redis server: a given one takes one process (``-n 0``).
"""

from __future__ import annotations

import contextlib
import os
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import redis
from flask import Flask
from flask.testing import FlaskClient
from sqlalchemy import Engine, text
from sqlalchemy.exc import OperationalError
from sqlalchemy.orm import Session, sessionmaker

from api import create_app
from api.ratelimit import reset_rate_limits
from shared.accounts.passwords import hash_password
from shared.contract import create_celery
from shared.infra import dbadmin, migrate
from shared.infra.config import SandboxLimits, Settings, Timeouts
from shared.infra.db import make_engine, make_session_factory
from shared.infra.models import Base, UserRole
from shared.ops.embedded import EmbeddedServers
from tests.helpers import TEST_PASSWORD, ApiUser, authed_client, make_user

PROJECT_ROOT = Path(__file__).resolve().parent.parent

# A secret only the test worker's environment holds: the attack suite checks it never appears anywhere.
WORKER_SECRET = f"af-canary-{secrets.token_hex(8)}"
WORKER_LOG_NAME = "celery-worker.log"  # under settings.data_dir

# Every table of the models is emptied between tests (a table added later cannot be forgotten here).
_DATA_TABLES = tuple(table.name for table in reversed(Base.metadata.sorted_tables))
DEADLOCK_DETECTED = "40P01"  # PostgreSQL's SQLSTATE


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "slow: a file of tests that takes tens of seconds; scheduled first")
    if os.environ.get("ALPHAFORGE_TEST_REDIS_URL") and (config.getoption("numprocesses", None) or 0) > 1:
        raise pytest.UsageError(
            "ALPHAFORGE_TEST_REDIS_URL: the tests flush that Redis server's databases by number, so they cannot share "
            "it between parallel processes; add -n 0 (one process), or unset it (each process starts its own Redis)"
        )


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """The slow files first (a stable sort: files and tests keep their order otherwise), so that the parallel run
    does not end with one long file running alone while the other processes idle."""
    items.sort(key=lambda item: item.get_closest_marker("slow") is None)


@dataclass(frozen=True)
class ServerUrls:
    server_database_url: str
    redis_url: str
    data_dir: Path


@pytest.fixture(scope="session")
def test_servers() -> Iterator[ServerUrls]:
    # Short path: PostgreSQL's unix socket path must stay under ~100 bytes.
    data_dir = Path(tempfile.mkdtemp(prefix="af-", dir="/tmp"))
    embedded = EmbeddedServers(data_dir)
    db_url, redis_url = embedded.start(
        database_url=os.environ.get("ALPHAFORGE_TEST_DATABASE_URL"),
        redis_url=os.environ.get("ALPHAFORGE_TEST_REDIS_URL"),
    )
    try:
        yield ServerUrls(db_url, redis_url, data_dir)
    finally:
        embedded.stop()
        shutil.rmtree(data_dir, ignore_errors=True)


@pytest.fixture(scope="session")
def settings(test_servers: ServerUrls) -> Iterator[Settings]:
    """Settings of a fresh, migrated database. Tests derive variants with ``with_overrides``."""
    name = f"af_test_{secrets.token_hex(4)}"
    database_url = dbadmin.create_database(test_servers.server_database_url, name)
    migrate.upgrade(database_url)
    client = redis.Redis.from_url(test_servers.redis_url)
    client.flushdb()
    client.close()
    yield Settings(
        database_url=database_url,
        redis_url=test_servers.redis_url,
        data_dir=test_servers.data_dir,
        shard_size=50,
        worker_concurrency=2,
        enqueue_timeout_s=3.0,
        # 256 MB on top of the interpreter: a memory bomb meets its limit in a fraction of the 3 s, even on a busy
        # 2-core machine (at 512 MB, one that touched every page took 0.3 s idle and once over 3 s under load).
        sandbox=SandboxLimits(symbol_timeout_s=3.0, memory_mb=256),
        jwt_secret_key=secrets.token_urlsafe(48),
        # Every probe checks afresh (tests change state and look at once); single-flight still holds.
        timeouts=Timeouts(health_cache_s=0.0),
    )
    dbadmin.drop_database(test_servers.server_database_url, name)


@pytest.fixture(scope="session")
def engine(settings: Settings) -> Iterator[Engine]:
    eng = make_engine(settings.require_database_url())
    yield eng
    eng.dispose()


@pytest.fixture(scope="session")
def session_factory(engine: Engine) -> sessionmaker[Session]:
    return make_session_factory(engine)


@pytest.fixture
def clean_db(engine: Engine) -> Iterator[Engine]:
    """Empty every data table before the test (integration tests request it, directly or not).

    The session's worker may still be finishing something a previous test started (a retention pass, a late
    duplicate delivery) while TRUNCATE takes its locks table by table: PostgreSQL may then break a deadlock by
    rolling the TRUNCATE back (40P01). The other transaction goes on, and the TRUNCATE is tried again."""
    for attempt in range(1, 6):
        try:
            with engine.begin() as conn:
                conn.execute(text(f"TRUNCATE {', '.join(_DATA_TABLES)} CASCADE"))
            break
        except OperationalError as exc:
            if getattr(exc.orig, "pgcode", None) != DEADLOCK_DETECTED or attempt == 5:
                raise
    yield engine


@pytest.fixture(scope="session")
def celery_worker(settings: Settings) -> Iterator[subprocess.Popen[bytes]]:
    """A real Celery worker process (``python -m worker worker``) on the test database and Redis."""
    log_path = settings.data_dir / WORKER_LOG_NAME
    env = {**os.environ, **settings.child_env(), "PYTHONUNBUFFERED": "1", "ALPHAFORGE_CANARY_SECRET": WORKER_SECRET}
    with open(log_path, "wb") as log_file:
        proc = subprocess.Popen(
            [sys.executable, "-m", "worker", "worker", "--hostname", f"test-{secrets.token_hex(3)}@%h"],
            cwd=PROJECT_ROOT,
            env=env,
            stdout=log_file,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    app = create_celery(settings)
    try:
        deadline = time.monotonic() + 60
        while not app.control.ping(timeout=0.5):
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"celery worker did not come up; log:\n{log_path.read_text()[-4000:]}")
        yield proc
    finally:
        app.close()
        _stop_process_group(proc)


def _stop_process_group(proc: subprocess.Popen[bytes], timeout_s: float = 20) -> None:
    if proc.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


@pytest.fixture(scope="session")
def flask_app(settings: Settings) -> Iterator[Flask]:
    app = create_app(settings)
    yield app
    app.extensions["alphaforge"].engine.dispose()


# --- accounts: the API needs authentication; `client` is a regular user unless a test asks otherwise ----------


@pytest.fixture(scope="session")
def test_password_hash() -> str:
    """One argon2 hash for every test account (hashing per test would cost ~0.1 s each)."""
    return hash_password(TEST_PASSWORD)


@pytest.fixture
def api_state(flask_app: Flask, clean_db: Engine) -> Engine:
    """Empty tables and full rate-limit allowances."""
    reset_rate_limits(flask_app)
    return clean_db


@pytest.fixture
def user(flask_app: Flask, api_state: Engine, test_password_hash: str) -> ApiUser:
    return make_user(flask_app, api_state, "alice", test_password_hash)


@pytest.fixture
def other_user(flask_app: Flask, api_state: Engine, test_password_hash: str) -> ApiUser:
    return make_user(flask_app, api_state, "bob", test_password_hash)


@pytest.fixture
def admin_user(flask_app: Flask, api_state: Engine, test_password_hash: str) -> ApiUser:
    return make_user(flask_app, api_state, "root", test_password_hash, role=UserRole.ADMIN)


@pytest.fixture
def client(flask_app: Flask, user: ApiUser) -> FlaskClient:
    """Authenticated as the regular test user ``alice`` (a Bearer access token on every request)."""
    return authed_client(flask_app, user)


@pytest.fixture
def other_client(flask_app: Flask, other_user: ApiUser) -> FlaskClient:
    """Authenticated as a second regular user, ``bob``."""
    return authed_client(flask_app, other_user)


@pytest.fixture
def admin_client(flask_app: Flask, admin_user: ApiUser) -> FlaskClient:
    return authed_client(flask_app, admin_user)


@pytest.fixture
def anon_client(flask_app: Flask, api_state: Engine) -> FlaskClient:
    """No credentials at all."""
    return flask_app.test_client()
