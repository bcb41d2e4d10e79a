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
from api.ratelimit import reset_rate_limits
from shared.infra.config import RateLimits, Settings
from shared.infra.models import AuditLog, Job
from tests.helpers import ApiUser, authed_client, seed_bars

EXECUTE = "/api/custom-calculations/execute"
LIMITS = RateLimits(
    submit="3/minute",
    login="6/minute",
    failed_login_pair="3 per 15 minutes",
    failed_login_user="6 per 15 minutes",
    failed_login_address="10 per 15 minutes",
    failed_login_usernames="4 per 15 minutes",
    register="2/hour",
    max_active_jobs=2,
)
LOGIN = "/api/auth/login"


@pytest.fixture
def limited_app(settings: Settings, api_state: Engine) -> Iterator[Flask]:
    app = create_app(settings.with_overrides(rate_limits=LIMITS))
    reset_rate_limits(app)  # the counts of earlier tests (same usernames, same Redis) are forgotten
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


def login_from(app: Flask, address: str, username: str, password: str) -> Any:
    return app.test_client().post(LOGIN, json={"username": username, "password": password},
                                  environ_base={"REMOTE_ADDR": address})  # fmt: skip


def test_a_guesser_at_one_address_locks_out_only_itself(limited_app: Flask, user: ApiUser, other_user: ApiUser) -> None:
    """Three wrong passwords for alice from one address close that (alice, address) pair: the right password
    from another address still logs her in, and bob logs in from the guesser's own address (a NAT)."""
    for _ in range(3):
        assert login_from(limited_app, "203.0.113.9", user.username, "guess").status_code == 401
    error = assert_429(login_from(limited_app, "203.0.113.9", user.username, "guess"), max_retry_after=15 * 60)
    assert "3 per 15 minute" in error["message"]
    assert_429(login_from(limited_app, "203.0.113.9", user.username, user.password))  # the pair is closed
    assert login_from(limited_app, "198.51.100.7", user.username, user.password).status_code == 200  # a first login
    assert login_from(limited_app, "203.0.113.9", other_user.username, other_user.password).status_code == 200
    assert login_from(limited_app, "203.0.113.9", user.username.upper(), "guess").status_code == 429  # same account


def test_an_attacker_rotating_addresses_is_stopped_per_account(limited_app: Flask, user: ApiUser) -> None:
    """Guesses from ever new addresses add up per account (6 here, above the pair limit of 3): then no new
    address may try, the right password included, while alice's own known address still logs her in."""
    assert login_from(limited_app, "192.0.2.1", user.username, user.password).status_code == 200  # her usual address
    for attacker in ("203.0.113.1", "203.0.113.2", "203.0.113.3"):
        for _ in range(2):
            assert login_from(limited_app, attacker, user.username, "guess").status_code == 401
    error = assert_429(login_from(limited_app, "203.0.113.4", user.username, "guess"), max_retry_after=15 * 60)
    assert "6 per 15 minute" in error["message"]
    assert_429(login_from(limited_app, "198.51.100.7", user.username, user.password))  # new address: waits
    assert login_from(limited_app, "192.0.2.1", user.username, user.password).status_code == 200  # known: exempt
    # Her own pair limit still holds at the known address (a guesser behind the same NAT gets 3 there).
    for _ in range(3):
        assert login_from(limited_app, "192.0.2.1", user.username, "typo").status_code == 401
    assert_429(login_from(limited_app, "192.0.2.1", user.username, user.password))


def test_a_noisy_address_keeps_its_known_users(limited_app: Flask, user: ApiUser, other_user: ApiUser) -> None:
    """A password sprayer behind an office's address: after 4 distinct usernames failed, a 5th new username is
    refused (the ones tried keep their pair allowance), and after 10 failures in all the address's ceiling is
    reached; users who logged in from that address before still log in, a first login from it waits."""
    office = "198.51.100.20"
    assert login_from(limited_app, office, other_user.username, other_user.password).status_code == 200  # bob, known
    for name in ("u1", "u2", "u3", "u4"):
        assert login_from(limited_app, office, name, "Summer2024").status_code == 401
    error = assert_429(login_from(limited_app, office, "u5", "Summer2024"), max_retry_after=15 * 60)
    assert "different usernames" in error["message"] and error["details"]["limit"] == "4 per 15 minutes"
    assert_429(login_from(limited_app, office, user.username, user.password))  # alice, never here: waits
    assert login_from(limited_app, "192.0.2.50", "u5", "Summer2024").status_code == 401  # only this address
    for name in ("u1", "u2", "u3", "u1", "u2", "u3"):  # the tried usernames go on, to the ceiling (10)
        assert login_from(limited_app, office, name, "Winter2024").status_code == 401
    error = assert_429(login_from(limited_app, office, "u4", "Winter2024"))
    assert "10 per 15 minute" in error["message"]
    assert login_from(limited_app, office, other_user.username, other_user.password).status_code == 200


def test_login_attempts_per_username_and_address(limited_app: Flask, user: ApiUser) -> None:
    client = limited_app.test_client()
    good = {"username": user.username.upper(), "password": user.password}  # same account, however spelled
    for _ in range(6):
        assert client.post(LOGIN, json=good).status_code == 200
    assert_429(client.post(LOGIN, json={**good, "username": user.username}), max_retry_after=60)
    assert login_from(limited_app, "192.0.2.77", user.username, user.password).status_code == 200  # another address


def test_registrations_per_address(limited_app: Flask) -> None:
    client: FlaskClient = limited_app.test_client()
    for name in ("reg-one", "reg-two"):
        assert (
            client.post("/api/auth/register", json={"username": name, "password": "long password"}).status_code == 201
        )
    assert_429(client.post("/api/auth/register", json={"username": "reg-three", "password": "long password"}))
