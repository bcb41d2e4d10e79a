"""Faults survived: PostgreSQL (a server of the test's own) stops under a running API. Every endpoint answers 503
in the one error shape, never 500, and the API recovers by itself when the database is back."""

from __future__ import annotations

import secrets
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest
from flask.testing import FlaskClient

from api import create_app
from shared.infra import dbadmin, migrate
from shared.infra.config import Settings
from shared.infra.db import make_engine
from shared.ops.embedded import EmbeddedPostgres
from tests.helpers import authed_client, make_user


@pytest.fixture
def own_postgres() -> Iterator[tuple[EmbeddedPostgres, str]]:
    data_dir = Path(tempfile.mkdtemp(prefix="af-pg-", dir="/tmp"))
    server = EmbeddedPostgres(data_dir / "pg")
    server_url = server.start()
    database_url = dbadmin.create_database(server_url, f"af_fault_{secrets.token_hex(4)}")
    migrate.upgrade(database_url)
    yield server, database_url
    server.stop()
    shutil.rmtree(data_dir, ignore_errors=True)


def test_database_outage_is_503_and_the_api_recovers(
    settings: Settings, own_postgres: tuple[EmbeddedPostgres, str], test_password_hash: str
) -> None:
    server, database_url = own_postgres
    base, _, _ = settings.require_redis_url().rpartition("/")
    quiet_broker = f"{base}/10"  # no worker consumes it: nothing submitted here reaches the shared test worker
    app = create_app(settings.with_overrides(database_url=database_url, redis_url=quiet_broker))
    engine = make_engine(database_url, pool_size=1)
    try:
        client: FlaskClient = authed_client(app, make_user(app, engine, "carol", test_password_hash))
        engine.dispose()
        job_path = "/api/jobs/00000000-0000-0000-0000-000000000000"
        assert client.get(job_path).status_code == 404
        assert client.get("/api/health/ready").status_code in (200, 503)  # no worker on this broker is fine here

        server.stop()
        body = {"script": "result = 1", "column_name": "c", "stock_symbols": ["A"]}
        answers = [
            client.get(job_path),
            client.post("/api/custom-calculations/execute", json=body),
            client.get("/api/custom-calculations/scripts"),
            client.get("/api/health"),
            client.get("/api/health/ready"),
            client.get("/metrics"),
        ]
        assert [a.status_code for a in answers] == [503] * 6, [a.get_data(as_text=True)[:300] for a in answers]
        for answer in answers[:3] + answers[5:]:
            error = answer.get_json()["error"]
            assert error["code"] == "service_unavailable" and set(error) == {"code", "message", "details"}
        assert answers[3].get_json()["database"]["ok"] is False
        assert answers[4].get_json()["database"]["ok"] is False

        server.start()  # same data directory: the same database comes back
        assert client.get(job_path).status_code == 404
        assert client.post("/api/custom-calculations/execute", json=body).status_code == 202
        assert client.get("/api/health").get_json()["database"]["ok"] is True
    finally:
        app.extensions["alphaforge"].redis.flushdb()
        app.extensions["alphaforge"].engine.dispose()
