"""What jobs read, end to end (real PostgreSQL, Redis and worker): timeframes stored and resampled, adjustment for
corporate actions, ISO timestamps in scripts, data versions moved by actions, and the Parquet directory provider."""

from __future__ import annotations

import datetime as dt
import os
import zoneinfo
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from flask.testing import FlaskClient
from sqlalchemy import Engine

from shared.marketdata import providers, store
from shared.marketdata.actions import import_actions
from shared.marketdata.bars import load_bars
from shared.marketdata.resample import resample
from shared.marketdata.series import Columns
from tests.helpers import all_results, seed_bars, wait_for_job

ZONE = "America/New_York"


def _minutes(days: int, seed: int) -> Columns:
    """Regular-session 1-minute bars (09:30-16:00 New York) on ``days`` weekdays from 2024-03-04 (across the clock
    change of 2024-03-10)."""
    rng = np.random.default_rng(seed)
    stamps: list[int] = []
    day = dt.date(2024, 3, 4)
    while len(stamps) < days * 390:
        if day.weekday() < 5:
            opening = dt.datetime.combine(day, dt.time(9, 30), tzinfo=zoneinfo.ZoneInfo(ZONE))
            stamps += [int(opening.timestamp()) + 60 * k for k in range(390)]
        day += dt.timedelta(days=1)
    n = len(stamps)
    close = 50 * np.exp(np.cumsum(rng.normal(0, 5e-4, n)))
    return store.columns_of(stamps, close, close * 1.001, close * 0.999, close, rng.integers(1, 1000, n))


def _submit(client: FlaskClient, **body: Any) -> dict[str, Any]:
    response = client.post("/api/custom-calculations/execute", json=body)
    assert response.status_code == 202, response.get_json()
    return wait_for_job(client, response.get_json()["job_id"])


def _values(client: FlaskClient, job: dict[str, Any]) -> dict[str, Any]:
    assert job["status"] == "succeeded", job
    return {row["symbol"]: row["value"] for row in all_results(client, job["job_id"])}


def test_a_calculation_reads_stored_and_resampled_timeframes_with_iso_timestamps(
    clean_db: Engine, client: FlaskClient, celery_worker: Any
) -> None:
    minutes = _minutes(6, seed=1)
    store.import_columns(clean_db, "1m", {"MIN": minutes})
    script = "result = len(close) * 1e6 + close[-1] if dates[-1].endswith('Z') and 'T' in dates[-1] else -1"
    found = {}
    for timeframe in ("1m", "5m", "1h", "1d", "1w"):
        job = _submit(client, script=script, column_name="c", stock_symbols=["MIN"], timeframe=timeframe,
                      adjustment="none")  # fmt: skip
        assert job["reproducibility"]["timeframe"] == timeframe
        found[timeframe] = _values(client, job)["MIN"]
    assert found["1m"] == len(minutes) * 1e6 + minutes.close[-1]
    for timeframe in ("5m", "1h"):
        expected = resample(minutes, "1m", timeframe, ZONE)
        assert found[timeframe] == len(expected) * 1e6 + expected.close[-1]
    assert found["1d"] == found["1w"] == -1  # daily and coarser bars carry ISO dates
    daily = _submit(client, script="result = len(close)", column_name="c", stock_symbols=["MIN"], timeframe="1d")
    assert _values(client, daily)["MIN"] == 6  # six sessions, each its local date


def test_a_split_adjusts_what_jobs_read_and_moves_the_data_version(
    clean_db: Engine, client: FlaskClient, celery_worker: Any, tmp_path: Path
) -> None:
    rows = seed_bars(clean_db, ["SPL"], days=60)
    split_day = rows["SPL"][30]["date"]
    body = {"symbols": ["SPL"], "strategy": {"name": "dual_sma", "params": {"fast": 5, "slow": 20}}}
    first = client.post("/api/runs", json=body)
    assert first.status_code == 202, first.get_json()
    script = "result = close[0]"
    as_traded = _values(client, _submit(client, script=script, column_name="c", stock_symbols=["SPL"],
                                        adjustment="none"))["SPL"]  # fmt: skip

    (tmp_path / "actions.csv").write_text(f"symbol,date,action,value\nSPL,{split_day.isoformat()},split,4\n")
    import_actions(clean_db, tmp_path / "actions.csv")
    for adjustment, expected in (("none", as_traded), ("splits", as_traded / 4), ("total_return", as_traded / 4)):
        job = _submit(client, script=script, column_name="c", stock_symbols=["SPL"], adjustment=adjustment)
        assert job["reproducibility"]["adjustment"] == adjustment
        assert _values(client, job)["SPL"] == pytest.approx(expected, rel=1e-15)
    default = _submit(client, script=script, column_name="c", stock_symbols=["SPL"])
    assert default["reproducibility"]["adjustment"] == "splits"

    second = client.post("/api/runs", json=body)  # the same config on adjusted prices that changed: a new run
    assert second.status_code == 202 and second.headers["Idempotent-Replayed"] == "false", second.get_json()
    assert second.get_json()["run_id"] != first.get_json()["run_id"]
    again = client.post("/api/runs", json=body)
    assert again.status_code == 200 and again.get_json()["run_id"] == second.get_json()["run_id"]


def test_runs_and_optimisations_take_weekly_and_intraday_bars(
    clean_db: Engine, client: FlaskClient, celery_worker: Any
) -> None:
    seed_bars(clean_db, ["WK"], days=300)
    store.import_columns(clean_db, "1m", {"INTRA": _minutes(8, seed=2)})
    strategy = {"name": "dual_sma", "params": {"fast": 3, "slow": 8}}
    universe = client.post("/api/universes", json={"name": "weekly", "symbols": ["WK"], "timeframe": "1w"})
    assert universe.status_code == 201, universe.get_json()
    weekly = client.post("/api/runs", json={"universe": "weekly", "strategy": strategy})  # the universe's timeframe
    hourly = client.post("/api/runs", json={"symbols": ["INTRA", "WK"], "strategy": strategy, "timeframe": "1h"})
    assert weekly.status_code == hourly.status_code == 202, (weekly.get_json(), hourly.get_json())
    bad = client.post("/api/runs", json={"symbols": ["WK"], "strategy": strategy, "timeframe": "2h"})
    assert bad.status_code == 422 and "timeframe" in bad.get_json()["error"]["message"]
    for as_of in (123, "2024-13-01", "20240101", ["2024-01-01"]):
        refused = client.post("/api/runs", json={"symbols": ["WK"], "strategy": strategy, "as_of": as_of})
        assert refused.status_code == 422, (as_of, refused.get_json())
        assert refused.get_json()["error"]["details"]["errors"][0]["field"] == "as_of"

    views = {name: wait_for_job(client, r.get_json()["run_id"]) for name, r in (("weekly", weekly), ("hourly", hourly))}
    assert views["weekly"]["status"] == "succeeded", views["weekly"]
    assert client.get(f"/api/runs/{weekly.get_json()['run_id']}").get_json()["config"]["timeframe"] == "1w"
    assert views["hourly"]["status"] == "partial", views["hourly"]  # WK has no intraday bars: its NoData error
    page = client.get(f"/api/runs/{hourly.get_json()['run_id']}/results").get_json()
    results = {row["symbol"]: row for row in page["results"]}
    assert results["WK"]["error"]["type"] == "NoData"
    metrics = results["INTRA"]["metrics"]
    assert metrics["# Trades"] > 0 and metrics["Start"].endswith("Z") and "T" in metrics["Start"], metrics
    artifacts = client.get(f"/api/runs/{hourly.get_json()['run_id']}/artifacts")
    assert artifacts.status_code == 200, artifacts.get_json()

    optimisation = client.post("/api/optimizations", json={
        "symbols": ["INTRA"], "strategy": "dual_sma", "timeframe": "1h",
        "parameters": {"fast": [2, 3], "slow": [6, 8]},
    })  # fmt: skip
    assert optimisation.status_code == 202, optimisation.get_json()
    done = wait_for_job(client, optimisation.get_json()["optimization_id"])
    assert done["status"] == "succeeded", done


def test_the_parquet_directory_provider_reads_in_place_what_the_store_holds(clean_db: Engine, tmp_path: Path) -> None:
    minutes = _minutes(2, seed=3)
    store.import_columns(clean_db, "1m", {"PQ": minutes})
    (tmp_path / "1m").mkdir()
    stamps = pa.array(minutes.ts * 1_000_000, pa.timestamp("us", tz="UTC"))
    columns = {"timestamp": stamps} | {k: getattr(minutes, k) for k in ("open", "high", "low", "close", "volume")}
    pq.write_table(pa.table(columns), tmp_path / "1m" / "PQ.parquet")
    start, end = dt.date(2024, 3, 5), dt.date(2024, 3, 5)
    with clean_db.connect() as conn:
        from_store = load_bars(conn, ["PQ"], start, end, timeframe="1h")["PQ"]
        provider = providers.configure("parquet", tmp_path)
        try:
            from_files = load_bars(conn, ["PQ"], start, end, timeframe="1h")["PQ"]
            assert providers.current() is provider
            version = from_files.version
            stat = (tmp_path / "1m" / "PQ.parquet").stat()  # a rewritten file is a new version
            os.utime(tmp_path / "1m" / "PQ.parquet", ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))
            assert load_bars(conn, ["PQ"], start, end, timeframe="1h")["PQ"].version != version
        finally:
            providers.configure("store")
    assert from_files.ts.tobytes() == from_store.ts.tobytes() and len(from_files) == 7
    assert all(getattr(from_files, k).tobytes() == getattr(from_store, k).tobytes() for k in ("open", "close"))


def test_a_shard_reads_its_bars_in_batches_of_bounded_bars(clean_db: Engine) -> None:
    from sqlalchemy.orm import sessionmaker

    from shared.marketdata.bars import bar_batches, batches

    store.import_columns(clean_db, "1m", {"M1": _minutes(1, seed=4), "M2": _minutes(2, seed=5)})
    seed_bars(clean_db, ["D1", "D2", "D3"], days=100)
    symbols = ["M1", "D1", "M2", "NONE", "D2", "D3"]
    with clean_db.connect() as conn:
        assert batches(conn, symbols, "1m", max_bars=500) == [["M1", "D1"], ["M2", "NONE", "D2", "D3"]]
        # at 1d the minute symbols weigh their minutes (their daily bars are resampled from them)
        assert batches(conn, symbols, "1d", max_bars=150) == [["M1"], ["D1"], ["M2", "NONE"], ["D2"], ["D3"]]
        assert batches(conn, symbols, "1d", max_bars=10**6) == [symbols]
        whole = load_bars(conn, symbols, None, None, timeframe="1h")
    read = list(bar_batches(sessionmaker(clean_db), symbols, None, None, timeframe="1h", adjustment="none",
                            max_bars=400))  # fmt: skip
    assert [group for group, _ in read] == [["M1", "D1"], ["M2", "NONE", "D2", "D3"]]
    got = {s: b for _, bars in read for s, b in bars.items()}
    assert got.keys() == whole.keys() == {"M1", "M2"}  # daily symbols have no hourly (or finer) bars
    assert all(got[s].close.tobytes() == whole[s].close.tobytes() for s in got)


def test_candles_preview_pages_intraday_and_resampled_bars(clean_db: Engine, client: FlaskClient) -> None:
    minutes = _minutes(3, seed=6)
    store.import_columns(clean_db, "1m", {"PRV": minutes})
    hourly = resample(minutes, "1m", "1h", ZONE)
    seen: list[dict[str, Any]] = []
    cursor = None
    while True:
        url = "/api/candles?symbol=PRV&timeframe=1h&adjustment=none&limit=5&start=2024-03-05"
        page = client.get(url + (f"&cursor={cursor}" if cursor else "")).get_json()
        seen += page["candles"]
        cursor = page["next_cursor"]
        if not cursor:
            break
    expected = hourly.between(int(dt.datetime(2024, 3, 5, 5, tzinfo=dt.UTC).timestamp()), None)
    assert [c["close"] for c in seen] == expected.close.tolist() and len(seen) == 14  # two sessions of 7 buckets
    assert seen[0]["date"] == "2024-03-05T14:00:00Z"  # 09:30 New York falls in the 09:00 bucket
    bad = client.get("/api/candles?symbol=PRV&timeframe=2h")
    assert bad.status_code == 422 and "timeframe" in bad.get_json()["error"]["message"]
