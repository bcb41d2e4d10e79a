"""Rate limits (flask-limiter, counted in the real Redis) and the concurrent-jobs quota (PostgreSQL).

Each test builds an app with small, explicit limits and checks the 429 arrives after exactly that count,
in the one error shape and with a Retry-After header.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator
from typing import Any

import pytest
from flask import Flask
from flask.testing import FlaskClient
from sqlalchemy import Engine, func, select

from api import create_app
from shared.config import RateLimits, Settings
from shared.models import AuditLog, Job
from tests.helpers import ApiUser, authed_client, seed_bars

EXECUTE = "/api/custom-calculations/execute"
LIMITS = RateLimits(
    submit="3/minute",
    login="6/minute",
    failed_login_user="2 per 15 minutes",
    failed_login_address="3 per 15 minutes",
    register="2/hour",
    max_active_jobs=2,
)


@pytest.fixture
def limited_app(settings: Settings, api_state: Engine) -> Iterator[Flask]:
    app = create_app(settings.with_overrides(rate_limits=LIMITS))
    yield app
    app.extensions["alphaforge"].engine.dispose()


def assert_429(response: Any, code: str = "rate_limited", *, max_retry_after: int = 3600) -> dict[str, Any]:
    assert response.status_code == 429, response.get_data(as_text=True)
    body = response.get_json()
    assert set(body) == {"error"} and body["error"]["code"] == code, body
    retry_after = int(response.headers["Retry-After"])
    assert 1 <= retry_after <= max_retry_after
    return body["error"]


def test_submissions_per_user(limited_app: Flask, user: ApiUser, other_user: ApiUser, engine: Engine) -> None:
    alice, bob = authed_client(limited_app, user), authed_client(limited_app, other_user)
    bad = {"script": "x = (", "column_name": "c", "stock_symbols": ["A"]}  # refused after the count: no jobs
    for _ in range(3):
        assert alice.post(EXECUTE, json=bad).status_code == 422
    error = assert_429(alice.post(EXECUTE, json=bad), max_retry_after=60)
    assert "3 per 1 minute" in error["message"]
    assert bob.post(EXECUTE, json=bad).status_code == 422  # per user: bob has his own allowance
    with engine.connect() as conn:
        assert conn.scalar(select(func.count()).select_from(Job)) == 0


def test_concurrently_active_jobs_per_user(
    settings: Settings, user: ApiUser, other_user: ApiUser, engine: Engine
) -> None:
    seed_bars(engine, ["Q1"], days=5)  # with bars the script runs (and spins) if a worker is up
    app = create_app(settings.with_overrides(rate_limits=dataclasses.replace(LIMITS, submit="100/minute")))
    try:
        _check_active_jobs_quota(authed_client(app, user), authed_client(app, other_user))
    finally:
        app.extensions["alphaforge"].engine.dispose()
    with engine.connect() as conn:  # a refused submission left no job and no audit row behind
        submitted = conn.execute(select(AuditLog.actor_id, AuditLog.resource_id).where(AuditLog.action == "job.submit"))
        jobs = conn.execute(select(Job.owner_id, Job.id))
        assert sorted((a, r) for a, r in submitted) == sorted((o, str(i)) for o, i in jobs)
        assert conn.scalar(select(func.count()).select_from(Job)) == 4


def _check_active_jobs_quota(alice: FlaskClient, bob: FlaskClient) -> None:
    # A script that spins until the sandbox's time limit keeps the jobs active, worker or not.
    body = {"script": "while True:\n    pass", "column_name": "c", "stock_symbols": ["Q1"]}
    first = alice.post(EXECUTE, json=body).get_json()["job_id"]
    assert alice.post(EXECUTE, json=body).status_code == 202
    error = assert_429(alice.post(EXECUTE, json=body), "quota_exceeded", max_retry_after=60)
    assert error["details"] == {"active_jobs": 2, "max_active_jobs": 2}
    assert bob.post(EXECUTE, json=body).status_code == 202  # the quota is per user

    assert alice.post(f"/api/jobs/{first}/cancel").get_json()["status"] == "cancelled"
    assert alice.post(EXECUTE, json=body).status_code == 202  # room again


def test_failed_logins_are_throttled_per_username_and_per_address(limited_app: Flask, user: ApiUser) -> None:
    client = limited_app.test_client()
    good = {"username": user.username, "password": user.password}
    wrong = {"username": user.username, "password": "wrong password"}
    for _ in range(3):
        assert client.post("/api/auth/login", json=good).status_code == 200  # successes are not failures
    assert client.post("/api/auth/login", json=wrong).status_code == 401
    assert client.post("/api/auth/login", json=wrong).status_code == 401
    # Two failures for this username: even the right password waits now.
    assert_429(client.post("/api/auth/login", json=good), max_retry_after=15 * 60)
    # Another username from the same address: one more failure fills the address's allowance (3).
    assert client.post("/api/auth/login", json={"username": "mallory", "password": "guess one"}).status_code == 401
    assert_429(client.post("/api/auth/login", json={"username": "someone", "password": "guess two"}))


def test_login_attempts_per_username(limited_app: Flask, user: ApiUser) -> None:
    client = limited_app.test_client()
    good = {"username": user.username.upper(), "password": user.password}  # same account, however spelled
    for _ in range(6):
        assert client.post("/api/auth/login", json=good).status_code == 200
    assert_429(client.post("/api/auth/login", json={**good, "username": user.username}), max_retry_after=60)


def test_registrations_per_address(limited_app: Flask) -> None:
    client: FlaskClient = limited_app.test_client()
    for name in ("reg-one", "reg-two"):
        assert (
            client.post("/api/auth/register", json={"username": name, "password": "long password"}).status_code == 201
        )
    assert_429(client.post("/api/auth/register", json={"username": "reg-three", "password": "long password"}))
