"""The scale run: a large universe imported, then a calculation job and a backtest run over all of it, through the
API and a worker, with wall times and the peak memory of every process of the system.

    .venv/bin/python -m benchmarks.scale_run [--symbols 5000] [--years 10]
    .venv/bin/python -m benchmarks.scale_run --minutes [--symbols 500] [--years 1]

Not part of the default suite (minutes, gigabytes). Daily bars (the demo universe), or with ``--minutes``
1-minute bars of regular New York sessions (390 a day, 252 days a year) written as one Parquet file per symbol and
imported with ``bars import``'s code; the calculation job and the backtest run then read them at 1m.

Peak memory is each process's largest resident set seen while polling every 0.2 s (the worker's pool
processes are where bars are read and cached: ``ALPHAFORGE_BAR_CACHE_MB`` bounds their cache; a run's finalization
and artifact build, in the pool process that completes the run, read its curves a batch of ``ALPHAFORGE_RUN_BATCH_MB``
at a time), until the run's artifacts are written.
"""

from __future__ import annotations

import argparse
import datetime as dt
import os
import secrets
import tempfile
import threading
import time
import zoneinfo
from pathlib import Path
from typing import Any

import numpy as np
import psutil
import pyarrow as pa
import pyarrow.parquet as pq

from benchmarks.calc_throughput import PARAMS, PASSWORD, SMA_SCRIPT, TOKEN, http, wait_http
from benchmarks.stack import bench_stack
from shared.accounts import users
from shared.infra.config import Settings
from shared.infra.db import make_engine, make_session_factory, session_scope
from shared.marketdata.demo import load_demo_universe
from shared.marketdata.table_import import import_path
from shared.ops.embedded import free_tcp_port
from shared.ops.launcher import child_commands

FINAL = {"succeeded", "partial", "failed", "cancelled"}


class PeakMemory:
    """The largest RSS of each process under the given roots (and their children), sampled in a thread."""

    def __init__(self, roots: dict[str, int]) -> None:
        self.roots, self.peaks, self._stop = roots, dict[str, int](), threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> PeakMemory:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()

    def _run(self) -> None:
        while not self._stop.wait(0.2):
            for name, pid in self.roots.items():
                try:
                    root = psutil.Process(pid)
                    for proc in [root, *root.children(recursive=True)]:
                        label = (name if proc.pid == pid else f"{name} pool process {proc.pid}"
                                 if proc.ppid() == pid else f"{name}'s sandbox processes (largest)")  # fmt: skip
                        self.peaks[label] = max(self.peaks.get(label, 0), proc.memory_info().rss)
                except psutil.Error:
                    continue


def wait_final(base: str, path: str) -> dict[str, Any]:
    while True:
        view = http("GET", f"{base}/{path}")
        if view["status"] in FINAL:
            return view
        time.sleep(0.2)


def session_minutes(years: int) -> np.ndarray:
    """Epoch seconds of every minute bar of ``years`` x 252 regular New York sessions from 2024-01-02."""
    zone, day, opens = zoneinfo.ZoneInfo("America/New_York"), dt.date(2024, 1, 2), list[int]()
    while len(opens) < 252 * years:
        if day.weekday() < 5:
            opens.append(int(dt.datetime.combine(day, dt.time(9, 30), tzinfo=zone).timestamp()))
        day += dt.timedelta(days=1)
    return (np.asarray(opens, dtype=np.int64)[:, None] + 60 * np.arange(390)).ravel()


def write_minute_files(folder: Path, symbols: list[str], years: int) -> int:
    """One ``SYMBOL.parquet`` of random-walk minute bars per symbol; the number of bars written."""
    ts = pa.array(session_minutes(years) * 1_000_000, pa.timestamp("us", tz="UTC"))
    rng = np.random.default_rng(5)
    for symbol in symbols:
        close = 50 * np.exp(np.cumsum(rng.normal(0, 4e-4, len(ts))))
        wick = np.abs(rng.normal(0, 2e-4, len(ts)))
        pq.write_table(pa.table({
            "timestamp": ts, "open": close * (1 - wick / 2), "high": close * (1 + wick), "low": close * (1 - wick),
            "close": close, "volume": rng.integers(100, 10_000, len(ts)).astype(np.float64),
        }), folder / f"{symbol}.parquet")  # fmt: skip
    return len(ts) * len(symbols)


def wait_artifacts(base: str, run_id: str) -> dict[str, Any]:
    while True:
        view = http("GET", f"{base}/runs/{run_id}/artifacts")
        if view["status"] != "pending":
            return view
        time.sleep(0.2)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--symbols", type=int, default=None, help="default 5,000 (500 with --minutes)")
    parser.add_argument("--years", type=int, default=None, help="default 10 (1 with --minutes)")
    parser.add_argument("--minutes", action="store_true", help="1-minute bars instead of the daily demo universe")
    args = parser.parse_args()
    args.symbols = args.symbols or (500 if args.minutes else 5000)
    args.years = args.years or (1 if args.minutes else 10)
    timeframe = "1m" if args.minutes else "1d"
    prefix = "MIN" if args.minutes else "SYN"
    symbols = [f"{prefix}{i:04d}" for i in range(1, args.symbols + 1)]
    with bench_stack("scale") as stack, tempfile.TemporaryDirectory() as scratch:
        engine = make_engine(stack.database_url, pool_size=1)
        if args.minutes:
            began = time.perf_counter()
            written = write_minute_files(Path(scratch), symbols, args.years)
            print(f"wrote {written:,} 1-minute bars as {len(symbols)} Parquet files in "
                  f"{time.perf_counter() - began:.1f} s", flush=True)  # fmt: skip
        mark = psutil.Process().memory_info().rss
        with PeakMemory({"importer": os.getpid()}) as importing:
            began = time.perf_counter()
            if args.minutes:
                rows, imported = (r := import_path(engine, Path(scratch), progress=False)).rows, r.symbols
            else:
                rows, imported = (
                    (d := load_demo_universe(engine, symbols=args.symbols, years=args.years, seed=3)).rows,
                    d.symbols,
                )
            import_s = time.perf_counter() - began
        print(f"imported {rows:,} bars of {imported:,} symbols in {import_s:.1f} s "
              f"({rows / import_s / 1e6:.2f} M bars/s); importer peak RSS "
              f"{importing.peaks.get('importer', mark) / 2**20:.0f} MB (before: {mark / 2**20:.0f} MB)",
              flush=True)  # fmt: skip
        with session_scope(make_session_factory(engine)) as session:
            users.create_user(session, "bench", PASSWORD)
        engine.dispose()

        port = free_tcp_port()
        settings = Settings.from_env().with_overrides(
            database_url=stack.database_url, redis_url=stack.redis_url, data_dir=stack.work, api_port=port
        )
        env = {**os.environ, **settings.child_env(), "JWT_SECRET_KEY": secrets.token_urlsafe(48)}
        commands = dict(child_commands(settings))
        procs = {name: stack.spawn(commands[name], env).pid for name in ("worker", "api")}
        base = f"http://127.0.0.1:{port}/api"
        wait_http(f"{base}/health")
        TOKEN["access"] = http("POST", f"{base}/auth/login", {"username": "bench", "password": PASSWORD})[
            "access_token"
        ]
        with PeakMemory(procs) as memory:
            began = time.perf_counter()
            job = http("POST", f"{base}/custom-calculations/execute", {
                "script": SMA_SCRIPT, "column_name": "pct_above_sma20", "stock_symbols": symbols, "params": PARAMS,
                "timeframe": timeframe,
            })  # fmt: skip
            calc = wait_final(base, f"jobs/{job['job_id']}")
            calc_s = time.perf_counter() - began
            began = time.perf_counter()
            run = http("POST", f"{base}/runs", {
                "symbols": symbols, "strategy": {"name": "dual_sma", "params": {"fast": 10, "slow": 50}},
                "timeframe": timeframe,
            })  # fmt: skip
            backtest = wait_final(base, f"runs/{run['run_id']}")
            run_s = time.perf_counter() - began
            # The worker builds the artifacts after the run is final: the peak is measured until they are written.
            artifacts = wait_artifacts(base, run["run_id"])
            artifacts_s = time.perf_counter() - began - run_s
        print(f"calculation job over {args.symbols:,} symbols at {timeframe}: {calc['status']} in {calc_s:.1f} s")
        print(f"backtest run over {args.symbols:,} symbols at {timeframe}: {backtest['status']} in {run_s:.1f} s, "
              f"artifacts {artifacts['status']} {artifacts_s:.1f} s later")  # fmt: skip
        print(f"bar cache bound per worker process: {settings.bar_cache_mb} MB (ALPHAFORGE_BAR_CACHE_MB); a run's "
              f"finalization and artifacts hold at most {settings.run_batch_mb} MB of its curves at once "
              "(ALPHAFORGE_RUN_BATCH_MB)")  # fmt: skip
        for label, peak in sorted(memory.peaks.items()):
            print(f"  peak RSS {label:<28} {peak / 2**20:8.0f} MB")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
