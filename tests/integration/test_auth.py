"""Accounts and authentication against the real API, PostgreSQL and Redis: register, login, refresh rotation,
logout, expired/revoked/malformed tokens, API keys, the operator CLI."""

from __future__ import annotations

import datetime as dt
import os
import subprocess
import sys
import time
import uuid
from typing import Any

import jwt
import pytest
from flask import Flask
from flask.testing import FlaskClient
from flask_jwt_extended import create_access_token
from sqlalchemy import Engine, select, update

from api import create_app
from shared.infra.config import Settings
from shared.infra.migrate import PROJECT_ROOT
from shared.infra.models import ApiKey, User
from tests.helpers import ApiUser, wait_until

CREDENTIALS = {"username": "Carol", "password": "a long enough password"}


def assert_401(response: Any, reason: str | None = None) -> dict[str, Any]:
    assert response.status_code == 401, response.get_data(as_text=True)
    body = response.get_json()
    assert set(body) == {"error"} and body["error"]["code"] == "unauthorized", body
    assert response.headers["WWW-Authenticate"].startswith("Bearer")
    if reason is not None:
        assert body["error"]["details"]["reason"] == reason, body
    return body["error"]


def login(client: FlaskClient, username: str, password: str) -> dict[str, Any]:
    response = client.post("/api/auth/login", json={"username": username, "password": password})
    assert response.status_code == 200, response.get_json()
    return response.get_json()


def bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


def test_register_login_and_me(anon_client: FlaskClient, engine: Engine) -> None:
    response = anon_client.post("/api/auth/register", json=CREDENTIALS)
    assert response.status_code == 201, response.get_json()
    created = response.get_json()
    assert created["username"] == "carol" and created["role"] == "user"
    with engine.connect() as conn:
        stored = conn.scalar(select(User.password_hash).where(User.id == created["id"]))
    assert stored is not None and stored.startswith("$argon2id$") and CREDENTIALS["password"] not in stored

    tokens = login(anon_client, "CAROL", CREDENTIALS["password"])  # usernames ignore case
    assert set(tokens) == {"access_token", "refresh_token", "token_type", "expires_in"}
    me = anon_client.get("/api/auth/me", headers=bearer(tokens["access_token"]))
    assert me.status_code == 200
    assert me.get_json() | {"created_at": None, "quotas": None} == {
        "id": created["id"], "username": "carol", "role": "user", "created_at": None, "auth_method": "jwt",
        "quotas": None,
    }  # fmt: skip

    again = anon_client.post("/api/auth/register", json={**CREDENTIALS, "username": "carol"})
    assert again.status_code == 409 and again.get_json()["error"]["code"] == "conflict"


@pytest.mark.parametrize(
    ("body", "field"),
    [
        ({"username": "ab", "password": "long enough pw"}, "username"),
        ({"username": "has space", "password": "long enough pw"}, "username"),
        ({"username": "x" * 65, "password": "long enough pw"}, "username"),
        ({"username": "dave", "password": "short"}, "password"),
        ({"username": "dave", "password": "x" * 257}, "password"),
        ({"username": "davedave", "password": "DaveDave"}, "password"),
        ({"username": "dave"}, "password"),
        ({"username": "dave", "password": "long enough pw", "role": "admin"}, "role"),
    ],
)
def test_registration_validates_every_field(anon_client: FlaskClient, body: dict[str, Any], field: str) -> None:
    response = anon_client.post("/api/auth/register", json=body)
    assert response.status_code == 422, response.get_json()
    assert field in [e["field"] for e in response.get_json()["error"]["details"]["errors"]]


def test_wrong_password_and_unknown_user_get_the_same_answer(anon_client: FlaskClient, user: ApiUser) -> None:
    wrong = anon_client.post("/api/auth/login", json={"username": user.username, "password": "not the password"})
    unknown = anon_client.post("/api/auth/login", json={"username": "nobody", "password": "not the password"})
    assert assert_401(wrong, "invalid_credentials") == assert_401(unknown, "invalid_credentials")


def test_every_protected_endpoint_answers_401_without_credentials(anon_client: FlaskClient) -> None:
    job = uuid.uuid4()
    script = uuid.uuid4()
    calls = [
        (
            "post",
            "/api/custom-calculations/execute",
            {"script": "result = 1", "column_name": "c", "stock_symbols": ["A"]},
        ),
        ("get", f"/api/jobs/{job}", None),
        ("get", f"/api/jobs/{job}/results", None),
        ("post", f"/api/jobs/{job}/cancel", None),
        ("get", "/api/custom-calculations/scripts", None),
        ("post", "/api/custom-calculations/scripts", {"name": "n", "code": "result = 1"}),
        ("get", f"/api/custom-calculations/scripts/{script}", None),
        ("put", f"/api/custom-calculations/scripts/{script}", {"name": "m"}),
        ("delete", f"/api/custom-calculations/scripts/{script}", None),
        ("get", f"/api/custom-calculations/scripts/{script}/versions", None),
        ("get", "/api/auth/me", None),
        ("post", "/api/auth/logout", None),
        ("get", "/api/auth/api-keys", None),
        ("post", "/api/auth/api-keys", {"name": "k"}),
        ("get", "/api/audit-log", None),
    ]
    for method, path, body in calls:
        response = getattr(anon_client, method)(path, json=body)
        assert_401(response, "missing_credentials")
    assert anon_client.get("/api/health").status_code in (200, 503)  # public: the launcher polls it
    assert anon_client.get("/api/openapi.json").status_code == 200
    assert "bearer" in anon_client.get("/api/openapi.json").get_json()["components"]["securitySchemes"]


def _forged_tokens(flask_app: Flask, user: ApiUser) -> list[tuple[str, str]]:
    now = int(time.time())
    claims = {"sub": user.id, "jti": uuid.uuid4().hex, "type": "access", "iss": "alphaforge", "iat": now,
              "nbf": now, "exp": now + 600, "fam": "f"}  # fmt: skip
    other_key = jwt.encode(claims, "another-secret-that-is-long-enough-for-hs256", algorithm="HS256")
    wrong_issuer = jwt.encode({**claims, "iss": "someone-else"}, flask_app.config["JWT_SECRET_KEY"], algorithm="HS256")
    unsigned = jwt.encode(claims, "", algorithm="none")  # alg "none" takes an empty key
    tampered = user.access_token[:-4] + ("AAAA" if not user.access_token.endswith("AAAA") else "BBBB")
    return [
        ("Bearer", "malformed_header"),
        ("Bearer ", "malformed_header"),
        ("Basic dXNlcjpwYXNz", "malformed_header"),
        (f"Bearer {user.access_token} extra", "malformed_header"),
        ("Bearer not-a-jwt", "invalid_token"),
        ("Bearer a.b.c", "invalid_token"),
        (f"Bearer {other_key}", "invalid_token"),
        (f"Bearer {wrong_issuer}", "invalid_token"),
        (f"Bearer {unsigned}", "invalid_token"),
        (f"Bearer {tampered}", "invalid_token"),
        (f"Bearer {user.refresh_token}", "wrong_token_type"),
        ("Bearer afk_not-a-real-key", "invalid_api_key"),
    ]


def test_malformed_forged_and_misused_tokens_are_401(flask_app: Flask, anon_client: FlaskClient, user: ApiUser) -> None:
    for header, reason in _forged_tokens(flask_app, user):
        assert_401(anon_client.get("/api/auth/me", headers={"Authorization": header}), reason)
    assert anon_client.get("/api/auth/me", headers=user.headers).status_code == 200


def test_expired_token_is_401(settings: Settings, flask_app: Flask, anon_client: FlaskClient, user: ApiUser) -> None:
    with flask_app.app_context():
        expired = create_access_token(identity=user.id, expires_delta=dt.timedelta(seconds=-1))
    assert_401(anon_client.get("/api/auth/me", headers=bearer(expired)), "token_expired")

    short = create_app(settings.with_overrides(access_token_ttl_s=1))  # the configured lifetime, for real
    try:
        client = short.test_client()
        tokens = login(client, user.username, user.password)
        assert client.get("/api/auth/me", headers=bearer(tokens["access_token"])).status_code == 200
        # Refused once its one second is over (JWT times are whole seconds: within two seconds at most).
        wait_until(lambda: client.get("/api/auth/me", headers=bearer(tokens["access_token"])).status_code == 401,
                   10, "the access token to expire", poll_s=0.1)  # fmt: skip
        assert_401(client.get("/api/auth/me", headers=bearer(tokens["access_token"])), "token_expired")
    finally:
        short.extensions["alphaforge"].engine.dispose()


def test_logout_revokes_the_access_token_and_the_session_refresh_token(anon_client: FlaskClient, user: ApiUser) -> None:
    tokens = login(anon_client, user.username, user.password)
    assert anon_client.post("/api/auth/logout", headers=bearer(tokens["access_token"])).status_code == 204
    assert_401(anon_client.get("/api/auth/me", headers=bearer(tokens["access_token"])), "token_revoked")
    assert_401(anon_client.post("/api/auth/refresh", json={"refresh_token": tokens["refresh_token"]}), "token_revoked")
    # Another login session of the same user is untouched.
    assert anon_client.get("/api/auth/me", headers=user.headers).status_code == 200


def test_refresh_rotates_and_a_reused_refresh_token_ends_the_session(anon_client: FlaskClient, user: ApiUser) -> None:
    first = login(anon_client, user.username, user.password)
    second = anon_client.post("/api/auth/refresh", json={"refresh_token": first["refresh_token"]}).get_json()
    assert second["refresh_token"] != first["refresh_token"] and second["access_token"] != first["access_token"]
    assert anon_client.get("/api/auth/me", headers=bearer(second["access_token"])).status_code == 200

    # The first refresh token again (say, a stolen copy): refused, and the whole session is revoked.
    assert_401(anon_client.post("/api/auth/refresh", json={"refresh_token": first["refresh_token"]}), "token_revoked")
    assert_401(anon_client.get("/api/auth/me", headers=bearer(second["access_token"])), "token_revoked")
    assert_401(anon_client.post("/api/auth/refresh", json={"refresh_token": second["refresh_token"]}), "token_revoked")
    # An access token is not a refresh token.
    third = login(anon_client, user.username, user.password)
    assert_401(anon_client.post("/api/auth/refresh", json={"refresh_token": third["access_token"]}), "wrong_token_type")


def test_disabled_account_loses_access_at_once(client: FlaskClient, user: ApiUser, engine: Engine) -> None:
    assert client.get("/api/auth/me").status_code == 200
    with engine.begin() as conn:
        conn.execute(update(User).where(User.id == user.id).values(is_active=False))
    assert_401(client.get("/api/auth/me"), "account_disabled")
    assert_401(client.post("/api/auth/login", json={"username": user.username, "password": user.password}))


def test_api_keys_are_shown_once_stored_hashed_and_revocable(
    client: FlaskClient, other_client: FlaskClient, anon_client: FlaskClient, engine: Engine
) -> None:
    created = client.post("/api/auth/api-keys", json={"name": "nightly job"})
    assert created.status_code == 201, created.get_json()
    body = created.get_json()
    key = body["key"]
    assert key.startswith("afk_") and len(key) > 40 and body["prefix"] == key[:12]
    assert created.headers["Cache-Control"] == "no-store"
    with engine.connect() as conn:
        stored = conn.execute(select(ApiKey.key_sha256, ApiKey.prefix)).one()
    assert key not in stored.key_sha256 and len(stored.key_sha256) == 64

    listing = client.get("/api/auth/api-keys").get_json()["api_keys"]
    assert [k["id"] for k in listing] == [body["id"]] and "key" not in listing[0]
    assert key not in client.get("/api/auth/api-keys").get_data(as_text=True)

    me = anon_client.get("/api/auth/me", headers=bearer(key))
    assert me.status_code == 200 and me.get_json()["auth_method"] == "api_key"
    assert client.get("/api/auth/api-keys").get_json()["api_keys"][0]["last_used_at"] is not None
    # A key cannot mint or revoke keys (a leaked key must not make itself permanent).
    assert anon_client.post("/api/auth/api-keys", json={"name": "x"}, headers=bearer(key)).status_code == 403
    # Nobody else can see or revoke it.
    assert other_client.get("/api/auth/api-keys").get_json()["api_keys"] == []
    assert other_client.delete(f"/api/auth/api-keys/{body['id']}").status_code == 404

    assert client.delete(f"/api/auth/api-keys/{body['id']}").status_code == 204
    assert_401(anon_client.get("/api/auth/me", headers=bearer(key)), "invalid_api_key")
    assert client.get("/api/auth/api-keys").get_json()["api_keys"][0]["revoked_at"] is not None
    assert client.delete(f"/api/auth/api-keys/{uuid.uuid4()}").status_code == 404
    assert client.delete("/api/auth/api-keys/not-a-uuid").status_code == 404


def test_expired_api_key_is_refused(client: FlaskClient, anon_client: FlaskClient, engine: Engine) -> None:
    key = client.post("/api/auth/api-keys", json={"name": "short", "expires_in_days": 1}).get_json()["key"]
    assert anon_client.get("/api/auth/me", headers=bearer(key)).status_code == 200
    with engine.begin() as conn:
        conn.execute(update(ApiKey).values(expires_at=dt.datetime.now(dt.UTC) - dt.timedelta(seconds=1)))
    assert_401(anon_client.get("/api/auth/me", headers=bearer(key)), "invalid_api_key")


def test_logout_with_an_api_key_is_a_clear_400(client: FlaskClient, anon_client: FlaskClient) -> None:
    key = client.post("/api/auth/api-keys", json={"name": "k"}).get_json()["key"]
    response = anon_client.post("/api/auth/logout", headers=bearer(key))
    assert response.status_code == 400 and "revoke" in response.get_json()["error"]["message"]


def test_registration_can_be_closed(settings: Settings, api_state: Engine) -> None:
    closed = create_app(settings.with_overrides(registration_open=False))
    try:
        response = closed.test_client().post("/api/auth/register", json=CREDENTIALS)
        assert response.status_code == 403 and response.get_json()["error"]["code"] == "forbidden"
    finally:
        closed.extensions["alphaforge"].engine.dispose()


def test_operator_cli_creates_an_admin(settings: Settings, anon_client: FlaskClient) -> None:
    env = {**os.environ, "DATABASE_URL": settings.require_database_url()}
    cmd = [sys.executable, "-m", "shared.ops.cli", "user", "create", "--admin", "Operator"]
    done = subprocess.run(cmd, cwd=PROJECT_ROOT, env=env, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    password = done.stdout.split("password: ", 1)[1].split()[0]
    tokens = login(anon_client, "operator", password)
    me = anon_client.get("/api/auth/me", headers=bearer(tokens["access_token"])).get_json()
    assert me["username"] == "operator" and me["role"] == "admin"

    again = subprocess.run(cmd, cwd=PROJECT_ROOT, env=env, capture_output=True, text=True, timeout=60)
    assert again.returncode == 1 and "taken" in again.stderr

    chosen = subprocess.run(
        [sys.executable, "-m", "shared.ops.cli", "user", "create", "plainuser", "--password-stdin"],
        cwd=PROJECT_ROOT, env=env, input="chosen password 123\n", capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert chosen.returncode == 0, chosen.stderr
    assert "password:" not in chosen.stdout
    assert login(anon_client, "plainuser", "chosen password 123")["access_token"]


def test_api_refuses_to_start_without_a_jwt_secret(settings: Settings) -> None:
    from shared.errors import ConfigError

    for secret in (None, "", "too-short"):
        with pytest.raises(ConfigError, match="JWT_SECRET_KEY"):
            create_app(settings.with_overrides(jwt_secret_key=secret))
