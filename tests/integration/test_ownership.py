"""Two users, each trying every read, update, delete and execute on the other's script and job: all 404,
exactly as for ids that do not exist. Admins may read everything, and change nothing that is not theirs."""

from __future__ import annotations

import uuid
from typing import Any

import pytest
from flask.testing import FlaskClient
from sqlalchemy import Engine, select

from shared.infra.models import Job, Script
from tests.helpers import ApiUser, seed_bars, wait_for_job

pytestmark = pytest.mark.usefixtures("celery_worker")

SCRIPTS = "/api/custom-calculations/scripts"
EXECUTE = "/api/custom-calculations/execute"


def own_resources(client: FlaskClient, name: str) -> tuple[str, str]:
    """A saved script and a finished job run from it, owned by the client's user."""
    script = client.post(SCRIPTS, json={"name": name, "code": "result = close[-1]"})
    assert script.status_code == 201, script.get_json()
    script_id = script.get_json()["script_id"]
    job = client.post(EXECUTE, json={"script_id": script_id, "column_name": "c", "stock_symbols": ["OWN1"]})
    assert job.status_code == 202, job.get_json()
    job_id = job.get_json()["job_id"]
    assert wait_for_job(client, job_id)["status"] == "succeeded"
    return script_id, job_id


def attempts(script_id: str, job_id: str) -> list[tuple[str, str, dict[str, Any] | None]]:
    return [
        ("get", f"{SCRIPTS}/{script_id}", None),
        ("get", f"{SCRIPTS}/{script_id}/versions", None),
        ("get", f"{SCRIPTS}/{script_id}/versions/1", None),
        ("put", f"{SCRIPTS}/{script_id}", {"name": "stolen"}),
        ("put", f"{SCRIPTS}/{script_id}", {"code": "result = 0"}),
        ("delete", f"{SCRIPTS}/{script_id}", None),
        ("post", EXECUTE, {"script_id": script_id, "column_name": "c", "stock_symbols": ["OWN1"]}),
        ("post", EXECUTE, {"script_id": script_id, "version": 1, "column_name": "c", "stock_symbols": ["OWN1"]}),
        ("get", f"/api/jobs/{job_id}", None),
        ("get", f"/api/jobs/{job_id}/results", None),
        ("post", f"/api/jobs/{job_id}/cancel", None),
    ]


def answer(client: FlaskClient, method: str, path: str, body: dict[str, Any] | None) -> tuple[int, dict[str, Any]]:
    response = getattr(client, method)(path, json=body)
    return response.status_code, response.get_json()


def test_each_user_gets_404_for_everything_of_the_other(
    client: FlaskClient, other_client: FlaskClient, engine: Engine, user: ApiUser, other_user: ApiUser
) -> None:
    seed_bars(engine, ["OWN1"], days=10)
    mine = own_resources(client, "mine")
    theirs = own_resources(other_client, "theirs")

    for actor, victim in ((client, theirs), (other_client, mine)):
        for method, path, body in attempts(*victim):
            status, error = answer(actor, method, path, body)
            assert status == 404, (method, path, error)
            assert error["error"]["code"] == "not_found", (method, path, error)
            # Indistinguishable from an id that does not exist at all:
            ghost = path.replace(victim[0], str(uuid.uuid4())).replace(victim[1], str(uuid.uuid4()))
            ghost_body = {k: (str(uuid.uuid4()) if v == victim[0] else v) for k, v in body.items()} if body else body
            ghost_status, ghost_error = answer(actor, method, ghost, ghost_body)
            assert ghost_status == 404
            assert set(ghost_error["error"]) == set(error["error"])
            assert ghost_error["error"]["message"].split(" ")[0] == error["error"]["message"].split(" ")[0]

    # Nothing changed hands, nothing was renamed, deleted, cancelled or run.
    with engine.connect() as conn:
        scripts = {row.name: row.owner_id for row in conn.execute(select(Script.name, Script.owner_id))}
        jobs = list(conn.execute(select(Job.owner_id, Job.status)).all())
    assert scripts == {"mine": user.id, "theirs": other_user.id}
    assert sorted(jobs) == sorted([(user.id, "succeeded"), (other_user.id, "succeeded")])
    # Listings show only one's own.
    assert [s["name"] for s in client.get(SCRIPTS).get_json()["scripts"]] == ["mine"]
    assert [s["name"] for s in other_client.get(SCRIPTS).get_json()["scripts"]] == ["theirs"]
    assert client.get(f"{SCRIPTS}?owner_id={other_user.id}").status_code == 403


def test_admin_reads_everything_but_changes_nothing_of_others(
    client: FlaskClient, admin_client: FlaskClient, engine: Engine, user: ApiUser
) -> None:
    seed_bars(engine, ["OWN1"], days=10)
    script_id, job_id = own_resources(client, "mine")

    assert admin_client.get(f"{SCRIPTS}/{script_id}").get_json()["owner_id"] == user.id
    assert admin_client.get(f"{SCRIPTS}/{script_id}/versions").status_code == 200
    assert admin_client.get(f"/api/jobs/{job_id}").get_json()["owner_id"] == user.id
    assert admin_client.get(f"/api/jobs/{job_id}/results").status_code == 200
    listed = admin_client.get(f"{SCRIPTS}?owner_id={user.id}").get_json()["scripts"]
    assert [s["script_id"] for s in listed] == [script_id]
    assert admin_client.get(SCRIPTS).get_json()["scripts"] == []  # by default, the admin's own

    for method, path, body in attempts(script_id, job_id):
        if method == "get":
            continue
        status, error = answer(admin_client, method, path, body)
        assert status == 403 and error["error"]["code"] == "forbidden", (method, path, error)
    assert client.get(f"{SCRIPTS}/{script_id}").get_json()["name"] == "mine"
