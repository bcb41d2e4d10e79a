"""Saved scripts end to end: CRUD, versions, validation, running by script_id (real worker), deletion."""

from __future__ import annotations

import datetime as dt
import urllib.parse
import uuid
from typing import Any

import pytest
from flask.testing import FlaskClient
from sqlalchemy import Engine, func, select

from shared.infra.config import Settings
from shared.infra.models import Job, JobResult, Script, ScriptVersion, SecurityEvent
from tests.helpers import all_results, seed_bars, wait_for_job

SCRIPTS = "/api/custom-calculations/scripts"
LAST_CLOSE = "result = close[-1]"


def create(client: FlaskClient, **body: Any) -> dict[str, Any]:
    response = client.post(SCRIPTS, json={"name": "last close", "code": LAST_CLOSE, **body})
    assert response.status_code == 201, response.get_json()
    assert response.headers["Location"] == f"{SCRIPTS}/{response.get_json()['script_id']}"
    return response.get_json()


def error_of(response: Any, status: int, code: str) -> dict[str, Any]:
    assert response.status_code == status, response.get_data(as_text=True)
    body = response.get_json()
    assert set(body) == {"error"} and body["error"]["code"] == code, body
    return body["error"]


def test_crud_cycle_with_versions(client: FlaskClient, user: Any, engine: Engine) -> None:
    created = create(client, description="the last close", nightly=True, universe=["aapl", "MSFT", "AAPL"])
    script_id = created["script_id"]
    assert created["version"] == 1 and created["owner_id"] == user.id
    assert created["universe"] == ["AAPL", "MSFT"] and created["nightly"] is True
    assert created["created_at"] == created["updated_at"]

    got = client.get(f"{SCRIPTS}/{script_id}").get_json()
    assert got == created

    # Metadata-only change: no new version.
    renamed = client.put(f"{SCRIPTS}/{script_id}", json={"name": "close", "description": "d"}).get_json()
    assert renamed["name"] == "close" and renamed["version"] == 1 and renamed["updated_at"] > created["updated_at"]

    v2 = client.put(f"{SCRIPTS}/{script_id}", json={"code": "result = close[-1] * 2"}).get_json()
    v3 = client.put(f"{SCRIPTS}/{script_id}", json={"code": "result = close[-1] * 3", "expected_version": 2})
    assert v2["version"] == 2 and v3.get_json()["version"] == 3
    assert v3.get_json()["code"] == "result = close[-1] * 3"
    # Same code again: nothing changes.
    same = client.put(f"{SCRIPTS}/{script_id}", json={"code": "result = close[-1] * 3"}).get_json()
    assert same["version"] == 3 and same["updated_at"] == v3.get_json()["updated_at"]
    # A stale editor is told, not silently overwritten.
    stale = client.put(f"{SCRIPTS}/{script_id}", json={"code": "result = 0", "expected_version": 2})
    assert error_of(stale, 409, "conflict")["details"]["version"] == 3

    versions = client.get(f"{SCRIPTS}/{script_id}/versions").get_json()
    assert [v["version"] for v in versions["versions"]] == [3, 2, 1] and versions["next_cursor"] is None
    assert versions["versions"][2]["code"] == LAST_CLOSE
    paged = client.get(f"{SCRIPTS}/{script_id}/versions?limit=2").get_json()
    assert [v["version"] for v in paged["versions"]] == [3, 2]
    rest = client.get(f"{SCRIPTS}/{script_id}/versions?limit=2&cursor={paged['next_cursor']}").get_json()
    assert [v["version"] for v in rest["versions"]] == [1] and rest["next_cursor"] is None
    assert client.get(f"{SCRIPTS}/{script_id}/versions/1").get_json()["code"] == LAST_CLOSE
    error_of(client.get(f"{SCRIPTS}/{script_id}/versions/9"), 404, "not_found")

    assert client.delete(f"{SCRIPTS}/{script_id}").status_code == 204
    error_of(client.get(f"{SCRIPTS}/{script_id}"), 404, "not_found")
    error_of(client.delete(f"{SCRIPTS}/{script_id}"), 404, "not_found")
    with engine.connect() as conn:
        assert conn.scalar(select(func.count()).select_from(ScriptVersion)) == 0
        assert conn.scalar(select(func.count()).select_from(Script)) == 0


def test_list_pages_and_filters(client: FlaskClient, other_client: FlaskClient) -> None:
    names = ["alpha", "alpine", "beta", "gamma", "alps_%"]
    ids = {name: create(client, name=name)["script_id"] for name in names}
    create(other_client, name="alpha")  # same name, other user: allowed, and never listed for alice

    page1 = client.get(f"{SCRIPTS}?limit=2").get_json()
    page2 = client.get(f"{SCRIPTS}?limit=2&cursor={page1['next_cursor']}").get_json()
    page3 = client.get(f"{SCRIPTS}?limit=2&cursor={page2['next_cursor']}").get_json()
    listed = [s["name"] for p in (page1, page2, page3) for s in p["scripts"]]
    assert listed == sorted(names) and page3["next_cursor"] is None
    assert "code" not in page1["scripts"][0]

    prefixed = client.get(f"{SCRIPTS}?name_prefix=alp").get_json()["scripts"]
    assert [s["name"] for s in prefixed] == ["alpha", "alpine", "alps_%"]
    literal = client.get(f"{SCRIPTS}?name_prefix={urllib.parse.quote('alps_%')}").get_json()["scripts"]
    assert [s["name"] for s in literal] == ["alps_%"]  # % and _ are not wildcards

    cut = client.get(f"{SCRIPTS}/{ids['beta']}").get_json()["updated_at"]
    client.put(f"{SCRIPTS}/{ids['gamma']}", json={"description": "touched"})
    since = client.get(f"{SCRIPTS}?updated_since={urllib.parse.quote(cut)}").get_json()["scripts"]
    assert {s["name"] for s in since} >= {"gamma"} and "alpha" not in {s["name"] for s in since}
    future = (dt.datetime.now(dt.UTC) + dt.timedelta(days=1)).isoformat()
    assert client.get(f"{SCRIPTS}?updated_since={urllib.parse.quote(future)}").get_json()["scripts"] == []


@pytest.mark.parametrize(
    ("query", "field"),
    [
        ("limit=0", "limit"),
        ("limit=201", "limit"),
        ("limit=abc", "limit"),
        ("cursor=%25%25%25", "cursor"),
        ("cursor=WzFd", "cursor"),  # valid base64 JSON of the wrong shape
        ("updated_since=yesterday", "updated_since"),
        ("updated_since=2026-01-01T00:00:00", "updated_since"),  # no time zone
        ("bogus=1", "bogus"),
    ],
)
def test_bad_list_parameters_are_422(client: FlaskClient, query: str, field: str) -> None:
    error = error_of(client.get(f"{SCRIPTS}?{query}"), 422, "validation_error")
    assert field in [e["field"] for e in error["details"]["errors"]]


@pytest.mark.parametrize(
    ("body", "status", "code", "field"),
    [
        ({"code": "x = (\n"}, 422, "script_compile_error", "code"),
        ({"code": "import os\nresult = os._exit"}, 422, "script_compile_error", "code"),
        ({"code": ""}, 422, "validation_error", "code"),
        ({"name": ""}, 422, "validation_error", "name"),
        ({"name": "   "}, 422, "validation_error", "name"),
        ({"name": "n" * 101}, 422, "validation_error", "name"),
        ({"description": "d" * 2001}, 422, "validation_error", "description"),
        ({"universe": ["bad symbol"]}, 422, "validation_error", "universe[0]"),
        ({"nightly": True}, 422, "validation_error", "universe"),
        ({"owner_id": "someone"}, 422, "validation_error", "owner_id"),
    ],
)
def test_invalid_scripts_are_refused_and_nothing_is_saved(
    client: FlaskClient, engine: Engine, body: dict[str, Any], status: int, code: str, field: str
) -> None:
    response = client.post(SCRIPTS, json={"name": "s", "code": LAST_CLOSE, **body})
    error = error_of(response, status, code)
    assert field in [e["field"] for e in error["details"]["errors"]], error
    with engine.connect() as conn:
        assert conn.scalar(select(func.count()).select_from(Script)) == 0


def test_compile_error_names_the_line_on_create_and_update(client: FlaskClient) -> None:
    error = error_of(client.post(SCRIPTS, json={"name": "s", "code": "x = 1\ny = 2\nz = (\n"}), 422,
                     "script_compile_error")  # fmt: skip
    assert error["details"]["errors"][0]["line"] == 3 and "line 3" in error["message"]
    script_id = create(client)["script_id"]
    error = error_of(client.put(f"{SCRIPTS}/{script_id}", json={"code": "a = 1\nb = ().__class__"}), 422,
                     "script_compile_error")  # fmt: skip
    assert error["details"]["errors"][0]["line"] == 2
    assert client.get(f"{SCRIPTS}/{script_id}").get_json()["version"] == 1  # nothing changed


def test_oversized_code_is_refused(client: FlaskClient, settings: Settings) -> None:
    code = "x = 1\n" * (settings.max_script_chars // 6 + 1)
    error = error_of(client.post(SCRIPTS, json={"name": "big", "code": code}), 422, "validation_error")
    assert f"{settings.max_script_chars:,}" in error["message"]
    huge = "x" * (settings.max_request_bytes + 10)
    error_of(client.post(SCRIPTS, json={"name": "huge", "code": huge}), 413, "request_entity_too_large")


def test_duplicate_name_is_409_on_create_and_rename(client: FlaskClient) -> None:
    create(client, name="one")
    second = create(client, name="two")
    assert error_of(client.post(SCRIPTS, json={"name": "one", "code": LAST_CLOSE}), 409, "conflict")
    error = error_of(client.put(f"{SCRIPTS}/{second['script_id']}", json={"name": "one"}), 409, "conflict")
    assert "one" in error["message"]
    assert client.get(f"{SCRIPTS}/{second['script_id']}").get_json()["name"] == "two"


def test_update_needs_a_change_and_unknown_ids_are_404(client: FlaskClient) -> None:
    script_id = create(client)["script_id"]
    error_of(client.put(f"{SCRIPTS}/{script_id}", json={}), 422, "validation_error")
    error_of(client.put(f"{SCRIPTS}/{script_id}", json={"nightly": True}), 422, "validation_error")  # no universe
    for bad in (str(uuid.uuid4()), "not-a-uuid"):
        error_of(client.get(f"{SCRIPTS}/{bad}"), 404, "not_found")
        error_of(client.put(f"{SCRIPTS}/{bad}", json={"name": "x"}), 404, "not_found")
        error_of(client.delete(f"{SCRIPTS}/{bad}"), 404, "not_found")
        error_of(client.get(f"{SCRIPTS}/{bad}/versions"), 404, "not_found")


EXECUTE = "/api/custom-calculations/execute"


@pytest.mark.parametrize(
    ("extra", "field"),
    [
        ({"script": LAST_CLOSE, "script_id": "SCRIPT"}, "script_id"),
        ({}, "script"),
        ({"script": LAST_CLOSE, "version": 1}, "version"),
        ({"script_id": "SCRIPT", "version": 0}, "version"),
    ],
)
def test_execute_needs_exactly_one_of_script_and_script_id(
    client: FlaskClient, engine: Engine, extra: dict[str, Any], field: str
) -> None:
    script_id = create(client)["script_id"]
    body = {"column_name": "c", "stock_symbols": ["A"]}
    body.update({k: (script_id if v == "SCRIPT" else v) for k, v in extra.items()})
    error = error_of(client.post(EXECUTE, json=body), 422, "validation_error")
    assert field in [e["field"] for e in error["details"]["errors"]]
    with engine.connect() as conn:
        assert conn.scalar(select(func.count()).select_from(Job)) == 0


def test_execute_unknown_script_or_version_is_404(client: FlaskClient) -> None:
    script_id = create(client)["script_id"]
    body = {"column_name": "c", "stock_symbols": ["A"]}
    error_of(client.post(EXECUTE, json={**body, "script_id": str(uuid.uuid4())}), 404, "not_found")
    error_of(client.post(EXECUTE, json={**body, "script_id": "nope"}), 404, "not_found")
    error_of(client.post(EXECUTE, json={**body, "script_id": script_id, "version": 2}), 404, "not_found")


@pytest.mark.usefixtures("celery_worker")
def test_jobs_record_the_version_they_ran_and_outlive_the_script(client: FlaskClient, engine: Engine) -> None:
    bars = seed_bars(engine, ["AAA", "BBB"], days=30)
    script_id = create(client, code="result = close[-1]")["script_id"]
    body = {"column_name": "c", "stock_symbols": ["AAA", "BBB"], "script_id": script_id}

    first = client.post(EXECUTE, json=body)
    assert first.status_code == 202, first.get_json()
    client.put(f"{SCRIPTS}/{script_id}", json={"code": "result = close[-1] * 2"})
    second = client.post(EXECUTE, json=body)  # latest: version 2
    pinned = client.post(EXECUTE, json={**body, "version": 1})  # an explicit older version

    jobs = {name: wait_for_job(client, r.get_json()["job_id"]) for name, r in
            (("first", first), ("second", second), ("pinned", pinned))}  # fmt: skip
    assert {name: job["status"] for name, job in jobs.items()} == dict.fromkeys(jobs, "succeeded")
    assert jobs["first"]["script"] == {"script_id": script_id, "version": 1}
    assert jobs["second"]["script"] == {"script_id": script_id, "version": 2}
    assert jobs["pinned"]["script"] == {"script_id": script_id, "version": 1}
    last = {s: bars[s][-1]["close"] for s in ("AAA", "BBB")}
    values = {name: {r["symbol"]: r["value"] for r in all_results(client, job["job_id"])} for name, job in jobs.items()}
    assert values["first"] == pytest.approx(last) and values["pinned"] == pytest.approx(last)
    assert values["second"] == pytest.approx({s: 2 * v for s, v in last.items()})
    with engine.connect() as conn:
        rows = conn.execute(select(Job.script_version, Job.script).where(Job.script_id == script_id)).all()
    texts = {row.script_version: row.script for row in rows}
    assert texts == {1: "result = close[-1]", 2: "result = close[-1] * 2"}

    # Deleting the script keeps the jobs, their record of what ran, and their results.
    assert client.delete(f"{SCRIPTS}/{script_id}").status_code == 204
    for job in jobs.values():
        after = client.get(f"/api/jobs/{job['job_id']}").get_json()
        assert after["script"] == job["script"] and after["status"] == "succeeded"
        assert len(all_results(client, job["job_id"])) == 2
    with engine.connect() as conn:
        assert conn.scalar(select(func.count()).select_from(JobResult)) == 6
    error_of(client.post(EXECUTE, json=body), 404, "not_found")


def test_a_policy_refusal_on_save_is_a_security_event_and_a_syntax_error_is_not(
    client: FlaskClient, user: Any, engine: Engine
) -> None:
    error_of(client.post(SCRIPTS, json={"name": "typo", "code": "x = (\n"}), 422, "script_compile_error")
    error_of(client.post(SCRIPTS, json={"name": "evil", "code": "x = ().__class__"}), 422, "script_compile_error")
    script_id = create(client)["script_id"]
    error_of(client.put(f"{SCRIPTS}/{script_id}", json={"code": "g = (i for i in [1])\nx = g.gi_frame"}), 422,
             "script_compile_error")  # fmt: skip
    with engine.connect() as conn:
        events = conn.execute(select(SecurityEvent.owner_id, SecurityEvent.layer, SecurityEvent.reason,
                                     SecurityEvent.detail).order_by(SecurityEvent.id)).all()  # fmt: skip
    assert [(e.owner_id, e.layer, e.reason) for e in events] == [(user.id, "language", "compile_policy")] * 2
    assert "__class__" in events[0].detail and "gi_frame" in events[1].detail
