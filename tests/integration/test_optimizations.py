"""Optimisations end to end: API -> job of slices -> real Celery worker -> engine -> ranked table, against a
brute-force loop over the engine itself."""

from __future__ import annotations

import csv
import io
import math
import sys
import time
from collections.abc import Iterator
from typing import Any

import numpy as np
import pytest
from flask.testing import FlaskClient
from sqlalchemy import Engine, insert, select

from api import create_app
from api.optimizations import spec_from_body
from shared.domain.backtest import BacktestConfig, run_backtest
from shared.infra.config import Settings
from shared.infra.db import make_session_factory
from shared.infra.models import Job, JobShard, Optimization, Symbol, User
from shared.jobs.backtests import shard as runs
from shared.jobs.optimizations import submit
from shared.jobs.optimizations.spec import Limits, OptimizationRequest
from shared.marketdata.bars import load_bars
from tests.helpers import FINAL, ApiUser, authed_client, copy_bars, seed_bars, wait_for_job
from tests.integration import test_webhooks as hooks
from tests.integration.test_webhooks import Receiver, verify_signature

OPT = "/api/optimizations"

# The webhook tests' fixtures: a worker of its own that allows private targets, and a receiver on loopback.
hook_settings, hook_worker, hook_client, receiver = (
    hooks.hook_settings,
    hooks.hook_worker,
    hooks.hook_client,
    hooks.receiver,
)
SYMBOLS = ["OPTA", "OPTB"]

pytestmark = pytest.mark.usefixtures("celery_worker")


def body(**changes: Any) -> dict[str, Any]:
    doc: dict[str, Any] = {
        "symbol": SYMBOLS[0],
        "strategy": "dual_sma",
        "execution": {"fee_bps": 10},
        "parameters": {"fast": {"start": 3, "stop": 15, "step": 2}, "slow": [10, 15, 20, 30, 40]},
        "objective": {"metric": "sharpe", "direction": "max"},
        "constraints": [{"metric": "trades", "op": ">=", "value": 3}],
    }
    doc.update(changes)
    return doc


def create(client: FlaskClient, doc: dict[str, Any], status: int = 202) -> dict[str, Any]:
    response = client.post(OPT, json=doc)
    assert response.status_code == status, response.get_data(as_text=True)
    return response.get_json()


def finished(client: FlaskClient, optimization_id: str, timeout_s: float = 120) -> dict[str, Any]:
    """The view once final: its outcome is in by then (the worker stores it in the transaction that makes the job
    final)."""
    wait_for_job(client, optimization_id, timeout_s)
    view: dict[str, Any] = client.get(f"{OPT}/{optimization_id}").get_json()
    assert view["combos_passing"] is not None or view["walk_forward"] is not None, view
    return view


def artifacts_listing(client: FlaskClient, optimization_id: str, timeout_s: float = 60) -> dict[str, Any]:
    """The artifacts listing once written: the worker writes the files after the commit that finalized the job;
    until then the listing answers 409 (pending), never anything else."""
    deadline = time.monotonic() + timeout_s
    while True:
        listing = client.get(f"{OPT}/{optimization_id}/artifacts")
        if listing.status_code == 200:
            shown: dict[str, Any] = listing.get_json()
            return shown
        assert listing.status_code == 409, listing.get_data(as_text=True)
        assert listing.get_json()["error"]["details"]["artifacts"] == "pending", listing.get_json()
        assert time.monotonic() < deadline, f"no artifacts {timeout_s} s after the job was final"
        time.sleep(0.05)


def table(client: FlaskClient, optimization_id: str, **query: Any) -> list[dict[str, Any]]:
    rows: list[dict[str, Any]] = []
    cursor: dict[str, str] = {}
    while True:
        page = client.get(f"{OPT}/{optimization_id}/results", query_string={**query, **cursor, "limit": 7})
        assert page.status_code == 200, page.get_data(as_text=True)
        doc = page.get_json()
        rows.extend(doc["results"])
        if doc["next_cursor"] is None:
            return rows
        cursor = {"cursor": doc["next_cursor"]}


def engine_bars(engine: Engine, symbol: str) -> Any:
    with make_session_factory(engine)() as session:
        return runs.engine_bars(load_bars(session.connection(), [symbol], None, None)[symbol])


SUMMARY = {
    "sharpe": "Sharpe Ratio",
    "return_pct": "Return [%]",
    "trades": "# Trades",
    "max_drawdown_pct": "Max. Drawdown [%]",
    "win_rate_pct": "Win Rate [%]",
}


def brute_force(engine: Engine, symbols: list[str], pairs: list[tuple[int, int]]) -> list[dict[str, Any]]:
    """Every pair through run_backtest itself, aggregated as documented (mean; trades summed)."""
    out = []
    bars = {s: engine_bars(engine, s) for s in symbols}
    for fast, slow in pairs:
        config = BacktestConfig.model_validate(
            {
                "symbols": symbols,
                "execution": {"fee_bps": 10},
                "strategy": {"name": "dual_sma", "params": {"fast": fast, "slow": slow}},
            }
        )
        per = [run_backtest(bars[s], config).metrics for s in symbols]
        row: dict[str, Any] = {"params": {"fast": fast, "slow": slow}}
        for name, key in SUMMARY.items():
            values = np.array([float(m[key]) for m in per])
            row[name] = float(values.sum()) if name == "trades" else float(np.nanmean(values))
        row["full"] = per
        out.append(row)
    return out


PAIRS = [(f, s) for f in range(3, 16, 2) for s in (10, 15, 20, 30, 40) if f < s]


def ranked(rows: list[dict[str, Any]], min_trades: float) -> list[dict[str, Any]]:
    passing = [r for r in rows if r["trades"] >= min_trades]
    return sorted(passing, key=lambda r: -r["sharpe"] if math.isfinite(r["sharpe"]) else math.inf)


def close(a: float | None, b: float | None) -> bool:
    if a is None or b is None or not math.isfinite(b):
        return (a is None) == (b is None or not math.isfinite(b))
    return math.isclose(a, b, rel_tol=1e-9, abs_tol=1e-9)


def test_grid_best_and_table_equal_a_brute_force_loop(client: FlaskClient, clean_db: Engine) -> None:
    seed_bars(clean_db, SYMBOLS, days=400, seed=11)
    accepted = create(client, body())
    assert accepted["combos"] == len(PAIRS)
    view = finished(client, accepted["optimization_id"])
    assert view["status"] == "succeeded"
    assert view["progress"]["combos_done"] == len(PAIRS) and view["progress"]["percent"] == 100.0
    expected = ranked(brute_force(clean_db, [SYMBOLS[0]], PAIRS), 3)
    best = view["best"]
    assert best["params"] == expected[0]["params"]
    truth = expected[0]["full"][0]
    for key, value in truth.items():  # the full metrics of one run_backtest of the best combo
        got = best["metrics"][key]
        if isinstance(value, float) and not math.isfinite(value):
            assert got is None, key
        elif isinstance(value, float):
            assert math.isclose(got, value, rel_tol=1e-12, abs_tol=1e-12), key
        else:
            assert got == value, key
    rows = table(client, accepted["optimization_id"])
    assert [r["params"] for r in rows] == [e["params"] for e in expected]
    assert [r["rank"] for r in rows] == list(range(1, len(expected) + 1))
    for got, want in zip(rows, expected, strict=True):
        for name in SUMMARY:
            assert close(got["metrics"][name], want[name]), (name, got, want)
    # the same spec again is the same optimisation
    again = client.post(OPT, json=body())
    assert again.status_code == 200 and again.headers["Idempotent-Replayed"] == "true"
    assert again.get_json()["optimization_id"] == accepted["optimization_id"]
    # artifacts: heatmap, ranked CSV, optimization.json, in a verifiable manifest
    listing = artifacts_listing(client, accepted["optimization_id"])
    names = {f["name"] for f in listing["files"]}
    assert names == {"heatmap.png", "results.csv", "optimization.json"}
    png = client.get(f"{OPT}/{accepted['optimization_id']}/artifacts/heatmap.png")
    assert png.status_code == 200 and png.data[:8] == b"\x89PNG\r\n\x1a\n"
    text = client.get(f"{OPT}/{accepted['optimization_id']}/artifacts/results.csv").get_data(as_text=True)
    lines = list(csv.DictReader(io.StringIO(text)))
    assert len(lines) == len(PAIRS)
    assert [(int(r["fast"]), int(r["slow"])) for r in lines[: len(expected)]] == [
        (e["params"]["fast"], e["params"]["slow"]) for e in expected
    ]
    assert client.get(f"{OPT}/{accepted['optimization_id']}/manifest/verify").get_json()["ok"] is True
    # the job machinery sees it as a job
    job = client.get(f"/api/jobs/{accepted['optimization_id']}").get_json()
    assert job["kind"] == "optimization" and job["progress"]["shards_done"] == job["progress"]["shards_total"]
    assert job["progress"]["percent"] == 100.0  # from its slices, not from symbols (no symbol shard)
    # its shard events name each slice under the neutral key "task" (a run's validation tasks also "validation")
    events = client.get(f"/api/jobs/{accepted['optimization_id']}/events?limit=1000").get_json()["events"]
    shard_events = [e["data"] for e in events if e["type"] in ("shard_started", "shard_finished")]
    assert len(shard_events) == 2 * job["progress"]["shards_total"]
    assert all(d["task"]["kind"] == "optimization" and "validation" not in d for d in shard_events)
    slices = sorted((d["task"]["lo"], d["task"]["hi"]) for d in shard_events if "attempt" in d)
    assert slices[0][0] == 0 and slices[-1][1] == len(PAIRS)


ENGINE_ENTRY_POINTS = (
    "run_backtest",
    "run_dual_sma_grid",
    "run_events",
    "strategy_signals",
    "backtest_symbol",
    "backtest_script",
    "strategy_events",
    "compute_outcome",
    "full_run",
    "finalize_optimization",
    "finalize_locked",
    "finalize_job",
    "portfolio_metrics",
    "render",
)


def forbid_engine_work(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """Every engine entry point (and the finalization and artifact functions) raises, in every module of this process
    that holds it: the API's process. Returns the names of the calls attempted."""
    from shared.domain.backtest import engine, grid
    from shared.domain.search import report
    from shared.jobs import pipeline
    from shared.jobs.backtests import finalize as run_finalize
    from shared.jobs.backtests import shard as run_shards
    from shared.jobs.optimizations import finalize as opt_finalize
    from shared.library import strategy_scripts

    homes = (engine, grid, run_shards, run_finalize, opt_finalize, pipeline, report, strategy_scripts)
    originals = {id(getattr(m, n)): n for m in homes for n in ENGINE_ENTRY_POINTS if callable(getattr(m, n, None))}
    attempted: list[str] = []

    def forbidden(name: str) -> Any:
        def call(*args: Any, **kwargs: Any) -> Any:
            attempted.append(name)
            raise AssertionError(f"{name} called in the API process")

        return call

    patched = 0
    for module in list(sys.modules.values()):
        if module is None or not (module.__name__.startswith(("shared", "api"))):
            continue
        for attr, value in list(vars(module).items()):
            if callable(value) and id(value) in originals:
                monkeypatch.setattr(module, attr, forbidden(originals[id(value)]))
                patched += 1
    assert patched >= len(homes), patched
    return attempted


def test_a_just_finished_optimisation_is_read_without_engine_work(
    client: FlaskClient, clean_db: Engine, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The worker stores the outcome in the transaction that makes the job final: from the first moment the status is
    final the outcome row is there, and GET answers the full view with every engine entry point raising here. The
    artifacts (files) follow that commit: pending (409) until written, then listed."""
    seed_bars(clean_db, SYMBOLS, days=300, seed=21)
    attempted = forbid_engine_work(monkeypatch)
    doc = body(symbols=SYMBOLS, parameters={"fast": [3, 5, 8], "slow": [20, 30]}, constraints=[])
    del doc["symbol"]
    oid = create(client, doc)["optimization_id"]
    factory = make_session_factory(clean_db)
    query = (
        select(Job.status, Job.finalized_at, Job.finalize_error, Optimization.outcome)
        .join(Optimization, Optimization.job_id == Job.id)
        .where(Job.id == oid)
    )
    deadline = time.monotonic() + 120
    while True:
        with factory() as session:
            status, finalized_at, finalize_error, outcome = session.execute(query).one()  # one snapshot
        if status in FINAL:
            break
        assert time.monotonic() < deadline, f"not final within 120 s ({status})"
        time.sleep(0.01)
    assert outcome is not None and finalized_at is not None and finalize_error is None, status
    response = client.get(f"{OPT}/{oid}")  # the first read of a just-finished optimisation
    assert response.status_code == 200, response.get_data(as_text=True)
    view = response.get_json()
    assert view["status"] == "succeeded" and view["progress"]["percent"] == 100.0
    best = view["best"]
    assert best is not None and set(best["symbols"]) == set(SYMBOLS) and best["portfolio"] is not None
    assert best["params"] in [{"fast": f, "slow": s} for f in (3, 5, 8) for s in (20, 30)]
    assert view["combos_passing"] == 6
    assert client.get(f"{OPT}/{oid}/results").status_code == 200
    listing = artifacts_listing(client, oid)
    assert {f["name"] for f in listing["files"]} == {"heatmap.png", "results.csv", "optimization.json"}
    assert attempted == []


def test_many_symbols_and_constraint_filtering(client: FlaskClient, clean_db: Engine) -> None:
    seed_bars(clean_db, SYMBOLS, days=400, seed=5)
    constraints = [
        {"metric": "trades", "op": ">=", "value": 12},
        {"metric": "max_drawdown_pct", "op": ">=", "value": -30},
    ]
    doc = body(symbols=SYMBOLS, constraints=constraints)
    del doc["symbol"]
    accepted = create(client, doc)
    view = finished(client, accepted["optimization_id"])
    truth = brute_force(clean_db, SYMBOLS, PAIRS)
    passing = [r for r in truth if r["trades"] >= 12 and r["max_drawdown_pct"] >= -30]
    expected = sorted(passing, key=lambda r: -r["sharpe"])
    assert 0 < len(expected) < len(PAIRS), "the constraints should filter some combos and keep some"
    assert view["combos_passing"] == len(expected)
    assert view["best"]["params"] == expected[0]["params"]
    assert set(view["best"]["symbols"]) == set(SYMBOLS) and view["best"]["portfolio"]["sleeves"] == 2
    rows = table(client, accepted["optimization_id"], include_filtered="true")
    assert len(rows) == len(PAIRS)
    kept, dropped = rows[: len(expected)], rows[len(expected) :]
    assert [r["params"] for r in kept] == [e["params"] for e in expected]
    assert all(r["passed"] and not r["reasons"] for r in kept)
    assert all(not r["passed"] and r["reasons"] and r["rank"] is None for r in dropped)
    by_params = {(r["params"]["fast"], r["params"]["slow"]): r for r in truth}
    for r in dropped:
        want = by_params[r["params"]["fast"], r["params"]["slow"]]
        assert want["trades"] < 12 or want["max_drawdown_pct"] < -30
        assert close(r["metrics"]["trades"], want["trades"]) and close(r["metrics"]["sharpe"], want["sharpe"])


def test_random_search_is_reproducible_by_seed(
    client: FlaskClient, other_client: FlaskClient, clean_db: Engine
) -> None:
    seed_bars(clean_db, SYMBOLS, days=300, seed=3)
    params = {"fast": {"start": 2, "stop": 30, "step": 1}, "slow": {"start": 5, "stop": 60, "step": 5}}

    def search(c: FlaskClient, seed: int) -> list[dict[str, Any]]:
        accepted = create(
            c, body(parameters=params, search={"method": "random", "budget": 25, "seed": seed}, constraints=[])
        )
        assert accepted["combos"] == 25
        finished(c, accepted["optimization_id"])
        return sorted(table(c, accepted["optimization_id"]), key=lambda r: r["combo_index"])

    first, second, other = search(client, 42), search(other_client, 42), search(client, 43)
    assert [r["params"] for r in first] == [r["params"] for r in second]
    assert [r["metrics"] for r in first] == [r["metrics"] for r in second]
    assert [r["params"] for r in first] != [r["params"] for r in other]


@pytest.fixture
def small_slice_client(settings: Settings, user: ApiUser) -> Iterator[FlaskClient]:
    """The API writing slices of 200 backtests (the worker runs the slices as written)."""
    app = create_app(settings.with_overrides(optimization_slice_backtests=200))
    yield authed_client(app, user)
    app.extensions["alphaforge"].engine.dispose()


def test_cancel_keeps_what_was_scored_and_409_when_final(small_slice_client: FlaskClient, clean_db: Engine) -> None:
    client = small_slice_client
    seed_bars(clean_db, SYMBOLS, days=500, seed=9)
    doc = body(
        strategy="rsi_reversion",
        symbols=SYMBOLS,
        symbol=None,
        parameters={
            "period": {"start": 5, "stop": 40, "step": 1},
            "lower": {"start": 10, "stop": 45, "step": 5},
            "upper": {"start": 55, "stop": 90, "step": 5},
        },
        constraints=[],
    )
    del doc["symbol"]
    accepted = create(client, doc)
    oid = accepted["optimization_id"]
    assert accepted["shards"] > 2
    cancelled = client.post(f"{OPT}/{oid}/cancel")
    assert cancelled.status_code == 200, cancelled.get_data(as_text=True)
    assert cancelled.get_json()["status"] == "cancelled"
    assert client.post(f"{OPT}/{oid}/cancel").status_code == 409
    deadline = time.monotonic() + 60
    with make_session_factory(clean_db)() as session:
        while True:
            statuses = set(session.scalars(select(JobShard.status).where(JobShard.job_id == oid)))
            session.expire_all()
            if not statuses & {"queued", "running"} or time.monotonic() > deadline:
                break
            time.sleep(0.3)
        assert session.scalar(select(Job.status).where(Job.id == oid)) == "cancelled"
    view = client.get(f"{OPT}/{oid}").get_json()
    assert view["status"] == "cancelled"
    assert view["progress"]["combos_done"] < view["progress"]["combos_total"]
    # /api/jobs/<id> weighs the finished slices by their work (combos x symbols), as the run view weighs tasks
    with make_session_factory(clean_db)() as session:
        slices = session.execute(select(JobShard.task, JobShard.status).where(JobShard.job_id == oid)).all()
    done = sum(t["work"] for t, status in slices if status in ("succeeded", "failed"))
    total = sum(t["work"] for t, _ in slices)
    job = client.get(f"/api/jobs/{oid}").get_json()
    assert job["progress"]["percent"] == round(100.0 * done / total, 2) < 100.0
    # a worker computes the cancelled optimisation's outcome from what was scored (the view only reads it)
    deadline = time.monotonic() + 60
    with make_session_factory(clean_db)() as session:
        query = select(Job.finalized_at, Optimization.outcome).join(Optimization, Optimization.job_id == Job.id)
        while (row := session.execute(query.where(Job.id == oid)).one()).finalized_at is None:
            assert time.monotonic() < deadline, "the cancelled optimisation was not finalized within 60 s"
            session.expire_all()
            time.sleep(0.1)
    assert row.outcome is not None and row.outcome["status"] == "cancelled"
    view = client.get(f"{OPT}/{oid}").get_json()
    assert view["combos_passing"] == row.outcome["combos_passing"] and view["best"] == row.outcome["best"]


@pytest.mark.parametrize(
    ("change", "field"),
    [
        ({"parameters": {"fast": [5], "speed": [3]}}, "parameters.speed"),
        ({"parameters": {"fast": {"start": 9, "stop": 3, "step": 1}}}, "parameters.fast"),
        ({"parameters": {"fast": [2.5]}}, "parameters.fast"),
        ({"parameters": {"fast": [0, 1]}}, "parameters.fast"),
        ({"parameters": {"fast": [50], "slow": [10]}}, "parameters"),
        (
            {
                "parameters": {
                    "fast": {"start": 1, "stop": 300, "step": 1},
                    "slow": {"start": 2, "stop": 301, "step": 1},
                }
            },
            "parameters",
        ),
        ({"objective": {"metric": "alpha"}}, "objective.metric"),
        ({"objective": {"metric": "sharpe", "direction": "up"}}, "objective.direction"),
        ({"constraints": [{"metric": "max_drawdown_pct", "op": ">=", "value": 5}]}, "constraints[0]"),
        (
            {
                "constraints": [
                    {"metric": "trades", "op": ">=", "value": 20},
                    {"metric": "trades", "op": "<", "value": 10},
                ]
            },
            "constraints[1]",
        ),
        ({"constraints": [{"metric": "calmar", "op": ">=", "value": 1}]}, "constraints[0].metric"),
        ({"search": {"method": "random", "budget": 10_000_000, "seed": 1}}, "search.budget"),
        ({"search": {"method": "random", "budget": 0, "seed": 1}}, "search.random.budget"),
        ({"strategy": "moon"}, "strategy"),
        ({"parameters": None}, "parameters"),
        ({"walk_forward": {"in_sample": 5000, "out_of_sample": 50}}, "walk_forward.in_sample"),
    ],
)
def test_bad_input_is_a_422_naming_the_field(
    client: FlaskClient, clean_db: Engine, change: dict[str, Any], field: str
) -> None:
    seed_bars(clean_db, SYMBOLS[:1], days=200, seed=1)
    doc = body()
    doc.update(change)
    if doc.get("parameters") is None:
        del doc["parameters"]
    response = client.post(OPT, json=doc)
    assert response.status_code == 422, response.get_data(as_text=True)
    fields = [e["field"] for e in response.get_json()["error"]["details"]["errors"]]
    assert any(f == field or f.startswith(field) for f in fields), fields


def test_walk_forward_never_uses_out_of_sample_bars(client: FlaskClient, clean_db: Engine) -> None:
    """Two symbols share their bars up to the second window's out-of-sample start and differ after it (B then
    rewards whichever pair a peeking choice would love: a steady trend with a slow sine). Choices and in-sample
    scores of the windows whose in-sample ends before the change are identical; later ones see the change."""
    rows = seed_bars(clean_db, ["WFA"], days=420, seed=21)["WFA"]
    in_sample, out_of_sample = 150, 60
    change_at = in_sample + out_of_sample  # first bar of window 1's out-of-sample
    altered = []
    for i, r in enumerate(rows):
        row = {**r, "symbol": "WFB"}
        if i >= change_at:
            k = i - change_at
            base = rows[change_at - 1]["close"] * (1 + 0.004 * k) * (1 + 0.08 * math.sin(k / 6))
            row.update(open=base * 0.999, close=base, high=base * 1.01, low=base * 0.98)
        altered.append(row)
    with clean_db.begin() as conn:
        conn.execute(insert(Symbol), [{"symbol": "WFB", "is_synthetic": True}])
        copy_bars(conn, altered)
    wf = {"in_sample": in_sample, "out_of_sample": out_of_sample}
    views = []
    for symbol in ("WFA", "WFB"):
        accepted = create(client, body(symbol=symbol, walk_forward=wf, constraints=[]))
        views.append(finished(client, accepted["optimization_id"]))
    a, b = (v["walk_forward"] for v in views)
    assert len(a["windows"]) == len(b["windows"]) == 5  # in-sample ends at bars 150, 210, ..., 390 of 420
    assert len(a["parameter_path"]) == 5 and all(p is not None for p in a["parameter_path"])
    for w in (0, 1):  # in-sample ends before the change
        assert a["windows"][w]["chosen"] == b["windows"][w]["chosen"]
        assert a["windows"][w]["in_sample_metrics"] == b["windows"][w]["in_sample_metrics"]
        assert a["windows"][w]["in_sample"] == b["windows"][w]["in_sample"]
    assert a["windows"][0]["out_of_sample_return_pct"] == b["windows"][0]["out_of_sample_return_pct"]
    assert a["windows"][2]["in_sample_metrics"] != b["windows"][2]["in_sample_metrics"]
    # the stitched equity covers exactly the out-of-sample dates, compounding the windows
    dates = a["equity"]["dates"]
    assert dates[0] == a["windows"][0]["out_of_sample"][0] and dates[-1] == a["windows"][-1]["out_of_sample"][1]
    assert dates == sorted(set(dates))
    total = math.prod(1 + w["out_of_sample_return_pct"] / 100 for w in a["windows"])
    assert math.isclose(a["out_of_sample_return_pct"], (total - 1) * 100, rel_tol=1e-9)
    assert all(s in FINAL for s in (views[0]["status"], views[1]["status"]))


SCRIPT_DUAL_SMA = """
import ta
fast = ta.sma(close, params['fast'])
slow = ta.sma(close, params['slow'])
entries = ta.crossover(fast, slow)
exits = ta.crossunder(fast, slow)
warmup = params['slow'] - 1
"""
SCRIPT_PARAMETERS = {
    "fast": {"type": "int", "default": 10, "min": 1, "max": 500},
    "slow": {"type": "int", "default": 20, "min": 2, "max": 500},
    "unused": {"type": "bool", "default": False},
}


def test_a_script_strategy_optimises_like_the_built_in(client: FlaskClient, clean_db: Engine) -> None:
    """A saved script reimplementing dual SMA (long-only): each combo runs in the sandbox, then the engine; its
    table equals the built-in's over the same grid (fast < slow there: a script has no cross-parameter rule)."""
    seed_bars(clean_db, SYMBOLS, days=300, seed=4)
    saved = client.post(
        "/api/custom-calculations/scripts",
        json={"name": "sma", "code": SCRIPT_DUAL_SMA, "kind": "strategy", "parameters": SCRIPT_PARAMETERS},
    )
    assert saved.status_code == 201, saved.get_data(as_text=True)
    script_id = saved.get_json()["script_id"]
    grid = {"fast": [3, 5, 8], "slow": [20, 30]}
    common = {"symbols": SYMBOLS, "execution": {"fee_bps": 10}, "parameters": grid, "constraints": []}
    doc = body(**common, strategy={"name": "script", "script_id": script_id})
    del doc["symbol"]
    scripted = create(client, doc)
    built_in_doc = body(**common)
    del built_in_doc["symbol"]
    built_in = create(client, built_in_doc)
    got, want = finished(client, scripted["optimization_id"]), finished(client, built_in["optimization_id"])
    assert got["status"] == "succeeded", got
    assert got["spec"]["config"]["strategy"]["version"] == 1  # pinned at submission
    assert got["best"]["params"] == want["best"]["params"]
    assert got["best"]["symbols"] == want["best"]["symbols"]
    got_rows = table(client, scripted["optimization_id"])
    want_rows = table(client, built_in["optimization_id"])
    assert [r["params"] for r in got_rows] == [r["params"] for r in want_rows]
    for g, w in zip(got_rows, want_rows, strict=True):  # run_backtest's metrics vs the grid kernel's: to the ulp
        assert all(close(g["metrics"][k], w["metrics"][k]) for k in w["metrics"]), (g, w)
    # bounds: a bool parameter, a value outside the declaration, an undeclared name; too many combos
    for parameters, field in (
        ({"unused": [0, 1]}, "parameters.unused"),
        ({"fast": [0, 3]}, "parameters.fast"),
        ({"speed": [1]}, "parameters.speed"),
        ({"fast": {"start": 1, "stop": 100, "step": 1}, "slow": {"start": 101, "stop": 110, "step": 1}}, "parameters"),
    ):
        bad = {**doc, "parameters": parameters}
        response = client.post(OPT, json=bad)
        assert response.status_code == 422, response.get_data(as_text=True)
        assert response.get_json()["error"]["details"]["errors"][0]["field"] == field


def test_script_combo_bound_and_slice_size_are_settings(
    settings: Settings, user: ApiUser, client: FlaskClient, clean_db: Engine
) -> None:
    """ALPHAFORGE_MAX_SCRIPT_COMBOS bounds a script strategy's combos (a 422 naming the field above it) and
    ALPHAFORGE_SCRIPT_OPTIMIZATION_SLICE is the combos per slice."""
    env = {"ALPHAFORGE_MAX_SCRIPT_COMBOS": "7", "ALPHAFORGE_SCRIPT_OPTIMIZATION_SLICE": "3"}
    from_env = Settings.from_env(env)
    assert (from_env.max_script_combos, from_env.script_optimization_slice_combos) == (7, 3)
    assert {k: from_env.child_env()[k] for k in env} == env
    assert (Settings.from_env({}).max_script_combos, Settings.from_env({}).script_optimization_slice_combos) == (
        200,
        10,
    )
    seed_bars(clean_db, SYMBOLS[:1], days=200, seed=4)
    saved = client.post(
        "/api/custom-calculations/scripts",
        json={"name": "sma", "code": SCRIPT_DUAL_SMA, "kind": "strategy", "parameters": SCRIPT_PARAMETERS},
    )
    assert saved.status_code == 201, saved.get_data(as_text=True)
    app = create_app(settings.with_overrides(max_script_combos=5, script_optimization_slice_combos=2))
    try:
        bounded = authed_client(app, user)
        strategy = {"name": "script", "script_id": saved.get_json()["script_id"]}
        doc = body(strategy=strategy, constraints=[], parameters={"fast": [3, 5, 8], "slow": [20, 30]})  # 6 combos
        for change, field in (
            ({}, "parameters"),
            ({"search": {"method": "random", "budget": 6, "seed": 1}}, "search.budget"),
        ):
            response = bounded.post(OPT, json={**doc, **change})
            assert response.status_code == 422, response.get_data(as_text=True)
            error = response.get_json()["error"]
            assert error["details"]["errors"][0]["field"] == field
            assert "at most 5" in error["message"] and "ALPHAFORGE_MAX_SCRIPT_COMBOS" in error["message"]
        accepted = create(bounded, {**doc, "parameters": {"fast": [3, 5, 8], "slow": [20]}})  # 3 combos: 2 slices
        assert accepted["combos"] == 3 and accepted["shards"] == 2
        view = finished(bounded, accepted["optimization_id"])
        assert view["status"] == "succeeded" and view["progress"]["combos_done"] == 3, view
        assert create(client, {**doc, "parameters": {"fast": [3, 5, 8, 9], "slow": [20, 30]}})["shards"] == 1
    finally:
        app.extensions["alphaforge"].engine.dispose()


def test_an_optimisation_calls_back_when_it_ends(
    hook_client: FlaskClient, client: FlaskClient, clean_db: Engine, receiver: Receiver
) -> None:
    """``callback_url`` as for runs (the same SSRF checks, a 422 naming the field); the worker that ends the last
    slice starts the delivery: ``optimization.finished`` with the optimisation's links."""
    seed_bars(clean_db, SYMBOLS[:1], days=300, seed=4)
    doc = body(parameters={"fast": [3, 5], "slow": [20, 30]})
    refused = client.post(OPT, json={**doc, "callback_url": receiver.url})  # private targets not allowed here
    assert refused.status_code == 422 and "non-public" in refused.get_data(as_text=True), refused.json
    bad = hook_client.post(OPT, json={**doc, "callback_url": 42})
    assert bad.status_code == 422, bad.json
    assert [e["field"] for e in bad.get_json()["error"]["details"]["errors"]] == ["callback_url"]

    oid = create(hook_client, {**doc, "callback_url": receiver.url})["optimization_id"]
    view = finished(hook_client, oid)
    deadline = time.monotonic() + 15
    while not receiver.received:
        assert time.monotonic() < deadline, "no webhook within 15 s of the optimisation's end"
        time.sleep(0.05)
    (got,) = receiver.received
    summary = verify_signature(hook_client.get("/api/auth/webhook-secret").get_json()["secret"], got)
    assert got["headers"]["X-AlphaForge-Event"] == "optimization.finished" == summary["event"]
    assert summary["job_id"] == oid and summary["kind"] == "optimization" and summary["status"] == view["status"]
    assert summary["links"] == {
        "self": f"{OPT}/{oid}",
        "results": f"{OPT}/{oid}/results",
        "artifacts": f"{OPT}/{oid}/artifacts",
        "job": f"/api/jobs/{oid}",
    }
    job = hook_client.get(f"/api/jobs/{oid}").get_json()
    assert job["callback"]["url"] == receiver.url and job["callback"]["state"] in ("pending", "delivered")
    assert hook_client.get(f"{OPT}/{oid}").get_json()["callback"]["url"] == receiver.url


def test_an_optimisation_cancelled_with_no_slice_running_calls_back(
    hook_client: FlaskClient, clean_db: Engine, receiver: Receiver
) -> None:
    """No slice task was ever published: the cancel itself starts the delivery (and the outcome)."""
    seed_bars(clean_db, SYMBOLS[:1], days=300, seed=4)
    app = hook_client.application
    factory = app.extensions["alphaforge"].session_factory
    doc = body(parameters={"fast": [3, 5], "slow": [20, 30]})
    spec, _ = spec_from_body(doc)
    with factory() as session:
        owner_id = session.scalar(select(User.id).where(User.username == "hooker"))
    submitted = submit.submit(
        factory,
        OptimizationRequest(spec=spec, owner_id=owner_id, callback_url=receiver.url),
        Limits(1000, 100_000, 2_500),
        enqueue=lambda tasks: None,  # queued, its slices' tasks never sent
    )
    oid = str(submitted.job.id)
    cancelled = hook_client.post(f"{OPT}/{oid}/cancel")
    assert cancelled.status_code == 200 and cancelled.get_json()["status"] == "cancelled", cancelled.json
    deadline = time.monotonic() + 15
    while not receiver.received:
        assert time.monotonic() < deadline, "no webhook within 15 s of the cancel"
        time.sleep(0.05)
    summary = verify_signature(hook_client.get("/api/auth/webhook-secret").get_json()["secret"], receiver.received[0])
    assert summary["event"] == "optimization.finished" and summary["status"] == "cancelled"
    # the cancel's follow-up task (alphaforge.optimizations.finish): a worker finalizes it, then writes its artifacts
    listing = artifacts_listing(hook_client, oid)
    assert "optimization.json" in {f["name"] for f in listing["files"]}
    with factory() as session:
        row = session.execute(
            select(Job.finalized_at, Optimization.outcome)
            .join(Optimization, Optimization.job_id == Job.id)
            .where(Job.id == submitted.job.id)
        ).one()
    assert row.finalized_at is not None and row.outcome is not None
    assert row.outcome["status"] == "cancelled" and row.outcome["combos_scored"] == 0
