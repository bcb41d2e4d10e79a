"""The audit log (a row per audited action, with the request id) and request ids from the client, through
the API's JSON logs, into the Celery task headers and every log line of the worker that ran the task."""

from __future__ import annotations

import io
import json
import logging
import time
import uuid
from pathlib import Path
from typing import Any

import pytest
from flask.testing import FlaskClient
from sqlalchemy import Engine, select

from shared.infra.config import Settings
from shared.infra.logs import ContextFilter, json_formatter
from shared.infra.models import AuditLog, JobShard
from tests.helpers import ApiUser, seed_bars, wait_for_job

SCRIPTS = "/api/custom-calculations/scripts"
EXECUTE = "/api/custom-calculations/execute"


def rid() -> str:
    return f"test-{uuid.uuid4().hex}"


def audit_rows(engine: Engine) -> list[AuditLog]:
    with engine.connect() as conn:
        return list(conn.execute(select(AuditLog).order_by(AuditLog.id)).all())  # type: ignore[arg-type]


@pytest.mark.usefixtures("celery_worker")
def test_every_audited_action_writes_a_row_with_its_request_id(anon_client: FlaskClient, engine: Engine) -> None:
    seed_bars(engine, ["AUD1"], days=5)
    sent: dict[str, str] = {}

    def call(action: str, method: str, path: str, *, token: str | None = None, **kwargs: Any) -> Any:
        sent[action] = rid()
        headers = {"X-Request-ID": sent[action]} | ({"Authorization": f"Bearer {token}"} if token else {})
        response = getattr(anon_client, method)(path, headers=headers, **kwargs)
        assert response.headers["X-Request-ID"] == sent[action]
        return response

    assert call("auth.register", "post", "/api/auth/register",
                json={"username": "erin", "password": "erin's password"}).status_code == 201  # fmt: skip
    assert call("auth.login_failed", "post", "/api/auth/login",
                json={"username": "erin", "password": "wrong"}).status_code == 401  # fmt: skip
    tokens = call("auth.login", "post", "/api/auth/login", json={"username": "erin", "password": "erin's password"})
    token = tokens.get_json()["access_token"]
    key = call("api_key.create", "post", "/api/auth/api-keys", token=token, json={"name": "k"}).get_json()
    assert call("api_key.revoke", "delete", f"/api/auth/api-keys/{key['id']}", token=token).status_code == 204
    script = call("script.create", "post", SCRIPTS, token=token, json={"name": "s", "code": "result = 1"}).get_json()
    call("script.update", "put", f"{SCRIPTS}/{script['script_id']}", token=token, json={"code": "result = 2"})
    submission = {"script_id": script["script_id"], "column_name": "c", "stock_symbols": ["AUD1"]}
    job = call("job.submit", "post", EXECUTE, token=token, json=submission).get_json()
    call("job.cancel", "post", f"/api/jobs/{job['job_id']}/cancel", token=token)
    assert call("script.delete", "delete", f"{SCRIPTS}/{script['script_id']}", token=token).status_code == 204
    assert call("auth.logout", "post", "/api/auth/logout", token=token).status_code == 204

    rows = audit_rows(engine)
    by_action = {row.action: row for row in rows}
    assert [row.action for row in rows] == list(sent)
    erin = by_action["auth.register"].resource_id
    for action, request_id in sent.items():
        row = by_action[action]
        assert row.request_id == request_id, action
        assert row.actor_username == "erin" and row.client_address == "127.0.0.1", action
        assert row.actor_id == (None if action == "auth.login_failed" else erin), action
    assert (by_action["script.update"].resource_type, by_action["script.update"].resource_id) == (
        "script", script["script_id"]
    )  # fmt: skip
    assert by_action["script.update"].details == {"changed": ["code"], "version": 2}
    assert by_action["job.submit"].resource_id == job["job_id"]
    assert by_action["job.submit"].details["script_version"] == 2
    assert by_action["api_key.create"].resource_id == key["id"]
    assert key["key"] not in json.dumps([row.details for row in rows])  # the secret is never logged


def test_audit_log_endpoint_shows_own_entries_and_admins_see_all(
    client: FlaskClient, other_client: FlaskClient, admin_client: FlaskClient, user: ApiUser, other_user: ApiUser
) -> None:
    client.post(SCRIPTS, json={"name": "a", "code": "result = 1"})
    other_client.post(SCRIPTS, json={"name": "b", "code": "result = 1"})
    mine = client.get("/api/audit-log").get_json()["entries"]
    assert [(e["action"], e["actor_id"]) for e in mine] == [("script.create", user.id)]
    assert client.get(f"/api/audit-log?actor_id={other_user.id}").status_code == 403
    everyone = admin_client.get("/api/audit-log").get_json()["entries"]
    assert {e["actor_id"] for e in everyone} == {user.id, other_user.id}
    only_bob = admin_client.get(f"/api/audit-log?actor_id={other_user.id}").get_json()["entries"]
    assert [e["actor_id"] for e in only_bob] == [other_user.id]
    page = admin_client.get("/api/audit-log?limit=1").get_json()
    rest = admin_client.get(f"/api/audit-log?limit=1&cursor={page['next_cursor']}").get_json()
    assert [e["id"] for e in page["entries"] + rest["entries"]] == [e["id"] for e in everyone]
    assert client.get("/api/audit-log?cursor=abc").status_code == 422


@pytest.mark.parametrize(
    ("sent", "kept"),
    [
        ("client-id-12345678", True),
        ("a" * 128, True),
        ("short", False),
        ("a" * 129, False),
        ("has spaces in it", False),
        ("bad\u00e9chars-123456", False),
        ("", False),
    ],
)
def test_request_id_is_taken_when_well_formed_else_generated(anon_client: FlaskClient, sent: str, kept: bool) -> None:
    headers = {"X-Request-ID": sent.encode("utf-8").decode("latin-1")} if sent else {}
    for path in ("/api/openapi.json", "/api/auth/me"):  # public and protected (a 401) alike
        response = anon_client.get(path, headers=headers)
        echoed = response.headers["X-Request-ID"]
        if kept:
            assert echoed == sent
        else:
            assert echoed != sent and len(echoed) == 32 and int(echoed, 16) >= 0


def test_api_log_lines_are_json_with_the_request_id_and_user(client: FlaskClient, user: ApiUser) -> None:
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.setFormatter(json_formatter("api"))
    handler.addFilter(ContextFilter())
    access = logging.getLogger("alphaforge.access")
    access.addHandler(handler)
    old_level = access.level
    access.setLevel(logging.INFO)
    try:
        request_id = rid()
        assert client.get("/api/auth/me", headers={"X-Request-ID": request_id}).status_code == 200
    finally:
        access.removeHandler(handler)
        access.setLevel(old_level)
    lines = [json.loads(line) for line in stream.getvalue().splitlines()]
    assert len(lines) == 1
    line = lines[0]
    assert line["request_id"] == request_id and line["user_id"] == user.id and line["service"] == "api"
    assert (line["method"], line["path"], line["status"]) == ("GET", "/api/auth/me", 200)
    assert line["level"] == "INFO" and line["logger"] == "alphaforge.access" and "time" in line


def _worker_lines(settings: Settings) -> list[dict[str, Any]]:
    lines: list[dict[str, Any]] = []
    for path in sorted(Path(settings.data_dir).glob("*worker*.log")):
        for raw in path.read_text(errors="replace").splitlines():
            if raw.startswith("{"):
                try:
                    lines.append(json.loads(raw))
                except ValueError:
                    continue
    return lines


@pytest.mark.usefixtures("celery_worker")
def test_request_id_reaches_the_worker_and_every_log_line_of_its_tasks(
    client: FlaskClient, engine: Engine, settings: Settings
) -> None:
    symbols = [f"TR{i:03d}" for i in range(60)]  # two shards: two tasks
    seed_bars(engine, symbols, days=5)
    request_id = rid()
    response = client.post(
        EXECUTE,
        json={"script": "result = close[-1]", "column_name": "c", "stock_symbols": symbols},
        headers={"X-Request-ID": request_id},
    )
    assert response.status_code == 202 and response.headers["X-Request-ID"] == request_id
    job_id = response.get_json()["job_id"]
    assert wait_for_job(client, job_id)["status"] == "succeeded"
    with engine.connect() as conn:
        task_ids = set(conn.scalars(select(JobShard.task_id).where(JobShard.job_id == job_id)))
    assert len(task_ids) == 2

    deadline = time.monotonic() + 10
    while True:  # the worker's log is written by another process: give it a moment
        ours = [line for line in _worker_lines(settings) if line.get("task_id") in task_ids]
        if {line.get("logger") for line in ours} >= {"worker.tasks", "celery.app.trace"} or time.monotonic() > deadline:
            break
        time.sleep(0.05)
    assert ours, "no worker log line names the job's tasks"
    assert {line["task_id"] for line in ours} == task_ids
    assert all(line.get("request_id") == request_id for line in ours), ours
    assert {line.get("logger") for line in ours} >= {"worker.tasks", "celery.app.trace"}  # ours and Celery's own
    assert any(line.get("shard_id") is not None for line in ours)
    assert all(line.get("service") == "celery" for line in ours)
