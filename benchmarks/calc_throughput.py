"""Calculation throughput: the real API and Celery workers against a plain Python loop, same run.

    .venv/bin/python -m benchmarks.calc_throughput [--symbols 1000] [--bars 2520] [--rounds 3]

Loads a seeded synthetic universe into a fresh database (embedded PostgreSQL and Redis unless
ALPHAFORGE_BENCH_DATABASE_URL / ALPHAFORGE_BENCH_REDIS_URL name servers), starts gunicorn and one
Celery worker (concurrency = ALPHAFORGE_WORKER_CONCURRENCY, default 2), then alternates:

* system: POST the job over HTTP, poll until it is final (submit -> last shard stored);
* reference: the same script as plain Python (no RestrictedPython, no sandbox process), in this
  one process, over the same bars loaded from the same database with the same query.

It prints symbol-evaluations per second and the ratio system / reference (median of rounds);
machines here are shared and noisy, so only the ratio measured within one run is meaningful.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import math
import os
import secrets
import statistics
import sys
import time
import urllib.request
from pathlib import Path
from typing import Any

import polars as pl
from sqlalchemy import Engine, text

from benchmarks.row_loader import create_row_table, row_loader
from benchmarks.stack import bench_stack, write_parquet
from shared.accounts import users
from shared.infra.config import Settings
from shared.infra.db import make_engine, make_session_factory, session_scope
from shared.marketdata import store
from shared.marketdata.bars import SymbolBars, load_bars
from shared.marketdata.demo import load_demo_universe
from shared.marketdata.series import day_ts
from shared.ops.embedded import free_tcp_port
from shared.ops.launcher import child_commands
from shared.sandbox.runner import run_script

SMA_SCRIPT = """
n = params["n"]
window_sum = 0.0
above = 0
for i in range(len(close)):
    window_sum += close[i]
    if i >= n:
        window_sum -= close[i - n]
    if i >= n - 1 and close[i] > window_sum / n:
        above += 1
result = above / (len(close) - n + 1)
"""
PARAMS = {"n": 20}
PASSWORD = "benchmark passphrase"


TOKEN: dict[str, str] = {}  # the benchmark account's bearer token, once logged in


def http(method: str, url: str, body: dict[str, Any] | None = None) -> dict[str, Any]:
    data = json.dumps(body).encode() if body is not None else None
    headers = {"Content-Type": "application/json"}
    if TOKEN:
        headers["Authorization"] = f"Bearer {TOKEN['access']}"
    request = urllib.request.Request(url, data=data, method=method, headers=headers)
    with urllib.request.urlopen(request, timeout=30) as response:
        result: dict[str, Any] = json.loads(response.read())
        return result


def wait_http(url: str, timeout_s: float = 60) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            if http("GET", url)["status"] == "ok":
                return
        except OSError:
            pass
        time.sleep(0.2)
    raise RuntimeError(f"{url} did not report ok within {timeout_s} s")


def run_system(base: str, symbols: list[str], start: str) -> tuple[float, dict[str, Any]]:
    began = time.perf_counter()
    accepted = http("POST", f"{base}/custom-calculations/execute", {
        "script": SMA_SCRIPT, "column_name": "pct_above_sma20", "stock_symbols": symbols,
        "start_date": start, "params": PARAMS,
    })  # fmt: skip
    while True:
        job = http("GET", f"{base}/jobs/{accepted['job_id']}")
        if job["status"] in {"succeeded", "partial", "failed", "cancelled"}:
            return time.perf_counter() - began, job
        time.sleep(0.05)


def fetch_values(base: str, job_id: str) -> dict[str, float]:
    values: dict[str, float] = {}
    cursor = ""
    while True:
        page = http("GET", f"{base}/jobs/{job_id}/results?limit=1000" + (f"&cursor={cursor}" if cursor else ""))
        values.update({row["symbol"]: row["value"] for row in page["results"]})
        cursor = page["next_cursor"]
        if not cursor:
            return values


Columns6 = tuple[Any, ...]  # (dates, open, high, low, close, volume): sequences of one symbol's bars


def plain_compute(bars: dict[str, Columns6]) -> dict[str, float]:
    """The script as plain Python: no RestrictedPython, no sandbox process. ``bars``: per symbol (dates, open,
    high, low, close, volume)."""
    code = compile(SMA_SCRIPT, "<reference>", "exec")
    values: dict[str, float] = {}
    for symbol, (dates, o, h, lo, c, v) in bars.items():
        namespace: dict[str, Any] = {
            "open": tuple(o), "high": tuple(h), "low": tuple(lo), "close": tuple(c), "volume": tuple(v),
            "dates": dates, "symbol": symbol, "params": dict(PARAMS), "math": math, "statistics": statistics,
        }  # fmt: skip
        exec(code, namespace)
        values[symbol] = namespace["result"]
    return values


def columns6(bars: dict[str, SymbolBars]) -> dict[str, Columns6]:
    return {s: (b.dates, b.open, b.high, b.low, b.close, b.volume) for s, b in bars.items()}


def load_all(engine: Engine, symbols: list[str], start: Any) -> dict[str, SymbolBars]:
    store.process_cache().clear()  # a cold read, as a fresh notebook does
    with engine.connect() as conn:
        return load_bars(conn, symbols, start, None)


def run_reference(
    engine: Engine, symbols: list[str], start: Any, loader: str = "store"
) -> tuple[float, float, dict[str, float]]:
    """The plain loop over bars read by the product's read path as a worker reads (``store``) or by the old ``row``
    loader: seconds in all, seconds of that spent loading bars, and the values."""
    began = time.perf_counter()
    if loader == "store":
        read = load_all(engine, symbols, start)
        loaded = time.perf_counter()
        values = plain_compute(columns6(read))  # the ISO dates a script sees are made here, as a worker does
    else:
        with engine.connect() as conn:
            bars = row_loader(conn, symbols, start)  # the old loader made them while it read
        loaded = time.perf_counter()
        values = plain_compute(bars)
    return time.perf_counter() - began, loaded - began, values


def polars_notebook(path: Path, start: dt.date) -> tuple[float, dict[str, float]]:
    """What a quant writes in a notebook: read the Parquet file with polars, the same column in expressions."""
    began = time.perf_counter()
    frame = pl.read_parquet(path).filter(pl.col("ts") >= day_ts(start))
    above = (pl.col("close") > pl.col("close").rolling_mean(PARAMS["n"])).sum()
    out = frame.group_by("symbol", maintain_order=True).agg((above / (pl.len() - PARAMS["n"] + 1)).alias("value"))
    values = dict(zip(out["symbol"].to_list(), out["value"].to_list(), strict=True))
    return time.perf_counter() - began, values


def compute_only(bars: dict[str, SymbolBars], settings: Settings) -> tuple[float, float]:
    """Sandbox overhead without the database: plain compute vs sandboxed compute, one core each."""
    began = time.perf_counter()
    plain_compute(columns6(bars))
    plain = time.perf_counter() - began
    items = list(bars.values())
    began = time.perf_counter()
    for i in range(0, len(items), settings.shard_size):
        run_script(SMA_SCRIPT, PARAMS, items[i : i + settings.shard_size], settings.sandbox)
    return plain, time.perf_counter() - began


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--symbols", type=int, default=1000)
    parser.add_argument("--bars", type=int, default=2520)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()

    with bench_stack("bench") as stack:
        database_url = stack.database_url
        years = math.ceil(args.bars / 250) + 1
        began = time.perf_counter()
        engine = make_engine(database_url, pool_size=1)
        load_demo_universe(engine, symbols=args.symbols, years=years, seed=1)
        print(f"loaded {args.symbols} symbols x {years} years in {time.perf_counter() - began:.1f} s", flush=True)
        with engine.connect() as conn:
            symbols = list(
                conn.scalars(text("SELECT symbol FROM symbols ORDER BY symbol LIMIT :n"), {"n": args.symbols})
            )
            start = load_bars(conn, symbols[:1], None, None)[symbols[0]].days[-args.bars].astype(dt.date)
            universe = {sym: b for sym, b in load_bars(conn, symbols, None, None).items()}
        with session_scope(make_session_factory(engine)) as session:
            users.create_user(session, "bench", PASSWORD)
        create_row_table(engine, {s: store.columns_of(b.ts, b.open, b.high, b.low, b.close, b.volume)
                                  for s, b in universe.items()})  # fmt: skip
        parquet = stack.work / "bars.parquet"
        write_parquet(parquet, universe)
        engine.dispose()
        reader = make_engine(database_url, pool_size=1)
        store.configure(256, copy=True)  # this process reads as a worker does

        port = free_tcp_port()
        settings = Settings.from_env().with_overrides(
            database_url=database_url, redis_url=stack.redis_url, data_dir=stack.work, api_port=port
        )
        env = {**os.environ, **settings.child_env(), "JWT_SECRET_KEY": secrets.token_urlsafe(48)}
        commands = dict(child_commands(settings))
        for name in ("worker", "api"):  # as `up` starts them
            stack.spawn(commands[name], env)
        base = f"http://127.0.0.1:{port}/api"
        wait_http(f"{base}/health")
        login = http("POST", f"{base}/auth/login", {"username": "bench", "password": PASSWORD})
        TOKEN["access"] = login["access_token"]
        run_system(base, symbols[:20], start.isoformat())  # warm-up: connections, imports

        system_times, reference_times, row_times, row_loads, store_loads, polars_times = [], [], [], [], [], []
        for round_no in range(1, args.rounds + 1):
            seconds, job = run_system(base, symbols, start.isoformat())
            assert job["status"] == "succeeded", job
            system_times.append(seconds)
            ref_seconds, load_seconds, expected = run_reference(reader, symbols, start)
            reference_times.append(ref_seconds)
            store_loads.append(load_seconds)
            row_seconds, row_load, from_rows = run_reference(reader, symbols, start, loader="row")
            row_times.append(row_seconds)
            row_loads.append(row_load)
            polars_seconds, from_polars = polars_notebook(parquet, start)
            polars_times.append(polars_seconds)
            got = fetch_values(base, job["job_id"])
            mismatches = [s for s in symbols if not math.isclose(got[s], expected[s], rel_tol=1e-12, abs_tol=1e-15)]
            assert not mismatches, f"values differ from the reference for {mismatches[:5]}"
            assert from_rows == expected, "the row loader's bars gave other values"
            off = sum(1 for s in symbols if abs(from_polars[s] - got[s]) > 1e-9)  # rolling sums round differently
            print(f"round {round_no}: system {seconds:.2f} s, plain loop {ref_seconds:.2f} s "
                  f"(load {load_seconds:.2f} s + compute {ref_seconds - load_seconds:.2f} s), "
                  f"plain loop on the row loader {row_seconds:.2f} s (load {row_load:.2f} s), "
                  f"polars {polars_seconds:.2f} s ({off} values off by > 1e-9), "
                  f"ratio system/plain {seconds / ref_seconds:.2f}", flush=True)  # fmt: skip

        plain_cpu, sandbox_cpu = compute_only(load_all(reader, symbols, start), settings)
        system = statistics.median(system_times)
        reference = statistics.median(reference_times)
        evaluations = len(symbols)
        print(f"\nsymbols={evaluations} bars/symbol={args.bars} shard_size={settings.shard_size} "
              f"worker_concurrency={settings.worker_concurrency} cpus={os.cpu_count()}")  # fmt: skip
        print(f"system:    {system:.2f} s  -> {evaluations / system:,.0f} symbol-evaluations/s")
        print(f"reference: {reference:.2f} s  -> {evaluations / reference:,.0f} symbol-evaluations/s (plain Python)")
        print(f"ratio system/reference: {system / reference:.2f}  (goal <= 2.00)")
        row_load, store_load = statistics.median(row_loads), statistics.median(store_loads)
        polars = statistics.median(polars_times)
        print(f"reading the bars: row loader {row_load:.2f} s, column store {store_load:.2f} s "
              f"({row_load / store_load:.0f}x)")  # fmt: skip
        print(f"system on the row loader (derived: this run's system time with its reading replaced by the row "
              f"loader's, both measured here): {system - store_load + row_load:.2f} s")  # fmt: skip
        print(f"polars notebook (Parquet): {polars:.2f} s; ratio system/polars {system / polars:.1f} (goal <= 10), "
              f"on the row loader {(system - store_load + row_load) / polars:.1f}")  # fmt: skip
        reader.dispose()
        print(
            f"compute only, one core, no database: plain {plain_cpu:.2f} s, sandboxed {sandbox_cpu:.2f} s "
            f"(RestrictedPython + one process per {settings.shard_size} symbols): ratio {sandbox_cpu / plain_cpu:.2f}"
        )
        return 0


if __name__ == "__main__":
    sys.exit(main())
