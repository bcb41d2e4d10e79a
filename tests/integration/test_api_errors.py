"""Bad input: a 4xx in one JSON shape naming the field and the problem; never a 500, never a half-written job."""

from __future__ import annotations

import uuid
from typing import Any

import pytest
from flask.testing import FlaskClient
from sqlalchemy import Engine, func, select
from sqlalchemy.orm import Session, sessionmaker

from api import create_app
from shared.accounts import api_keys
from shared.infra.config import Settings
from shared.infra.db import session_scope
from shared.infra.models import Job, JobShard
from shared.ops.embedded import free_tcp_port
from tests.helpers import ApiUser, authed_client

GOOD = {"script": "result = close[-1]", "column_name": "last", "stock_symbols": ["AAPL", "MSFT"]}


def job_count(engine: Engine) -> tuple[int, int]:
    with engine.connect() as conn:
        return conn.scalar(select(func.count()).select_from(Job)) or 0, conn.scalar(
            select(func.count()).select_from(JobShard)
        ) or 0


def assert_error(response: Any, status: int, code: str, field: str | None = None) -> dict[str, Any]:
    assert response.status_code == status, response.get_data(as_text=True)
    body = response.json
    assert set(body) == {"error"} and set(body["error"]) == {"code", "message", "details"}
    assert body["error"]["code"] == code, body
    if field is not None:
        fields = [e["field"] for e in body["error"]["details"]["errors"]]
        assert field in fields, body
        assert field in body["error"]["message"]
    return body["error"]


@pytest.mark.parametrize(
    ("change", "field", "fragment"),
    [
        ({"script": None}, "script", "string"),
        ({"script": ""}, "script", "empty"),
        ({"script": "   \n  "}, "script", "empty"),
        ({"column_name": ""}, "column_name", "empty"),
        ({"column_name": "x" * 101}, "column_name", "100"),
        ({"stock_symbols": "AAPL"}, "stock_symbols", "list"),
        ({"stock_symbols": []}, "stock_symbols", "at least 1"),
        ({"stock_symbols": ["AAPL", "bad symbol"]}, "stock_symbols[1]", "invalid symbol"),
        ({"stock_symbols": ["AAPL", 42]}, "stock_symbols[1]", "string"),
        ({"stock_symbols": ["AAPL", ""]}, "stock_symbols[1]", "empty"),
        ({"start_date": "2024-13-01"}, "start_date", "date"),
        ({"start_date": "01/02/2024"}, "start_date", "YYYY-MM-DD"),
        ({"end_date": 20240101}, "end_date", "YYYY-MM-DD"),
        ({"start_date": "2024-02-01", "end_date": "2024-01-01"}, "body", "start_date must not be after end_date"),
        ({"params": [1, 2]}, "params", "dictionary"),
        ({"params": {"x": "y" * 20000}}, "params", "params larger"),
        ({"unexpected": 1}, "unexpected", "Extra inputs"),
        ({"column_name": "c\x00"}, "column_name", "NUL"),
        ({"column_name": "tab\there"}, "column_name", "printable"),
        ({"params": {"k": "a\x00b"}}, "params.k", "NUL"),
        ({"params": {"k\x00": 1}}, "params.k\x00", "NUL"),
        ({"params": {"k": ["ok", "\ud800"]}}, "params.k[1]", "surrogate"),
        ({"script": "result = 1  # \ud800"}, "script", "surrogate"),
        ({"stock_symbols": ["A\x00"]}, "stock_symbols[0]", "NUL"),
        ({"params": {"a": [[[[[[[[[[[1]]]]]]]]]]]}}, "params", "nested deeper than 10"),
    ],
)
def test_invalid_fields_are_422_naming_the_field(
    client: FlaskClient, engine: Engine, change: dict[str, Any], field: str, fragment: str
) -> None:
    body = {**GOOD, **change}
    error = assert_error(client.post("/api/custom-calculations/execute", json=body), 422, "validation_error", field)
    assert fragment.lower() in str(error).lower()
    assert job_count(engine) == (0, 0)


def test_missing_script_is_named(client: FlaskClient) -> None:
    body = {k: v for k, v in GOOD.items() if k != "script"}
    error = assert_error(client.post("/api/custom-calculations/execute", json=body), 422, "validation_error", "script")
    assert "required" in error["message"].lower()


def test_script_over_the_size_limit(client: FlaskClient, engine: Engine, settings: Settings) -> None:
    body = {**GOOD, "script": "x = 1\n" * (settings.max_script_chars // 6 + 1)}
    error = assert_error(client.post("/api/custom-calculations/execute", json=body), 422, "validation_error", "script")
    assert f"{settings.max_script_chars:,}" in error["message"]
    assert job_count(engine) == (0, 0)


def test_too_many_symbols(client: FlaskClient, engine: Engine, settings: Settings) -> None:
    symbols = [f"S{i}" for i in range(settings.max_symbols_per_job + 1)]
    response = client.post("/api/custom-calculations/execute", json={**GOOD, "stock_symbols": symbols})
    error = assert_error(response, 422, "validation_error", "stock_symbols")
    assert "5,001" in error["message"]
    assert job_count(engine) == (0, 0)


@pytest.mark.parametrize(
    ("script", "line", "fragment"),
    [
        ("x = 1\ny = (\n", 2, "SyntaxError"),
        ("x = 1\n\nresult = x +* 2", 3, "SyntaxError"),
        ("import os\nresult = os._exit", 2, '"_exit" is an invalid attribute name'),
        ("result = 1\n__import__('os')", 2, "__import__"),
        ("def f():\n    pass\nx = f.__globals__", 3, "__globals__"),
    ],
)
def test_script_compile_errors_name_the_line(
    client: FlaskClient, engine: Engine, script: str, line: int, fragment: str
) -> None:
    response = client.post("/api/custom-calculations/execute", json={**GOOD, "script": script})
    error = assert_error(response, 422, "script_compile_error", "script")
    assert error["details"]["errors"][0]["line"] == line
    assert f"line {line}" in error["message"] and fragment in error["message"]
    assert job_count(engine) == (0, 0)


def test_malformed_json_is_400(client: FlaskClient, engine: Engine) -> None:
    response = client.post(
        "/api/custom-calculations/execute", data='{"script": "x", ', headers={"Content-Type": "application/json"}
    )
    assert_error(response, 400, "invalid_json")
    assert job_count(engine) == (0, 0)


@pytest.mark.parametrize(
    ("raw", "fragment"),
    [
        ("[" * 100_000 + "]" * 100_000, "nested too deeply"),
        ('{"script": "result = 1", "column_name": "c", "stock_symbols": ["A"], "params": {"x": NaN}}', "NaN"),
        ('{"params": {"x": Infinity}}', "Infinity"),
        ('{"params": {"x": ' + "9" * 5000 + "}}", "integer"),
        (b"\xff\xfe{}".decode("latin-1"), "not valid JSON"),
    ],
)
def test_unparseable_bodies_are_400(client: FlaskClient, engine: Engine, raw: str, fragment: str) -> None:
    response = client.post("/api/custom-calculations/execute", data=raw, content_type="application/json")
    error = assert_error(response, 400, "invalid_json")
    assert fragment in error["message"]
    assert job_count(engine) == (0, 0)


def test_overflowing_numbers_in_params_are_422(client: FlaskClient, engine: Engine) -> None:
    raw = '{"script": "result = 1", "column_name": "c", "stock_symbols": ["A"], "params": {"big": 1e999}}'
    response = client.post("/api/custom-calculations/execute", data=raw, content_type="application/json")
    error = assert_error(response, 422, "validation_error", "params")
    assert "params.big: numbers must be finite" in error["message"]
    assert job_count(engine) == (0, 0)


@pytest.mark.parametrize("raw", ['"a string"', "null", "42", "[1, 2]"])
def test_json_that_is_not_an_object_is_422(client: FlaskClient, raw: str) -> None:
    response = client.post("/api/custom-calculations/execute", data=raw, content_type="application/json")
    assert_error(response, 422, "validation_error", "body")


def test_non_json_body_is_415(client: FlaskClient) -> None:
    response = client.post("/api/custom-calculations/execute", data="script=x", content_type="text/plain")
    assert_error(response, 415, "unsupported_media_type")


def test_oversized_body_is_413(client: FlaskClient, settings: Settings) -> None:
    response = client.post(
        "/api/custom-calculations/execute",
        data=b'{"script": "' + b"x" * settings.max_request_bytes + b'"}',
        content_type="application/json",
    )
    assert_error(response, 413, "request_entity_too_large")


@pytest.mark.parametrize("job_id", ["0b5e7c8a-3d2f-4a61-9c4e-7f1d2b3a4c5d", "not-a-uuid", "1"])
def test_unknown_job_is_404(client: FlaskClient, job_id: str) -> None:
    for path in (f"/api/jobs/{job_id}", f"/api/jobs/{job_id}/results"):
        assert_error(client.get(path), 404, "not_found")
    assert_error(client.post(f"/api/jobs/{job_id}/cancel"), 404, "not_found")


def test_unknown_route_and_method_use_the_error_shape(client: FlaskClient) -> None:
    assert_error(client.get("/api/nope"), 404, "not_found")
    assert_error(client.get("/api/custom-calculations/execute"), 405, "method_not_allowed")


def test_results_paging_parameters_are_validated(client: FlaskClient) -> None:
    # Parameters are checked before the job is looked up.
    job_id = str(uuid.uuid4())
    assert_error(client.get(f"/api/jobs/{job_id}/results?limit=0"), 422, "validation_error", "limit")
    assert_error(client.get(f"/api/jobs/{job_id}/results?limit=abc"), 422, "validation_error", "limit")
    assert_error(client.get(f"/api/jobs/{job_id}/results?limit=1001"), 422, "validation_error", "limit")
    assert_error(client.get(f"/api/jobs/{job_id}/results?cursor=%%%"), 422, "validation_error", "cursor")


def test_unreachable_broker_fails_the_job_instead_of_leaving_it_queued(
    clean_db: Engine, settings: Settings, session_factory: sessionmaker[Session], user: ApiUser
) -> None:
    broken = settings.with_overrides(redis_url=f"redis://127.0.0.1:{free_tcp_port()}/0", enqueue_timeout_s=1.0)
    app = create_app(broken)
    # An API key: checking it needs only PostgreSQL (a JWT's revocation check would need the dead Redis).
    with session_scope(session_factory) as session:
        _, key = api_keys.create_api_key(session, user.id, "broker test")
    headers = {"Authorization": f"Bearer {key}"}
    try:
        response = app.test_client().post("/api/custom-calculations/execute", json=GOOD, headers=headers)
        error = assert_error(response, 503, "service_unavailable")
        with clean_db.connect() as conn:
            job = conn.execute(select(Job.id, Job.status, Job.error)).one()
            shard_statuses = set(conn.scalars(select(JobShard.status)))
        assert str(job.id) == error["details"]["job_id"]
        assert job.status == "failed" and "could not be queued" in job.error
        assert shard_statuses == {"failed"}
        assert app.test_client().get(f"/api/jobs/{job.id}", headers=headers).get_json()["status"] == "failed"
    finally:
        app.extensions["alphaforge"].engine.dispose()


def test_unreachable_database_is_503_not_500(settings: Settings, user: ApiUser) -> None:
    port = free_tcp_port()
    broken = settings.with_overrides(database_url=f"postgresql://postgres@127.0.0.1:{port}/nowhere")
    app = create_app(broken)
    try:
        client = authed_client(app, user)  # checking the token needs the database: 503, not 401
        assert_error(client.get(f"/api/jobs/{uuid.uuid4()}"), 503, "service_unavailable")
        assert_error(client.post("/api/custom-calculations/execute", json=GOOD), 503, "service_unavailable")
        health = client.get("/api/health")
        assert health.status_code == 503
        assert health.get_json()["database"]["ok"] is False and health.get_json()["status"] == "unavailable"
    finally:
        app.extensions["alphaforge"].engine.dispose()
