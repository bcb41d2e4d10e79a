"""Backtest runs end to end: API -> job/shards -> real Celery worker -> engine -> API, against the engine itself."""

from __future__ import annotations

import datetime as dt
import json
import math
import time
import uuid
from collections.abc import Iterator
from typing import Any

import pytest
from flask import Flask
from flask.testing import FlaskClient
from sqlalchemy import Engine, insert, select

from api import create_app
from shared.contract import TASK_RUN_BACKTEST_SHARD, create_celery, shard_enqueuer
from shared.domain.backtest import BacktestConfig, Bars, run_backtest
from shared.infra.config import Settings
from shared.infra.db import make_session_factory
from shared.infra.models import AuditLog, JobShard, Symbol
from shared.jobs.backtests import submit as runs
from shared.marketdata.bars import load_bars
from tests.helpers import FINAL, ApiUser, authed_client, copy_bars, seed_bars

RUNS = "/api/runs"
SYMBOLS = [f"RUN{i:02d}" for i in range(30)]
SHARD_SIZE = 7  # 30 symbols -> 5 shards


def config_body(**changes: Any) -> dict[str, Any]:
    body: dict[str, Any] = {
        "symbols": SYMBOLS,
        "start_date": "2023-02-01",
        "strategy": {"name": "dual_sma", "params": {"fast": 5, "slow": 20}},
        "execution": {"fee_bps": 5, "slippage_bps": 2},
    }
    body.update(changes)
    return body


@pytest.fixture(scope="module")
def small_shard_app(settings: Settings) -> Iterator[Flask]:
    """The API with shards of 7 symbols (the worker takes the shards as written)."""
    app = create_app(settings.with_overrides(shard_size=SHARD_SIZE))
    yield app
    app.extensions["alphaforge"].engine.dispose()


@pytest.fixture
def runs_client(small_shard_app: Flask, user: ApiUser) -> FlaskClient:
    return authed_client(small_shard_app, user)


def error_of(response: Any, status: int, code: str) -> dict[str, Any]:
    assert response.status_code == status, response.get_data(as_text=True)
    body = response.get_json()
    assert set(body) == {"error"} and body["error"]["code"] == code, body
    return body["error"]


def wait_for_run(client: FlaskClient, run_id: str, timeout_s: float = 120) -> dict[str, Any]:
    deadline = time.monotonic() + timeout_s
    while True:
        response = client.get(f"{RUNS}/{run_id}")
        assert response.status_code == 200, response.get_json()
        body: dict[str, Any] = response.get_json()
        if body["status"] in FINAL:
            return body
        if time.monotonic() > deadline:
            raise AssertionError(f"run {run_id} not finished after {timeout_s} s: {body['progress']}")
        time.sleep(0.2)


def all_run_results(client: FlaskClient, run_id: str, page_size: int) -> list[dict[str, Any]]:
    rows: list[dict[str, Any]] = []
    cursor = None
    while True:
        query = f"?limit={page_size}" + (f"&cursor={cursor}" if cursor else "")
        page = client.get(f"{RUNS}/{run_id}/results{query}").get_json()
        rows.extend(page["results"])
        cursor = page["next_cursor"]
        if not cursor:
            return rows


def direct_metrics(engine: Engine, body: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """The engine called directly on the same bars from the same database (NaN as None, as JSON has it)."""
    config = BacktestConfig.model_validate(body)
    with engine.connect() as conn:
        loaded = load_bars(conn, config.symbols, config.start_date, config.end_date)
    expected = {}
    for symbol, b in loaded.items():
        bars = Bars.from_arrays(open=b.open, high=b.high, low=b.low, close=b.close, volume=b.volume, dates=b.dates)
        metrics = run_backtest(bars, config).metrics
        expected[symbol] = {k: None if isinstance(v, float) and not math.isfinite(v) else v for k, v in metrics.items()}
    return expected


def test_thirty_symbol_run_matches_the_engine(
    runs_client: FlaskClient, user: ApiUser, engine: Engine, celery_worker: Any
) -> None:
    seed_bars(engine, SYMBOLS, days=300, seed=11)
    body = config_body()
    response = runs_client.post(RUNS, json=body)
    assert response.status_code == 202, response.get_json()
    assert response.headers["Idempotent-Replayed"] == "false"
    accepted = response.get_json()
    run_id = accepted["run_id"]
    assert accepted["shards"] == 5 and accepted["symbols"] == 30
    assert response.headers["Location"] == f"{RUNS}/{run_id}"
    assert accepted["config_hash"] == BacktestConfig.model_validate(body).config_hash

    view = wait_for_run(runs_client, run_id)
    assert view["status"] == "succeeded", view
    assert view["progress"]["symbols_done"] == 30 and view["progress"]["shards_done"] == 5
    assert view["owner_id"] == user.id and view["strategy"] == "dual_sma"
    with engine.connect() as conn:
        shards = conn.execute(select(JobShard.symbols).where(JobShard.job_id == run_id)).scalars().all()
    assert sorted(s for batch in shards for s in batch) == SYMBOLS

    expected = direct_metrics(engine, body)
    results = all_run_results(runs_client, run_id, page_size=8)
    assert [r["symbol"] for r in results] == SYMBOLS
    for row in results:
        assert row["error"] is None
        assert row["metrics"] == expected[row["symbol"]], row["symbol"]
    assert sum(r["metrics"]["# Trades"] for r in results) > 30  # the strategy traded: a meaningful comparison

    summary = {s["symbol"]: s for s in view["symbols"]}
    assert set(summary) == set(SYMBOLS)
    for symbol, metrics in expected.items():
        assert summary[symbol]["return_pct"] == metrics["Return [%]"]
        assert summary[symbol]["sharpe"] == metrics["Sharpe Ratio"]
        assert summary[symbol]["trades"] == metrics["# Trades"]

    portfolio = view["portfolio"]
    assert portfolio["sleeves"] == 30 and portfolio["initial_equity"] == 30 * 10_000
    final_sum = sum(m["Equity Final [$]"] for m in expected.values())
    assert portfolio["final_equity"] == pytest.approx(final_sum, rel=1e-12)
    assert portfolio["return_pct"] == pytest.approx((final_sum / 300_000 - 1) * 100, rel=1e-9)
    assert portfolio["max_drawdown_pct"] <= 0

    # The run is a job too.
    job = runs_client.get(f"/api/jobs/{run_id}").get_json()
    assert job["kind"] == "backtest" and job["status"] == "succeeded"
    assert job["reproducibility"]["script_sha256"] == accepted["config_hash"]

    # Same config again, spelled differently (lower case, defaults written out, keys reordered): the same run.
    again = config_body(symbols=[s.lower() for s in SYMBOLS], initial_cash=10_000, seed=0)
    replay = runs_client.post(RUNS, json=dict(reversed(list(again.items()))))
    assert replay.status_code == 200, replay.get_json()
    assert replay.headers["Idempotent-Replayed"] == "true"
    assert replay.get_json()["run_id"] == run_id and replay.get_json()["status"] == "succeeded"
    # A different config is a different run.
    other = runs_client.post(RUNS, json=config_body(symbols=SYMBOLS[:2]))
    assert other.status_code == 202 and other.get_json()["run_id"] != run_id
    single = runs_client.post(
        RUNS, json={k: v for k, v in config_body().items() if k != "symbols"} | {"symbol": "RUN03"}
    )
    assert single.status_code == 202, single.get_json()
    single_view = wait_for_run(runs_client, single.get_json()["run_id"])
    assert (
        single_view["portfolio"] is None and single_view["symbols"][0]["return_pct"] == expected["RUN03"]["Return [%]"]
    )

    # Finished: cancelling is a conflict.
    error = error_of(runs_client.post(f"{RUNS}/{run_id}/cancel"), 409, "conflict")
    assert error["details"]["status"] == "succeeded"

    with engine.connect() as conn:
        actions = conn.execute(select(AuditLog.action, AuditLog.resource_id).where(AuditLog.actor_id == user.id)).all()
    assert ("run.submit", run_id) in actions
    assert [a for a, r in actions if r == run_id].count("run.submit") == 1  # the replay wrote nothing


def test_cancel_mid_run_keeps_finished_symbols(
    small_shard_app: Flask, settings: Settings, user: ApiUser, engine: Engine, celery_worker: Any
) -> None:
    symbols = [f"CXL{i:03d}" for i in range(200)]
    seed_bars(engine, symbols, days=2000, seed=3)
    one_per_shard = create_app(settings.with_overrides(shard_size=1))
    try:
        client = authed_client(one_per_shard, user)
        response = client.post(RUNS, json=config_body(symbols=symbols, start_date=None))
        assert response.status_code == 202, response.get_json()
        run_id = response.get_json()["run_id"]
        deadline = time.monotonic() + 60
        while client.get(f"{RUNS}/{run_id}").get_json()["progress"]["symbols_done"] < 3:
            assert time.monotonic() < deadline
            time.sleep(0.05)
        cancelled = client.post(f"{RUNS}/{run_id}/cancel")
        assert cancelled.status_code == 200, cancelled.get_json()
        assert cancelled.get_json()["status"] == "cancelled"
        # Running shards stop at their checkpoint and store what they finished; the last one to stop finalizes.
        deadline = time.monotonic() + 60
        while (view := client.get(f"{RUNS}/{run_id}").get_json())["portfolio"] is None:
            assert time.monotonic() < deadline, view["progress"]
            time.sleep(0.05)
        assert view["status"] == "cancelled"
        done = view["progress"]["symbols_done"]
        assert 3 <= done < 200
        results = all_run_results(client, run_id, page_size=1000)
        assert len(results) == done and all(r["error"] is None for r in results)
        assert view["portfolio"]["sleeves"] == done
        error_of(client.post(f"{RUNS}/{run_id}/cancel"), 409, "conflict")
        with engine.connect() as conn:
            statuses = conn.execute(select(JobShard.status).where(JobShard.job_id == run_id)).scalars().all()
        assert statuses.count("cancelled") > 0
        assert set(statuses) <= {"succeeded", "cancelled"}
    finally:
        one_per_shard.extensions["alphaforge"].engine.dispose()


@pytest.mark.parametrize(
    ("changes", "field"),
    [
        ({"symbols": ["RUN00", "NOPE"]}, "symbols[1]"),
        ({"symbols": ["RUN00", "bad symbol!"]}, "symbols"),
        ({"symbols": []}, "symbols"),
        ({"symbols": "RUN00"}, "symbols"),
        ({"start_date": "2023-06-01", "end_date": "2023-05-01"}, "end_date"),
        ({"start_date": "2031-01-01"}, "start_date"),
        ({"start_date": "June 1st"}, "start_date"),
        ({"strategy": {"name": "martingale"}}, "strategy"),
        (
            {"strategy": {"name": "dual_sma", "params": {"fast": 5, "slow": 20, "bogus": 1}}},
            "strategy.dual_sma.params.bogus",
        ),
        ({"strategy": {"name": "dual_sma", "params": {"fast": 30, "slow": 20}}}, "strategy.dual_sma.params"),
        ({"execution": {"fee_bps": -1}}, "execution.fee_bps"),
        ({"initial_cash": 0}, "initial_cash"),
        ({"unknown_field": 1}, "unknown_field"),
        ({"name": ""}, "name"),
        ({"symbol": "RUN00"}, "symbol"),
    ],
)
def test_bad_config_is_422_naming_the_field(
    runs_client: FlaskClient, engine: Engine, changes: dict[str, Any], field: str
) -> None:
    seed_bars(engine, ["RUN00", "RUN01"], days=60)
    body = config_body(symbols=["RUN00", "RUN01"]) | changes
    error = error_of(runs_client.post(RUNS, json=body), 422, "validation_error")
    fields = [e["field"] for e in error["details"]["errors"]]
    assert field in fields, error


def test_missing_symbols_and_bodies(runs_client: FlaskClient) -> None:
    no_symbols = {k: v for k, v in config_body().items() if k != "symbols"}
    assert "symbols" in [e["field"] for e in error_of(runs_client.post(RUNS, json=no_symbols), 422,
                                                      "validation_error")["details"]["errors"]]  # fmt: skip
    error_of(runs_client.post(RUNS, json=[1, 2]), 422, "validation_error")
    error_of(runs_client.post(RUNS, data="{", content_type="application/json"), 400, "invalid_json")
    error_of(runs_client.post(RUNS, data="x", content_type="text/plain"), 415, "unsupported_media_type")


def test_ownership_listing_and_paging(
    runs_client: FlaskClient,
    small_shard_app: Flask,
    other_user: ApiUser,
    admin_user: ApiUser,
    engine: Engine,
    celery_worker: Any,
) -> None:
    seed_bars(engine, ["OWN1", "OWN2"], days=80)
    ids = []
    for fast in (3, 4, 5):
        body = config_body(symbols=["OWN1", "OWN2"], start_date=None, strategy={"name": "dual_sma",
                           "params": {"fast": fast, "slow": 10}})  # fmt: skip
        response = runs_client.post(RUNS, json=body | {"name": f"fast {fast}"})
        assert response.status_code == 202, response.get_json()
        ids.append(response.get_json()["run_id"])
    for run_id in ids:
        wait_for_run(runs_client, run_id)
    rsi = runs_client.post(
        RUNS, json=config_body(symbols=["OWN1"], start_date=None, strategy={"name": "rsi_reversion"})
    )
    assert rsi.status_code == 202

    other = authed_client(small_shard_app, other_user)
    admin = authed_client(small_shard_app, admin_user)
    anon = small_shard_app.test_client()
    error_of(other.get(f"{RUNS}/{ids[0]}"), 404, "not_found")
    error_of(other.get(f"{RUNS}/{ids[0]}/results"), 404, "not_found")
    error_of(other.post(f"{RUNS}/{ids[0]}/cancel"), 404, "not_found")
    error_of(other.get(f"{RUNS}/not-a-uuid"), 404, "not_found")
    assert other.get(RUNS).get_json() == {"runs": [], "next_cursor": None}
    assert admin.get(f"{RUNS}/{ids[0]}").status_code == 200
    error_of(admin.post(f"{RUNS}/{ids[0]}/cancel"), 403, "forbidden")
    error_of(anon.get(RUNS), 401, "unauthorized")
    error_of(anon.post(RUNS, json=config_body()), 401, "unauthorized")

    listed: list[dict[str, Any]] = []
    cursor = None
    while True:
        page = runs_client.get(f"{RUNS}?strategy=dual_sma&limit=2" + (f"&cursor={cursor}" if cursor else "")).get_json()
        listed.extend(page["runs"])
        cursor = page["next_cursor"]
        if not cursor:
            break
    assert [r["run_id"] for r in listed] == ids[::-1]  # newest first
    assert [r["name"] for r in listed] == ["fast 5", "fast 4", "fast 3"]
    assert all(r["status"] == "succeeded" for r in listed)
    everything = runs_client.get(f"{RUNS}?limit=200").get_json()["runs"]
    assert len(everything) == 4 and everything[0]["strategy"] == "rsi_reversion"
    assert runs_client.get(f"{RUNS}?status=cancelled").get_json()["runs"] == []
    error_of(runs_client.get(f"{RUNS}?status=nope"), 422, "validation_error")
    error_of(runs_client.get(f"{RUNS}?cursor=garbage"), 422, "validation_error")
    error_of(runs_client.get(f"{RUNS}?limit=0"), 422, "validation_error")


def test_symbols_without_bars_in_the_range_are_per_symbol_errors(
    runs_client: FlaskClient, engine: Engine, celery_worker: Any
) -> None:
    """A range in which only some symbols have bars: the others are NoData errors, the run is partial."""
    seed_bars(engine, ["EARLY"], days=60)  # from 2023-01-02
    late = dt.date(2023, 1, 2) + dt.timedelta(days=400)
    with engine.begin() as conn:
        conn.execute(insert(Symbol), [{"symbol": "LATE"}])
        copy_bars(conn, [{"symbol": "LATE", "date": late + dt.timedelta(days=i), "open": 10.0,
                                         "high": 11.0, "low": 9.0, "close": 10.0 + i % 3, "volume": 1000}
                                        for i in range(30)])  # fmt: skip
    response = runs_client.post(
        RUNS, json=config_body(symbols=["EARLY", "LATE"], start_date=None, end_date="2023-06-30")
    )
    assert response.status_code == 202, response.get_json()
    view = wait_for_run(runs_client, response.get_json()["run_id"])
    assert view["status"] == "partial"
    by_symbol = {s["symbol"]: s for s in view["symbols"]}
    assert by_symbol["LATE"]["error"]["type"] == "NoData" and by_symbol["EARLY"]["error"] is None


def test_a_run_cancelled_before_any_shard_ran_still_gets_artifacts(
    runs_client: FlaskClient, settings: Settings, user: ApiUser, engine: Engine, celery_worker: Any
) -> None:
    """No shard task finishes to build them (every shard was still waiting): the cancel asks a worker to."""
    seed_bars(engine, ["WAIT1", "WAIT2"], days=60)
    config = BacktestConfig.model_validate(config_body(symbols=["WAIT1", "WAIT2"], start_date=None))
    celery = create_celery(settings)
    try:  # published on a queue no worker reads: the shards stay queued
        submitted = runs.submit_run(
            make_session_factory(engine), runs.RunRequest(config=config, owner_id=user.id), shard_size=1,
            enqueue=shard_enqueuer(celery, TASK_RUN_BACKTEST_SHARD, queue=f"nobody-{uuid.uuid4().hex[:8]}"),
        )  # fmt: skip
    finally:
        celery.close()
    run_id = str(submitted.job.id)
    cancelled = runs_client.post(f"{RUNS}/{run_id}/cancel")
    assert cancelled.status_code == 200 and cancelled.get_json()["status"] == "cancelled"
    deadline = time.monotonic() + 60
    while (listing := runs_client.get(f"{RUNS}/{run_id}/artifacts")).get_json().get("status") != "ready":
        assert time.monotonic() < deadline, listing.get_json()
        time.sleep(0.2)
    metrics = json.loads(runs_client.get(f"{RUNS}/{run_id}/artifacts/metrics.json").get_data())
    assert metrics["status"] == "cancelled" and metrics["symbols"] == {}
    assert runs_client.get(f"{RUNS}/{run_id}/manifest/verify").get_json()["ok"] is True


def test_the_run_view_embeds_the_first_100_symbols(
    settings: Settings, user: ApiUser, engine: Engine, celery_worker: Any
) -> None:
    symbols = [f"CAP{i:03d}" for i in range(103)]
    seed_bars(engine, symbols, days=40, seed=6)
    app = create_app(settings.with_overrides(shard_size=60))
    try:
        client = authed_client(app, user)
        response = client.post(RUNS, json=config_body(symbols=symbols, start_date=None))
        assert response.status_code == 202, response.get_json()
        view = wait_for_run(client, response.get_json()["run_id"])
        assert view["progress"]["symbols_done"] == 103
        assert [s["symbol"] for s in view["symbols"]] == symbols[:100] and view["symbols_truncated"] is True
        assert len(all_run_results(client, view["run_id"], page_size=1000)) == 103
    finally:
        app.extensions["alphaforge"].engine.dispose()
