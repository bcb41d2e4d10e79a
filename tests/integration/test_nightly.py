"""Nightly recalculation end to end: flagged scripts run as their owners' jobs on the bulk queue, a second tick
while a run is going starts nothing, finished jobs' values land in script_latest_values and the Redis cache."""

from __future__ import annotations

import time
import uuid
from collections.abc import Iterator
from typing import Any

import pytest
import redis
from celery import Celery
from flask.testing import FlaskClient
from sqlalchemy import Engine, delete, func, select
from sqlalchemy.orm import Session, sessionmaker

from shared.contract import TASK_NIGHTLY_RUN, create_celery, shard_enqueuer
from shared.infra.config import QUEUE_BULK, Settings
from shared.infra.models import Job, JobResult, NightlyRun, NightlyRunJob
from shared.jobs import nightly
from tests.helpers import FINAL, ApiUser, seed_bars

pytestmark = pytest.mark.usefixtures("celery_worker")

SLOW = "s = 0\nfor i in range(300000):\n    s += i\nresult = close[-1] / close[0]"


@pytest.fixture
def celery_app(settings: Settings) -> Iterator[Celery]:
    app = create_celery(settings)
    yield app
    app.close()


@pytest.fixture
def cache(settings: Settings) -> Iterator[redis.Redis]:
    client = redis.Redis.from_url(settings.require_redis_url())
    yield client
    client.close()


def save_script(client: FlaskClient, name: str, code: str, *, nightly_flag: bool, universe: list[str]) -> str:
    body = {"name": name, "code": code, "nightly": nightly_flag, "universe": universe}
    response = client.post("/api/custom-calculations/scripts", json=body)
    assert response.status_code == 201, response.json
    return str(response.json["script_id"])  # type: ignore[index]


def run_jobs(factory: sessionmaker[Session], run_id: str) -> list[Job]:
    with factory() as session:
        return list(session.scalars(select(Job).where(Job.id.in_(
            select(NightlyRunJob.job_id).where(NightlyRunJob.run_id == uuid.UUID(run_id))
        ))))  # fmt: skip


def wait_run_finished(factory: sessionmaker[Session], cache: redis.Redis, run_id: str) -> NightlyRun:
    deadline = time.monotonic() + 90
    while True:
        nightly.harvest(factory, cache)
        with factory() as session:
            run = session.get(NightlyRun, uuid.UUID(run_id))
            assert run is not None
            if run.status == "finished":
                return run
        assert time.monotonic() < deadline, "nightly run did not finish"
        time.sleep(0.1)


def test_nightly_run_latest_values_and_no_second_run_while_one_is_going(
    client: FlaskClient,
    admin_client: FlaskClient,
    other_client: FlaskClient,
    user: ApiUser,
    engine: Engine,
    session_factory: sessionmaker[Session],
    celery_app: Celery,
    cache: redis.Redis,
    settings: Settings,
) -> None:
    universe = [f"N{i:02d}" for i in range(12)]
    bars = seed_bars(engine, universe, days=20)
    ratio_id = save_script(client, "ratio", SLOW, nightly_flag=True, universe=universe)
    last_id = save_script(client, "last", "result = close[-1]", nightly_flag=True, universe=[*universe[:3], "NOPE"])
    save_script(client, "not-nightly", "result = 1", nightly_flag=False, universe=universe)

    assert client.post("/api/nightly-runs").status_code == 403  # operators only
    started = admin_client.post("/api/nightly-runs")
    assert started.status_code == 202, started.json
    run_id = started.json["run_id"]  # type: ignore[index]
    assert started.json["jobs"] == 2 and started.json["errors"] == []  # type: ignore[index]

    # While it runs, neither an operator nor a beat tick (through the real worker) starts another run.
    again = admin_client.post("/api/nightly-runs")
    assert again.status_code == 409 and again.json["error"]["details"]["running_run_id"] == run_id  # type: ignore[index]
    worker_tick = celery_app.send_task(TASK_NIGHTLY_RUN, ignore_result=False)
    tick = nightly.start_run(session_factory, trigger="schedule", enqueue=shard_enqueuer(celery_app, queue=QUEUE_BULK),
                             shard_size=settings.shard_size)  # fmt: skip
    assert tick.run_id is None and str(tick.running_id) == run_id
    # The tick through the worker has run (its result says so) and started nothing.
    assert worker_tick.get(timeout=90) == {"run_id": None, "running_id": run_id, "jobs": 0, "errors": []}

    jobs = run_jobs(session_factory, run_id)
    assert {(j.owner_id, j.queue, str(j.script_id), j.script_version) for j in jobs} == {
        (user.id, QUEUE_BULK, ratio_id, 1), (user.id, QUEUE_BULK, last_id, 1)
    }  # fmt: skip
    run = wait_run_finished(session_factory, cache, run_id)
    assert (run.trigger, run.scripts, run.jobs) == ("manual", 2, 2) and run.finished_at is not None
    with session_factory() as session:
        assert session.scalar(select(func.count()).select_from(NightlyRun)) == 1  # the ticks started nothing
        assert all(j.status in FINAL for j in session.scalars(select(Job)))

    first = client.get(f"/api/custom-calculations/scripts/{ratio_id}/latest")
    assert first.status_code == 200 and first.json["cached"] is False  # type: ignore[index]
    values: list[dict[str, Any]] = first.json["values"]  # type: ignore[index]
    assert [v["symbol"] for v in values] == universe
    for v in values:
        closes = [b["close"] for b in bars[v["symbol"]]]
        assert v["value"] == pytest.approx(closes[-1] / closes[0], rel=1e-12) and v["error"] is None
        assert v["script_version"] == 1
    second = client.get(f"/api/custom-calculations/scripts/{ratio_id}/latest")
    assert second.json == {**first.json, "cached": True}  # type: ignore[dict-item]
    assert admin_client.get(f"/api/custom-calculations/scripts/{ratio_id}/latest").status_code == 200
    assert other_client.get(f"/api/custom-calculations/scripts/{ratio_id}/latest").status_code == 404
    last = {v["symbol"]: v for v in client.get(f"/api/custom-calculations/scripts/{last_id}/latest").json["values"]}  # type: ignore[index]
    assert last["NOPE"]["error"]["type"] == "UnknownSymbol" and last["N00"]["value"] == bars["N00"][-1]["close"]

    # The next run starts, and a newer result replaces the cached one.
    changed = client.put(f"/api/custom-calculations/scripts/{last_id}", json={"code": "result = close[0]"})
    assert changed.status_code == 200, changed.json
    with engine.begin() as conn:
        conn.execute(delete(JobResult))  # results of finished nightly jobs are not needed any more
    next_run = admin_client.post("/api/nightly-runs")
    assert next_run.status_code == 202
    wait_run_finished(session_factory, cache, next_run.json["run_id"])  # type: ignore[index]
    refreshed = client.get(f"/api/custom-calculations/scripts/{last_id}/latest").json
    assert refreshed["cached"] is False  # type: ignore[index]
    new = {v["symbol"]: v for v in refreshed["values"]}  # type: ignore[index]
    assert new["N00"]["value"] == bars["N00"][0]["close"] and new["N00"]["script_version"] == 2
