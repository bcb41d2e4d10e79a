"""The scale run: a large universe imported, then a calculation job and a backtest run over all of it, through the
API and a worker, with wall times and the peak memory of every process of the system.

    .venv/bin/python -m benchmarks.scale_run [--symbols 5000] [--years 10]

Not part of the default suite (minutes, gigabytes). Daily bars for now; the 1-minute run waits for intraday
timeframes. Peak memory is each process's largest resident set seen while polling every 0.2 s (the worker's pool
processes are where bars are read and cached: ``ALPHAFORGE_BAR_CACHE_MB`` bounds their cache).
"""

from __future__ import annotations

import argparse
import os
import secrets
import threading
import time
from typing import Any

import psutil

from benchmarks.calc_throughput import PARAMS, PASSWORD, SMA_SCRIPT, TOKEN, http, wait_http
from benchmarks.stack import bench_stack
from shared.accounts import users
from shared.infra.config import Settings
from shared.infra.db import make_engine, make_session_factory, session_scope
from shared.marketdata.demo import load_demo_universe
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


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--symbols", type=int, default=5000)
    parser.add_argument("--years", type=int, default=10)
    args = parser.parse_args()
    with bench_stack("scale") as stack:
        engine = make_engine(stack.database_url, pool_size=1)
        began = time.perf_counter()
        report = load_demo_universe(engine, symbols=args.symbols, years=args.years, seed=3)
        import_s = time.perf_counter() - began
        print(f"imported {report.rows:,} bars of {report.symbols:,} symbols in {import_s:.1f} s "
              f"({report.rows / import_s / 1e6:.2f} M bars/s)", flush=True)  # fmt: skip
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
        symbols = [f"SYN{i:04d}" for i in range(1, args.symbols + 1)]
        with PeakMemory(procs) as memory:
            began = time.perf_counter()
            job = http("POST", f"{base}/custom-calculations/execute", {
                "script": SMA_SCRIPT, "column_name": "pct_above_sma20", "stock_symbols": symbols, "params": PARAMS,
            })  # fmt: skip
            calc = wait_final(base, f"jobs/{job['job_id']}")
            calc_s = time.perf_counter() - began
            began = time.perf_counter()
            run = http("POST", f"{base}/runs", {
                "symbols": symbols, "strategy": {"name": "dual_sma", "params": {"fast": 10, "slow": 50}},
            })  # fmt: skip
            backtest = wait_final(base, f"runs/{run['run_id']}")
            run_s = time.perf_counter() - began
        print(f"calculation job over {args.symbols:,} symbols: {calc['status']} in {calc_s:.1f} s")
        print(f"backtest run over {args.symbols:,} symbols: {backtest['status']} in {run_s:.1f} s")
        print(f"bar cache bound per worker process: {settings.bar_cache_mb} MB (ALPHAFORGE_BAR_CACHE_MB)")
        for label, peak in sorted(memory.peaks.items()):
            print(f"  peak RSS {label:<28} {peak / 2**20:8.0f} MB")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
