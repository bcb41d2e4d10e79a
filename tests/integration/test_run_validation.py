"""Validation inside backtest runs, end to end: API -> job with validation tasks -> real Celery workers -> result,
against shared.domain.robustness called directly in this process on the same bars."""

from __future__ import annotations

import json
import os
import secrets
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from typing import Any

import numpy as np
import pytest
from flask import Flask
from flask.testing import FlaskClient
from sqlalchemy import Engine, select, update
from sqlalchemy.orm import Session, sessionmaker

from api import create_app
from shared.contract import TASK_RUN_BACKTEST_SHARD, create_celery, shard_enqueuer
from shared.domain import robustness as v
from shared.domain.backtest import BacktestConfig
from shared.infra.config import Settings
from shared.infra.models import BacktestRun, Job, JobShard, RunValidationPart
from shared.jobs.backtests import shard as run_shards
from shared.jobs.backtests import submit as runs
from shared.jobs.reconciler import reconcile
from shared.marketdata.bars import load_bars
from tests.conftest import PROJECT_ROOT, _stop_process_group
from tests.helpers import FINAL, ApiUser, authed_client, seed_bars

RUNS = "/api/runs"
SYMBOLS = ["VAL0", "VAL1", "VAL2", "VAL3"]
VALIDATION = {
    "permutation": {"n": 12},
    "bootstrap": {"n": 60, "block": 10},
    "monte_carlo": {"n": 10, "fee_bps_sigma": 8, "slippage_bps_sigma": 4},
    "walk_forward": {"in_sample": 120, "out_of_sample": 40, "fast": [3, 5, 10], "slow": [20, 30]},
    "chunk": 5,
}


def body_for(symbols: list[str], validation: Any = VALIDATION, **changes: Any) -> dict[str, Any]:
    body: dict[str, Any] = {
        "symbols": symbols,
        "strategy": {"name": "dual_sma", "params": {"fast": 5, "slow": 20}},
        "execution": {"fee_bps": 5, "slippage_bps": 2},
        "seed": 42,
    }
    if validation is not None:
        body["validation"] = validation
    return body | changes


def wait_for(client: FlaskClient, run_id: str, timeout_s: float = 240) -> dict[str, Any]:
    deadline = time.monotonic() + timeout_s
    while True:
        body: dict[str, Any] = client.get(f"{RUNS}/{run_id}").get_json()
        if body["status"] in FINAL:
            return body
        assert time.monotonic() < deadline, f"run {run_id} not final: {body['progress']}"
        time.sleep(0.2)


def in_process(engine: Engine, body: dict[str, Any]) -> dict[str, Any]:
    """shared.domain.robustness called directly here, on the bars of the same database: JSON as the API returns it."""
    config = BacktestConfig.model_validate({k: x for k, x in body.items() if k != "validation"})
    spec = v.ValidationSpec.model_validate(body["validation"])
    with engine.connect() as conn:
        loaded = load_bars(conn, config.symbols, config.start_date, config.end_date)
    result = v.validate_in_process({s: run_shards.engine_bars(b) for s, b in loaded.items()}, config, spec)
    return dict(json.loads(json.dumps(result, allow_nan=False)))


def run_result(result: dict[str, Any]) -> dict[str, Any]:
    """The API's result without what only a stored run knows (failed tasks and their errors)."""
    return {**result, "methods": {m: {k: x for k, x in block.items() if k not in ("tasks_failed", "errors")}
                                  for m, block in result["methods"].items()}}  # fmt: skip


def test_run_with_all_four_validations(client: FlaskClient, user: ApiUser, engine: Engine, celery_worker: Any) -> None:
    seed_bars(engine, SYMBOLS, days=260, seed=5)
    body = body_for(SYMBOLS)
    response = client.post(RUNS, json=body)
    assert response.status_code == 202, response.get_json()
    accepted = response.get_json()
    run_id = accepted["run_id"]
    planned = v.plan(v.ValidationSpec.model_validate(VALIDATION), len(SYMBOLS))
    assert accepted["shards"] == len(planned) + 1  # the validation tasks, then one shard of 4 symbols
    config = BacktestConfig.model_validate({k: x for k, x in body.items() if k != "validation"})
    assert accepted["config_hash"] != config.config_hash  # the validation is part of what the run is

    view = wait_for(client, run_id)
    assert view["status"] == "succeeded", view
    progress = view["progress"]
    assert progress["percent"] == 100.0 and progress["symbols_done"] == 4
    assert progress["validation"]["tasks_total"] == len(planned) == progress["validation"]["tasks_done"]
    assert progress["validation"]["work_total"] == sum(t.work for t in planned) == progress["validation"]["work_done"]
    validation = view["validation"]
    assert validation["seed"] == 42 and validation["spec"]["permutation"] == {"n": 12}
    result = validation["result"]
    assert run_result(result) == in_process(engine, body)  # the distributed numbers are the direct ones
    methods = result["methods"]
    assert set(methods) == {"permutation", "bootstrap", "monte_carlo", "walk_forward"}
    for block in methods.values():
        assert block["complete"] and block["tasks_failed"] == 0 and block["seed"] == 42 and "method" in block
    assert methods["permutation"]["draws"] == 12 and 0 < methods["permutation"]["p_value"] <= 1
    assert methods["permutation"]["observed_sharpe"] == pytest.approx(view["portfolio"]["sharpe"], rel=1e-12)
    assert methods["monte_carlo"]["baseline_final_equity"] == pytest.approx(view["portfolio"]["final_equity"],
                                                                            rel=1e-12)  # fmt: skip
    assert methods["monte_carlo"]["mean_final_equity"] < methods["monte_carlo"]["baseline_final_equity"]
    assert set(methods["walk_forward"]["symbols"]) == set(SYMBOLS)

    # validation.json is an artifact in the manifest, with the same result.
    deadline = time.monotonic() + 60
    while (listing := client.get(f"{RUNS}/{run_id}/artifacts")).get_json().get("status") != "ready":
        assert time.monotonic() < deadline, listing.get_json()
        time.sleep(0.2)
    assert "validation.json" in json.dumps(listing.get_json())
    artifact = client.get(f"{RUNS}/{run_id}/artifacts/validation.json")
    assert artifact.status_code == 200
    doc = json.loads(artifact.get_data())
    assert doc["methods"] == result["methods"] and doc["spec"] == validation["spec"]
    assert client.get(f"{RUNS}/{run_id}/manifest/verify").get_json()["ok"] is True

    # Events say which shards were validation tasks.
    events = client.get(f"/api/runs/{run_id}/events?limit=1000").get_json()["events"]
    started = [e["data"]["validation"] for e in events if e["type"] == "shard_started" and "validation" in e["data"]]
    finished = [e for e in events if e["type"] == "shard_finished" and "validation" in e["data"]]
    assert sorted((t["method"], t["task_index"]) for t in started) == sorted((t.method, t.task_index)
                                                                             for t in planned)  # fmt: skip
    assert len(finished) == len(planned)
    assert all(e["data"]["task"] == e["data"]["validation"] for e in events if "validation" in e["data"])

    # Idempotent: the same config and validation is the same run; another validation is another run.
    again = client.post(RUNS, json=dict(reversed(list(body.items()))))
    assert again.status_code == 200 and again.get_json()["run_id"] == run_id
    other = client.post(RUNS, json=body_for(SYMBOLS, validation={"permutation": {"n": 10}}))
    assert other.status_code == 202 and other.get_json()["run_id"] != run_id
    client.post(f"{RUNS}/{other.get_json()['run_id']}/cancel")
    # No method enabled is no validation: the plain config's run (and hash).
    plain = client.post(RUNS, json=body_for(SYMBOLS, validation={"chunk": 7}))
    assert plain.status_code == 202 and plain.get_json()["config_hash"] == config.config_hash
    assert client.post(RUNS, json=body_for(SYMBOLS, validation=None)).get_json()["run_id"] == plain.get_json()["run_id"]


# --- 1 vs 2 worker processes ------------------------------------------------------------------------------------


def _start_worker(settings: Settings, concurrency: int, queue: str) -> subprocess.Popen[bytes]:
    log_path = settings.data_dir / f"validation-worker-{queue}.log"
    env = {**os.environ, **settings.child_env(), "PYTHONUNBUFFERED": "1"}
    with open(log_path, "wb") as log_file:
        proc = subprocess.Popen(
            [sys.executable, "-m", "worker", "worker", f"--concurrency={concurrency}", f"--queues={queue}",
             "--hostname", f"{queue}-{secrets.token_hex(3)}@%h"],
            cwd=PROJECT_ROOT, env=env, stdout=log_file, stderr=subprocess.STDOUT, start_new_session=True,
        )  # fmt: skip
    app = create_celery(settings)
    try:
        deadline = time.monotonic() + 60
        while not app.control.ping(timeout=0.5):
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"worker {queue} did not come up; log:\n{log_path.read_text()[-4000:]}")
    finally:
        app.close()
    return proc


@pytest.fixture(scope="module")
def workers_1_and_2(settings: Settings) -> Iterator[dict[int, str]]:
    """Two private workers, one process and two, each alone on a queue of its own."""
    queues = {1: f"af-val-c1-{secrets.token_hex(3)}", 2: f"af-val-c2-{secrets.token_hex(3)}"}
    procs = []
    try:
        for concurrency, queue in queues.items():
            procs.append(_start_worker(settings, concurrency, queue))
        yield queues
    finally:
        for proc in procs:
            _stop_process_group(proc)


def _submit(factory: sessionmaker[Session], settings: Settings, owner: str, body: dict[str, Any], queue: str) -> str:
    celery = create_celery(settings)
    try:
        config = BacktestConfig.model_validate({k: x for k, x in body.items() if k != "validation"})
        spec = v.ValidationSpec.model_validate(body["validation"])
        submitted = runs.submit_run(
            factory, runs.RunRequest(config=config, owner_id=owner, validation=spec), shard_size=2,
            enqueue=shard_enqueuer(celery, TASK_RUN_BACKTEST_SHARD, queue=queue),
        )  # fmt: skip
    finally:
        celery.close()
    return str(submitted.job.id)


def _wait_final(factory: sessionmaker[Session], job_id: str, timeout_s: float = 300) -> None:
    deadline = time.monotonic() + timeout_s
    while True:
        with factory() as session:
            status = session.scalar(select(Job.status).where(Job.id == uuid.UUID(job_id)))
            open_shards = session.scalar(
                select(JobShard.id).where(JobShard.job_id == uuid.UUID(job_id), JobShard.status.in_(("queued",
                                                                                                      "running")))
            )  # fmt: skip
        if status in FINAL and open_shards is None:
            return
        assert time.monotonic() < deadline, f"run {job_id}: {status}"
        time.sleep(0.2)


def test_validation_is_bit_for_bit_the_same_with_one_or_two_worker_processes(
    settings: Settings,
    session_factory: sessionmaker[Session],
    engine: Engine,
    user: ApiUser,
    other_user: ApiUser,
    workers_1_and_2: dict[int, str],
) -> None:
    symbols = [f"DET{i}" for i in range(5)]
    seed_bars(engine, symbols, days=300, seed=9)
    body = body_for(symbols, validation=VALIDATION | {"chunk": 3})
    one = _submit(session_factory, settings, user.id, body, workers_1_and_2[1])
    two = _submit(session_factory, settings, other_user.id, body, workers_1_and_2[2])
    _wait_final(session_factory, one)
    _wait_final(session_factory, two)
    with session_factory() as session:
        tasks = session.scalar(select(Job.shards_total).where(Job.id == uuid.UUID(one)))
        assert tasks is not None and tasks > 10  # enough tasks for two processes to share them out
        parts = {}
        for job_id in (one, two):
            rows = session.execute(
                select(RunValidationPart.method, RunValidationPart.task_index, RunValidationPart.draws,
                       RunValidationPart.detail).where(RunValidationPart.job_id == uuid.UUID(job_id))
            ).all()  # fmt: skip
            parts[job_id] = {(m, k): (d, detail) for m, k, d, detail in rows}
            with_two = session.execute(
                select(JobShard.status).where(JobShard.job_id == uuid.UUID(job_id))
            ).scalars().all()  # fmt: skip
            assert set(with_two) == {"succeeded"}
        results = {}
        for job_id in (one, two):
            job = session.get(Job, uuid.UUID(job_id))
            run = session.get(BacktestRun, uuid.UUID(job_id))
            assert job is not None and run is not None
            results[job_id] = run.validation_result  # stored by the worker that finalized the run
    assert parts[one] == parts[two]  # every task's draws, byte for byte
    assert results[one] == results[two]
    first = results[one]
    assert first is not None and run_result(first) == in_process(engine, body)


# --- cancel ----------------------------------------------------------------------------------------------------


def test_cancel_during_validation_keeps_the_draws_made(
    client: FlaskClient, engine: Engine, session_factory: sessionmaker[Session], celery_worker: Any
) -> None:
    symbols = [f"CXV{i}" for i in range(3)]
    seed_bars(engine, symbols, days=1500, seed=2)
    body = body_for(symbols, validation={"permutation": {"n": 10_000}, "chunk": 500})
    response = client.post(RUNS, json=body)
    assert response.status_code == 202, response.get_json()
    run_id = response.get_json()["run_id"]
    deadline = time.monotonic() + 120
    while True:  # a validation task is running
        with session_factory() as session:
            running = session.scalar(
                select(JobShard.id).where(JobShard.job_id == uuid.UUID(run_id), JobShard.task.is_not(None),
                                          JobShard.status == "running")
            )  # fmt: skip
        if running is not None:
            break
        assert time.monotonic() < deadline
        time.sleep(0.05)
    while True:  # some draws made: a validation task has stored its part
        with session_factory() as session:
            part = session.scalar(select(RunValidationPart.task_index).where(
                RunValidationPart.job_id == uuid.UUID(run_id)))  # fmt: skip
        if part is not None:
            break
        assert time.monotonic() < deadline
        time.sleep(0.05)
    cancelled = client.post(f"{RUNS}/{run_id}/cancel")
    assert cancelled.status_code == 200 and cancelled.get_json()["status"] == "cancelled"
    _wait_final(session_factory, run_id, timeout_s=60)  # running tasks stop at their next checkpoint
    deadline = time.monotonic() + 60
    while (view := client.get(f"{RUNS}/{run_id}").get_json())["validation"]["result"] is None:  # finalized
        assert time.monotonic() < deadline, view["progress"]
        time.sleep(0.05)
    assert view["status"] == "cancelled"
    perm = view["validation"]["result"]["methods"]["permutation"]
    assert 0 < perm["draws"] < 10_000 and not perm["complete"] and perm["tasks_done"] < perm["tasks_total"] == 20
    assert view["progress"]["validation"]["tasks_done"] < 20
    with session_factory() as session:
        statuses = session.execute(select(JobShard.status).where(JobShard.job_id == uuid.UUID(run_id))).scalars()
        assert set(statuses) <= {"succeeded", "cancelled"}
    # The numbers made are the ones an uninterrupted run makes: each part is a prefix of its task's draws.
    with session_factory() as session:
        rows = session.execute(
            select(RunValidationPart.task_index, RunValidationPart.draws).where(
                RunValidationPart.job_id == uuid.UUID(run_id)
            )
        ).all()
    config = BacktestConfig.model_validate({k: x for k, x in body.items() if k != "validation"})
    with engine.connect() as conn:
        loaded = load_bars(conn, config.symbols, config.start_date, config.end_date)
    sleeves = v.sleeves({s: run_shards.engine_bars(b) for s, b in loaded.items()}, config)
    task_index, raw = rows[0]
    stored = np.frombuffer(raw, dtype="<f8").tolist()
    assert stored == list(v.permutation_draws(sleeves, 42, task_index, len(stored)))


# --- bad input -------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def bounded_app(settings: Settings) -> Iterator[Flask]:
    app = create_app(settings.with_overrides(max_validation_backtests=1000, max_validation_task_backtests=200,
                                             max_portfolio_bars=150))  # fmt: skip
    yield app
    app.extensions["alphaforge"].engine.dispose()


@pytest.mark.parametrize(
    ("validation", "changes", "field"),
    [
        ({"permutation": {"n": 5}}, {}, "validation.permutation.n"),
        ({"permutation": {"n": "many"}}, {}, "validation.permutation.n"),
        ({"bootstrap": {"confidence": 1.5}}, {}, "validation.bootstrap.confidence"),
        ({"monte_carlo": {"fee_bps_sigma": -1}}, {}, "validation.monte_carlo.fee_bps_sigma"),
        ({"walk_forward": {"fast": [50], "slow": [10]}}, {}, "validation.walk_forward"),
        ({"walk_forward": {}}, {"strategy": {"name": "rsi_reversion"}}, "validation.walk_forward"),
        ({"walk_forward": {"metric": "profit_factor"}}, {}, "validation.walk_forward.metric"),
        ({"bogus": {}}, {}, "validation.bogus"),
        ({"permutation": {"n": 10}, "chunk": 0}, {}, "validation.chunk"),
        ([1, 2], {}, "validation"),
        ({"permutation": {"n": 500}}, {}, "validation"),  # 500 x 2 symbols + 10 baselines x 2 > 1000
        ({"permutation": {"n": 100}, "chunk": 100}, {}, "validation.chunk"),  # one task: 202 > 200
    ],
)
def test_bad_validation_is_422_naming_the_field(
    bounded_app: Flask, user: ApiUser, engine: Engine, validation: Any, changes: dict[str, Any], field: str
) -> None:
    seed_bars(engine, ["BAD0", "BAD1"], days=60)
    client = authed_client(bounded_app, user)
    response = client.post(RUNS, json=body_for(["BAD0", "BAD1"], validation=validation, **changes))
    assert response.status_code == 422, response.get_json()
    error = response.get_json()["error"]
    assert error["code"] == "validation_error"
    assert field in [e["field"] for e in error["details"]["errors"]], error
    with engine.connect() as conn:
        assert conn.scalar(select(Job.id)) is None  # nothing written


def test_a_bounded_validation_within_the_limits_is_accepted(bounded_app: Flask, user: ApiUser, engine: Engine) -> None:
    seed_bars(engine, ["OK0", "OK1"], days=60)
    client = authed_client(bounded_app, user)
    response = client.post(RUNS, json=body_for(["OK0", "OK1"], validation={"permutation": {"n": 40}, "chunk": 20}))
    assert response.status_code == 202, response.get_json()
    client.post(f"{RUNS}/{response.get_json()['run_id']}/cancel")


def test_a_validation_holding_more_bars_than_the_bound_is_422(
    bounded_app: Flask, user: ApiUser, engine: Engine
) -> None:
    """2 symbols x 60 bars pass the bound of 150 (above); 3 do not, for a run's validation over the portfolio as for
    an optimisation (its slices hold every symbol's bars)."""
    seed_bars(engine, ["BIG0", "BIG1", "BIG2"], days=60)
    client = authed_client(bounded_app, user)
    response = client.post(RUNS, json=body_for(["BIG0", "BIG1", "BIG2"], validation={"permutation": {"n": 10}}))
    assert response.status_code == 422, response.get_json()
    error = response.get_json()["error"]
    assert [e["field"] for e in error["details"]["errors"]] == ["validation"]
    assert "180 bars" in error["message"] and "ALPHAFORGE_MAX_PORTFOLIO_BARS" in error["message"]
    optimisation = client.post("/api/optimizations", json={
        "symbols": ["BIG0", "BIG1", "BIG2"], "strategy": "dual_sma", "parameters": {"fast": [2, 3], "slow": [8]},
    })  # fmt: skip
    assert optimisation.status_code == 422, optimisation.get_json()
    assert [e["field"] for e in optimisation.get_json()["error"]["details"]["errors"]] == ["symbols"]
    with engine.connect() as conn:
        assert conn.scalar(select(Job.id)) is None  # nothing written


# --- the reconciler ---------------------------------------------------------------------------------------------


def test_reconciler_republishes_validation_tasks_and_a_given_up_task_makes_the_run_partial(
    client: FlaskClient,
    settings: Settings,
    user: ApiUser,
    engine: Engine,
    session_factory: sessionmaker[Session],
    celery_worker: Any,
) -> None:
    """Validation tasks are shards like any other: a vanished one is re-published by the reconciler and runs; one
    it gives up on is failed with the reason, the run ends ``partial`` and its result names the failed task."""
    symbols = ["REC0", "REC1"]
    seed_bars(engine, symbols, days=200, seed=4)
    body = body_for(symbols, validation={"permutation": {"n": 10}, "monte_carlo": {"n": 10}, "chunk": 5})
    celery = create_celery(settings)
    try:  # published where no worker reads: every task "vanishes"
        config = BacktestConfig.model_validate({k: x for k, x in body.items() if k != "validation"})
        spec = v.ValidationSpec.model_validate(body["validation"])
        submitted = runs.submit_run(
            session_factory, runs.RunRequest(config=config, owner_id=user.id, validation=spec), shard_size=2,
            enqueue=shard_enqueuer(celery, TASK_RUN_BACKTEST_SHARD, queue=f"nobody-{secrets.token_hex(4)}"),
        )  # fmt: skip
        job_id = submitted.job.id
        with session_factory() as session, session.begin():
            doomed = session.scalar(
                select(JobShard.id).where(JobShard.job_id == job_id, JobShard.task["method"].astext == "monte_carlo",
                                          JobShard.task["task_index"].as_integer() == 1)
            )  # fmt: skip
            session.execute(update(JobShard).where(JobShard.id == doomed).values(requeues=2))
        time.sleep(0.2)
        report = reconcile(
            session_factory, live_tasks=lambda ids: set(), kinds=["backtest"], grace_s=0, max_requeues=2,
            requeue=lambda kind, queue, tasks: shard_enqueuer(celery, TASK_RUN_BACKTEST_SHARD)(tasks),
        )  # fmt: skip
    finally:
        celery.close()
    assert report.failed == [doomed] and len(report.requeued) == 4  # 2 + 1 tasks and 1 symbol shard
    view = wait_for(client, str(job_id))
    assert view["status"] == "partial", view
    assert view["progress"]["validation"]["tasks_failed"] == 1 and view["progress"]["symbols_failed"] == 0
    methods = view["validation"]["result"]["methods"]
    assert methods["permutation"]["complete"] and methods["permutation"]["tasks_failed"] == 0
    mc = methods["monte_carlo"]
    assert not mc["complete"] and mc["tasks_failed"] == 1 and mc["draws"] == 5 and mc["tasks_done"] == 1
    assert mc["errors"][0]["task_index"] == 1 and "vanished" in mc["errors"][0]["error"]
