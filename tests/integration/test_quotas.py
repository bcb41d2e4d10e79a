"""Sandbox CPU quotas through the API and a real worker: what the supervisor measured is counted in PostgreSQL, a
submission past the budget is a 429 naming it, and a job that runs out mid-way stops its remaining shards."""

from __future__ import annotations

import pytest
from flask import Flask
from flask.testing import FlaskClient
from sqlalchemy import Engine, func, insert, select

from shared.accounts import quotas
from shared.contract import shard_enqueuer
from shared.infra.config import Settings
from shared.infra.models import ComputeUsage, Job
from shared.jobs.calculations import CalculationRequest, submit_calculation
from tests.helpers import ApiUser, all_results, seed_bars, wait_for_job, wait_until
from tests.integration.test_calculation_jobs import submit

pytestmark = pytest.mark.usefixtures("celery_worker")

BUSY = "s = 0\nfor i in range(30000):\n    s += i\nresult = close[-1]"


def spend(engine: Engine, user: ApiUser, cpu_s: float, budget: str = quotas.BUDGET_INTERACTIVE) -> None:
    """The user has already used ``cpu_s`` of the budget today (as earlier shards would have recorded)."""
    with engine.begin() as conn:
        conn.execute(insert(ComputeUsage).values(owner_id=user.id, day=quotas.today(), budget=budget, cpu_s=cpu_s))


def used(engine: Engine, user: ApiUser, budget: str = quotas.BUDGET_INTERACTIVE) -> float:
    with engine.connect() as conn:
        value = conn.scalar(select(ComputeUsage.cpu_s).where(ComputeUsage.owner_id == user.id,
                                                             ComputeUsage.budget == budget))  # fmt: skip
    return float(value or 0.0)


def test_the_measured_cpu_is_counted_and_shown(client: FlaskClient, user: ApiUser, engine: Engine) -> None:
    seed_bars(engine, ["QA", "QB"], days=50)
    job = wait_for_job(client, submit(client, script=BUSY, column_name="q", stock_symbols=["QA", "QB"])["job_id"])
    assert job["status"] == "succeeded"

    def job_cpu_s() -> float:
        with engine.connect() as conn:
            return float(conn.scalar(select(Job.sandbox_cpu_s).where(Job.id == job["job_id"])) or 0.0)

    job_cpu = wait_until(job_cpu_s, 30, "the job's CPU charged (right after its results)")
    assert used(engine, user) == pytest.approx(job_cpu)
    view = client.get(f"/api/jobs/{job['job_id']}").json
    assert view is not None and view["compute"]["cpu_s"] == pytest.approx(job_cpu, abs=1e-3)
    assert view["compute"]["budget"] == "interactive" and view["compute"]["owner_today"]["used_s"] > 0
    me = client.get("/api/auth/me").json
    assert me is not None and me["quotas"]["interactive"]["used_s"] == pytest.approx(job_cpu, abs=1e-3)
    assert me["quotas"]["interactive"]["left_s"] == pytest.approx(36_000 - job_cpu, abs=1e-2)
    assert me["quotas"]["nightly"]["used_s"] == 0


def test_a_submission_past_the_budget_is_a_429_naming_it(
    client: FlaskClient, user: ApiUser, engine: Engine, settings: Settings
) -> None:
    spend(engine, user, settings.quotas.interactive_cpu_s)
    for path, body in (
        ("/api/custom-calculations/execute", {"script": "result = 1", "column_name": "c", "stock_symbols": ["AA"]}),
        ("/api/custom-calculations/try", {"script": "result = 1", "symbol": "AA"}),
        ("/api/security/execute", {"code": "x = 1"}),
    ):
        response = client.post(path, json=body)
        assert response.status_code == 429, (path, response.json)
        error = response.json["error"]  # type: ignore[index]
        assert error["code"] == "quota_exceeded" and "'interactive'" in error["message"]
        assert error["details"]["budget"] == "interactive" and int(response.headers["Retry-After"]) > 0
    with engine.connect() as conn:
        assert conn.scalar(select(func.count()).select_from(Job)) == 0  # nothing written
    me = client.get("/api/auth/me").json
    assert me is not None and me["quotas"]["interactive"]["left_s"] == 0


def test_a_job_that_runs_out_mid_way_stops_its_remaining_shards(
    flask_app: Flask, client: FlaskClient, user: ApiUser, engine: Engine, settings: Settings
) -> None:
    symbols = [f"QM{i:02d}" for i in range(12)]
    seed_bars(engine, symbols, days=50)
    spend(engine, user, settings.quotas.interactive_cpu_s - 1e-6)  # any shard's CPU uses up the rest
    services = flask_app.extensions["alphaforge"]
    request = CalculationRequest(script=BUSY, column_name="m", symbols=symbols, owner_id=user.id)
    job = submit_calculation(services.session_factory, request, shard_size=1, enqueue=shard_enqueuer(services.celery))
    final = wait_for_job(client, str(job.id), timeout_s=120)
    results = {r["symbol"]: r for r in all_results(client, str(job.id))}
    stopped = [r for r in results.values() if r["error"] and r["error"]["type"] == "QuotaExceeded"]
    ran = [r for r in results.values() if r["error"] is None]
    assert final["status"] == "partial" and len(results) == 12
    assert 1 <= len(ran) <= settings.worker_concurrency  # the shards already running when it ran out finish
    assert len(stopped) == 12 - len(ran)
    assert all("'interactive'" in r["error"]["message"] and "resets at 00:00 UTC" in r["error"]["message"]
               for r in stopped)  # fmt: skip


def test_nightly_work_has_a_budget_of_its_own(client: FlaskClient, user: ApiUser, engine: Engine,
                                              settings: Settings) -> None:  # fmt: skip
    spend(engine, user, settings.quotas.nightly_cpu_s, budget=quotas.BUDGET_NIGHTLY)
    seed_bars(engine, ["QN"], days=20)
    job = wait_for_job(client, submit(client, script="result = 1", column_name="n", stock_symbols=["QN"])["job_id"])
    assert job["status"] == "succeeded"  # the day's screening is not charged to the night
