"""Interactive runs through the API and a real worker: ``/api/custom-calculations/try``, ``/api/security/execute``
(every seed field and its bounds), ``/api/security/limits`` and ``/api/security/health``."""

from __future__ import annotations

from typing import Any

import pytest
from flask import Flask
from flask.testing import FlaskClient
from sqlalchemy import Engine, func, select

from shared.infra.models import Job, SecurityEvent
from tests.helpers import seed_bars, wait_for_job

pytestmark = pytest.mark.usefixtures("celery_worker")

SEED_FIELDS = {"success", "stdout", "stderr", "error_type", "error_message", "execution_time", "memory_used_mb"}


def execute(client: FlaskClient, **body: Any) -> dict[str, Any]:
    response = client.post("/api/security/execute", json=body)
    assert response.status_code == 200, response.json
    return response.json  # type: ignore[return-value]


def test_try_answers_the_value_what_was_printed_time_and_memory(client: FlaskClient, engine: Engine) -> None:
    bars = seed_bars(engine, ["TRY1"], days=40)
    last = bars["TRY1"][-1]["close"]
    response = client.post("/api/custom-calculations/try", json={
        "script": "import ta\nprint('bars:', len(close))\nresult = ta.sma(close, 5)[-1] * 0 + close[-1]",
        "symbol": "try1",
    })  # fmt: skip
    assert response.status_code == 200, response.json
    answer = response.json
    assert answer is not None and answer["symbol"] == "TRY1" and answer["error"] is None
    assert answer["value"] == pytest.approx(last) and answer["output"] == "bars: 40\n"
    assert answer["output_truncated"] is False and answer["execution_time"] > 0 and answer["memory_used_mb"] >= 0
    job = wait_for_job(client, answer["job_id"])  # it is a job too, with its one result
    assert job["status"] == "succeeded"


def test_try_answers_the_error_with_its_line_and_bounded_output(client: FlaskClient, engine: Engine) -> None:
    seed_bars(engine, ["TRY2"], days=10)
    answer = client.post("/api/custom-calculations/try", json={
        "script": "print('x' * 50000)\nx = 1\nresult = close[-1] / 0", "symbol": "TRY2",
    }).json  # fmt: skip
    assert answer is not None and answer["value"] is None
    assert answer["error"] == {"type": "ZeroDivisionError", "message": "float division by zero", "line": 3}
    assert len(answer["output"]) == 10_000 and answer["output_truncated"] and answer["output_dropped"] > 40_000
    compile_error = client.post("/api/custom-calculations/try", json={"script": "x = (", "symbol": "TRY2"}).json
    assert compile_error is not None and compile_error["error"]["type"] == "CompileError"
    assert compile_error["error"]["line"] == 1 and compile_error["job_id"] is None
    unknown = client.post("/api/custom-calculations/try", json={"script": "result = 1", "symbol": "NOPE"}).json
    assert unknown is not None and unknown["error"]["type"] == "UnknownSymbol"


def test_execute_answers_every_seed_field(client: FlaskClient) -> None:
    answer = execute(client, code="import math\nx = math.sqrt(16)\nprint('root', x)\nname = 'a'", return_locals=True)
    assert set(answer) >= SEED_FIELDS
    assert answer["success"] is True and answer["stdout"] == "root 4.0\n" and answer["stderr"] == ""
    assert answer["error_type"] is None and answer["error_message"] is None
    assert answer["execution_time"] > 0 and answer["memory_used_mb"] >= 0
    assert answer["locals"] == {"x": 4.0, "name": "a"}
    assert "locals" not in execute(client, code="x = 1")  # only when asked

    failed = execute(client, code="print('before')\nraise ValueError('boom')")
    assert failed["success"] is False and failed["stdout"] == "before\n"
    assert failed["error_type"] == "ValueError" and failed["error_message"] == "boom"
    assert failed["stderr"] == "line 2: ValueError: boom\n"
    addresses = execute(client, code="f = lambda: 0\nprint(repr(f))\ng = f", return_locals=True)
    assert "0x…" in addresses["stdout"] and "0x…" in addresses["locals"]["g"]["repr"]


def test_execute_enforces_its_timeout_and_memory(client: FlaskClient) -> None:
    slow = execute(client, code="while True:\n    pass", timeout=1)
    assert slow["success"] is False and slow["error_type"] == "TimeoutError" and "1 s" in slow["error_message"]
    big = execute(client, code="x = 'a' * (300 * 2**20)", max_memory_mb=64)
    assert big["success"] is False and big["error_type"] == "MemoryError"
    roomy = execute(client, code="x = 'a' * (100 * 2**20)\nprint(len(x))", max_memory_mb=512)
    assert roomy["success"] is True and roomy["memory_used_mb"] >= 90


def test_execute_refuses_what_the_policy_refuses_and_records_it(client: FlaskClient, engine: Engine) -> None:
    answer = execute(client, code="import os")
    assert answer["success"] is False and answer["error_type"] == "SecurityViolation"
    with engine.connect() as conn:
        assert (conn.scalar(select(func.count()).select_from(SecurityEvent)) or 0) >= 1


@pytest.mark.parametrize(
    ("path", "body", "field"),
    [
        ("/api/security/execute", {"code": "x = 1", "timeout": 0}, "timeout"),
        ("/api/security/execute", {"code": "x = 1", "timeout": 301}, "timeout"),
        ("/api/security/execute", {"code": "x = 1", "max_memory_mb": 63}, "max_memory_mb"),
        ("/api/security/execute", {"code": "x = 1", "max_memory_mb": 2049}, "max_memory_mb"),
        ("/api/security/execute", {"code": "x = 1", "return_locals": "yes"}, "return_locals"),
        ("/api/security/execute", {"code": "   "}, "code"),
        ("/api/security/execute", {"code": "x = 1", "extra": 1}, "extra"),
        ("/api/custom-calculations/try", {"script": "result = 1", "symbol": "AA", "timeout": 1000}, "timeout"),
        ("/api/custom-calculations/try", {"script": "result = 1", "symbol": "AA", "memory_mb": 1}, "memory_mb"),
        ("/api/custom-calculations/try", {"script": "result = 1"}, "symbol"),
    ],
)
def test_limits_outside_the_bounds_are_a_422_naming_the_field(
    client: FlaskClient, engine: Engine, path: str, body: dict[str, Any], field: str
) -> None:
    response = client.post(path, json=body)
    assert response.status_code == 422, response.json
    assert field in str(response.json)
    with engine.connect() as conn:
        assert conn.scalar(select(func.count()).select_from(Job)) == 0  # nothing written


def test_interactive_runs_need_authentication(flask_app: Flask) -> None:
    anonymous = flask_app.test_client()
    for path in ("/api/security/execute", "/api/custom-calculations/try"):
        assert anonymous.post(path, json={"code": "x = 1"}).status_code == 401
    assert anonymous.get("/api/security/limits").status_code == 401


def test_limits_and_health_describe_the_sandbox(client: FlaskClient) -> None:
    limits = client.get("/api/security/limits").json
    assert limits is not None
    assert limits["timeout"] == {"min": 1.0, "max": 300.0, "default": 30.0}
    assert limits["max_memory_mb"] == {"min": 64.0, "max": 2048.0, "default": 512.0}
    assert limits["output_chars_per_symbol"] == 10_000
    health = client.get("/api/security/health")
    assert health.status_code == 200 and health.json is not None
    assert health.json["status"] == "ok" and health.json["workers"]
    for record in health.json["workers"].values():
        assert set(record["layers"]) == {"network_namespace", "no_new_privs", "unprivileged_uid", "seccomp"}
