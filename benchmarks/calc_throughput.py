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
import json
import math
import os
import secrets
import statistics
import sys
import time
import urllib.request
from typing import Any

from sqlalchemy import text

from benchmarks.stack import bench_stack
from shared.accounts import users
from shared.infra.config import Settings
from shared.infra.db import make_engine, make_session_factory, session_scope
from shared.marketdata.bars import SymbolBars, load_bars
from shared.marketdata.demo import load_demo_universe
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


def plain_compute(bars: dict[str, SymbolBars]) -> dict[str, float]:
    """The script as plain Python: no RestrictedPython, no sandbox process."""
    code = compile(SMA_SCRIPT, "<reference>", "exec")
    values: dict[str, float] = {}
    for symbol, b in bars.items():
        namespace: dict[str, Any] = {
            "open": tuple(b.open), "high": tuple(b.high), "low": tuple(b.low), "close": tuple(b.close),
            "volume": tuple(b.volume), "dates": b.dates, "symbol": symbol, "params": dict(PARAMS),
            "math": math, "statistics": statistics,
        }  # fmt: skip
        exec(code, namespace)
        values[symbol] = namespace["result"]
    return values


def load_all(database_url: str, symbols: list[str], start: Any) -> dict[str, SymbolBars]:
    engine = make_engine(database_url, pool_size=1)
    with engine.connect() as conn:
        bars = load_bars(conn, symbols, start, None)
    engine.dispose()
    return bars


def run_reference(database_url: str, symbols: list[str], start: Any) -> tuple[float, float, dict[str, float]]:
    """Seconds in all, seconds of that spent loading bars, and the values."""
    began = time.perf_counter()
    bars = load_all(database_url, symbols, start)
    loaded = time.perf_counter()
    values = plain_compute(bars)
    return time.perf_counter() - began, loaded - began, values


def compute_only(bars: dict[str, SymbolBars], settings: Settings) -> tuple[float, float]:
    """Sandbox overhead without the database: plain compute vs sandboxed compute, one core each."""
    began = time.perf_counter()
    plain_compute(bars)
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
            start = conn.scalar(
                text("SELECT date FROM daily_bars WHERE symbol = :s ORDER BY date DESC OFFSET :k LIMIT 1"),
                {"s": symbols[0], "k": args.bars - 1},
            )
        with session_scope(make_session_factory(engine)) as session:
            users.create_user(session, "bench", PASSWORD)
        engine.dispose()

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

        system_times, reference_times = [], []
        for round_no in range(1, args.rounds + 1):
            seconds, job = run_system(base, symbols, start.isoformat())
            assert job["status"] == "succeeded", job
            system_times.append(seconds)
            ref_seconds, load_seconds, expected = run_reference(database_url, symbols, start)
            reference_times.append(ref_seconds)
            got = fetch_values(base, job["job_id"])
            mismatches = [s for s in symbols if not math.isclose(got[s], expected[s], rel_tol=1e-12, abs_tol=1e-15)]
            assert not mismatches, f"values differ from the reference for {mismatches[:5]}"
            print(f"round {round_no}: system {seconds:.2f} s, plain loop {ref_seconds:.2f} s "
                  f"(load {load_seconds:.2f} s + compute {ref_seconds - load_seconds:.2f} s), "
                  f"ratio {seconds / ref_seconds:.2f}", flush=True)  # fmt: skip

        plain_cpu, sandbox_cpu = compute_only(load_all(database_url, symbols, start), settings)
        system = statistics.median(system_times)
        reference = statistics.median(reference_times)
        evaluations = len(symbols)
        print(f"\nsymbols={evaluations} bars/symbol={args.bars} shard_size={settings.shard_size} "
              f"worker_concurrency={settings.worker_concurrency} cpus={os.cpu_count()}")  # fmt: skip
        print(f"system:    {system:.2f} s  -> {evaluations / system:,.0f} symbol-evaluations/s")
        print(f"reference: {reference:.2f} s  -> {evaluations / reference:,.0f} symbol-evaluations/s (plain Python)")
        print(f"ratio system/reference: {system / reference:.2f}  (goal <= 2.00)")
        print(
            f"compute only, one core, no database: plain {plain_cpu:.2f} s, sandboxed {sandbox_cpu:.2f} s "
            f"(RestrictedPython + one process per {settings.shard_size} symbols): ratio {sandbox_cpu / plain_cpu:.2f}"
        )
        return 0


if __name__ == "__main__":
    sys.exit(main())
