"""Optimisation as a job: the 4,851-combo GOOG grid through the job system with 1 and 2 worker processes, against
vectorbt 1.2.0 (warm and cold) and backtesting.py's ``Backtest.optimize``; and a 100-symbol x 500-combo grid.

vectorbt is bench-only (requirements-bench.txt), so this runs in the bench virtualenv, which also holds every
runtime dependency (the workers it starts use the same interpreter):

    python3.11 -m venv /tmp/af-bench && /tmp/af-bench/bin/pip install -r requirements-bench.txt
    /tmp/af-bench/bin/python -m benchmarks.optimization_scaling [--rounds 3] [--skip-cold] [--skip-backtesting-py]

Workload 1: every (fast, slow) with 2 <= fast < slow <= 100 on backtesting.py's GOOG daily bars (2,148 bars),
the conventions of benchmarks/grid_vs_vectorbt.py (long-only, fractional units, next-open fills, 0.2 % fees,
10,000 cash). The bars are loaded into a fresh database (embedded PostgreSQL and Redis unless
ALPHAFORGE_BENCH_DATABASE_URL / ALPHAFORGE_BENCH_REDIS_URL name servers). The job is timed from submit
(``optimizations.submit.submit``, what ``POST /api/optimizations`` calls: combos, job and slice rows, enqueue)
to the final status seen by a poller of the job row (every 10 ms), queueing included: the outcome commits with the
final status (the slice that ends the job stores it), the artifacts the worker writes next are reported beside it;
a worker process with
concurrency 1 or 2, started and warmed (one untimed optimisation) before timing; each round a new spec
(``config.seed`` differs) so it is a new job. Its ranked table is checked against ``run_dual_sma_grid`` called
directly. vectorbt: ``MA.run_combs`` + crossovers + ``Portfolio.from_signals`` with and without the same summary
(Sharpe, drawdown, trades, win rate), warm (median of ``--rounds`` after one untimed call) and cold (a fresh
interpreter: import + first grid). backtesting.py: ``Backtest.optimize`` over the same grid (its own process
pool, maximising the Sharpe ratio), once.

Workload 2: 100 synthetic symbols x 10 years, a 500-combo grid (fast 2..21 x slow 30..150 step 5), objective
the mean Sharpe across symbols, as a job with 1 and 2 worker processes against the same scoring called directly
in this process. Machines here are shared and noisy: only ratios measured within one run mean much.
"""

from __future__ import annotations

import argparse
import statistics
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
from backtesting import Backtest, Strategy
from backtesting.lib import crossover
from sqlalchemy import insert, select, text
from sqlalchemy.orm import Session, sessionmaker

from benchmarks.grid_vs_vectorbt import cold, load_goog, timed, vbt_run, vbt_setup
from benchmarks.run_scaling import start_worker
from benchmarks.stack import bench_stack, stop_process
from shared.contract import TASK_RUN_OPTIMIZATION_SHARD, create_celery, shard_enqueuer
from shared.domain.search import grid, scoring
from shared.domain.search import spec as search_spec
from shared.infra.config import Settings
from shared.infra.db import make_engine, make_session_factory
from shared.infra.models import Job, Optimization, RunManifest, Symbol, User
from shared.jobs.backtests import shard as runs
from shared.jobs.optimizations import read, submit
from shared.jobs.optimizations.spec import Limits, OptimizationRequest
from shared.marketdata import store
from shared.marketdata.bars import load_bars
from shared.marketdata.demo import load_demo_universe
from shared.marketdata.series import COLUMNS, DEFAULT_TIMEFRAME, day_ts

FINAL = {"succeeded", "partial", "failed", "cancelled"}
GOOG_BODY: dict[str, Any] = {
    "config": {
        "symbols": ["GOOG"],
        "strategy": {"name": "dual_sma"},
        "initial_cash": 10_000.0,
        "execution": {"fee_bps": 20.0, "fractional_units": True, "fill": "next_open"},
    },
    "parameters": {"fast": {"start": 2, "stop": 99, "step": 1}, "slow": {"start": 3, "stop": 100, "step": 1}},
    "objective": {"metric": "sharpe", "direction": "max"},
}


def goog_spec(seed: int) -> search_spec.OptimizationSpec:
    body = {**GOOG_BODY, "config": {**GOOG_BODY["config"], "seed": seed}}
    return search_spec.OptimizationSpec.model_validate(body)


def universe_spec(symbols: list[str], seed: int) -> search_spec.OptimizationSpec:
    return search_spec.OptimizationSpec.model_validate(
        {
            "config": {"symbols": symbols, "strategy": {"name": "dual_sma"}, "execution": {"fee_bps": 5}, "seed": seed},
            "parameters": {"fast": {"start": 2, "stop": 21, "step": 1}, "slow": {"start": 30, "stop": 150, "step": 5}},
            "objective": {"metric": "sharpe", "direction": "max"},
        }
    )


def load_goog_bars(factory: sessionmaker[Session]) -> None:
    data = load_goog()
    rows = [
        {
            "symbol": "GOOG",
            "date": d.astype(object),
            "open": float(o),
            "high": float(h),
            "low": float(lo),
            "close": float(c),
            "volume": int(v),
        }
        for d, o, h, lo, c, v in zip(
            data["dates"], data["Open"], data["High"], data["Low"], data["Close"], data["Volume"], strict=True
        )
    ]
    with factory() as session, session.begin():
        session.execute(insert(Symbol).values(symbol="GOOG", name="GOOG (backtesting.py test data)"))
        by_date = sorted(rows, key=lambda r: r["date"])
        columns = store.columns_of([day_ts(r["date"]) for r in by_date], *([r[k] for r in by_date] for k in COLUMNS))
        store.store_columns(session.connection(), DEFAULT_TIMEFRAME, {"GOOG": columns})


def run_job(
    factory: sessionmaker[Session], settings: Settings, owner: str, spec: search_spec.OptimizationSpec
) -> tuple[float, uuid.UUID]:
    """Seconds from submit to the final status (its outcome stored with it) seen by a poller."""
    celery = create_celery(settings)
    limits = Limits(100_000, 10**9, settings.optimization_slice_backtests)
    began = time.perf_counter()
    submitted = submit.submit(
        factory,
        OptimizationRequest(spec=spec, owner_id=owner),
        limits,
        enqueue=shard_enqueuer(celery, TASK_RUN_OPTIMIZATION_SHARD),
    )
    job_id = submitted.job.id
    while True:
        with factory() as session:
            status, outcome = session.execute(
                select(Job.status, Optimization.outcome)
                .join(Optimization, Optimization.job_id == Job.id)
                .where(Job.id == job_id)
            ).one()
        if status in FINAL:
            break
        time.sleep(0.01)
    elapsed = time.perf_counter() - began
    if outcome is None:
        raise RuntimeError(f"optimization {job_id}: final without its outcome")
    while True:  # untimed: the artifacts the worker writes after that commit (the next round must not share it)
        with factory() as session:
            if session.scalar(select(RunManifest.id).where(RunManifest.job_id == job_id)) is not None:
                break
        if time.perf_counter() - began > 300:
            raise RuntimeError(f"optimization {job_id}: no artifacts after 300 s")
        time.sleep(0.01)
    ARTIFACTS_S.append(time.perf_counter() - began)
    celery.close()
    if status != "succeeded":
        raise RuntimeError(f"optimization {job_id} ended {status}")
    return elapsed, job_id


ARTIFACTS_S: list[float] = []
"""Seconds from submit to the artifacts built (after the final status), per job (beside the timed figure)."""


def direct(factory: sessionmaker[Session], spec: search_spec.OptimizationSpec) -> tuple[float, np.ndarray]:
    """The same scoring in this process (bars loaded with the same query): seconds and the aggregated summary."""
    began = time.perf_counter()
    c = grid.combos(spec)
    with factory() as session:
        loaded = load_bars(session.connection(), spec.config.symbols, None, None)
    per = [scoring.score_symbol(runs.engine_bars(b), spec.config, c, 0, len(c)) for b in loaded.values()]
    summary, _ = scoring.aggregate([p for p in per if p is not None])
    return time.perf_counter() - began, summary


def same_as_direct(factory: sessionmaker[Session], job_id: uuid.UUID, expected: np.ndarray) -> bool:
    with factory() as session:
        _, _, summary = read.load_summary(session, job_id, 0)
    return summary.shape == expected.shape and bool(np.allclose(summary, expected, rtol=1e-12, equal_nan=True))


def _sma(values: Any, n: int) -> Any:
    import pandas as pd

    return pd.Series(values).rolling(n).mean()


class SmaCross(Strategy):
    """backtesting.py's own example strategy (module level: its optimiser pickles it into a process pool)."""

    n1 = 10
    n2 = 20

    def init(self) -> None:
        self.sma1 = self.I(_sma, self.data.Close, self.n1)
        self.sma2 = self.I(_sma, self.data.Close, self.n2)

    def next(self) -> None:
        if crossover(self.sma1, self.sma2):
            self.buy()
        elif crossover(self.sma2, self.sma1):
            self.position.close()


def backtesting_py_optimize() -> float:
    """backtesting.py 0.6.6's ``optimize`` over the same grid (its own process pool), maximising Sharpe."""
    from backtesting.test import GOOG

    bt = Backtest(GOOG, SmaCross, cash=10_000, commission=0.002, finalize_trades=True)
    began = time.perf_counter()
    bt.optimize(n1=range(2, 100), n2=range(3, 101), constraint=lambda p: p.n1 < p.n2, maximize="Sharpe Ratio")
    return time.perf_counter() - began


def measure(label: str, rounds: int, fn: Callable[[int], float]) -> float:
    ARTIFACTS_S.clear()
    times = [fn(r) for r in range(rounds)]
    if ARTIFACTS_S:
        label += f" [to the artifacts: median {statistics.median(ARTIFACTS_S):.2f} s]"
    print(
        f"  {label}: " + ", ".join(f"{t:.2f}" for t in times) + f" s (median {statistics.median(times):.2f} s)",
        flush=True,
    )
    return statistics.median(times)


def main() -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n")[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--skip-cold", action="store_true")
    parser.add_argument("--skip-backtesting-py", action="store_true")
    parser.add_argument("--skip-universe", action="store_true")
    parser.add_argument("--skip-vectorbt", action="store_true", help="only the jobs (no goal check)")
    parser.add_argument("--universe-symbols", type=int, default=100)
    parser.add_argument("--universe-years", type=int, default=10)
    args = parser.parse_args()

    with bench_stack("opt") as stack:
        engine = make_engine(stack.database_url, pool_size=2)
        factory = make_session_factory(engine)
        load_goog_bars(factory)
        owner = str(uuid.uuid4())
        with engine.begin() as conn:
            conn.execute(insert(User).values(id=owner, username="bench", password_hash="x"))
        settings = Settings.from_env().with_overrides(
            database_url=stack.database_url, redis_url=stack.redis_url, data_dir=stack.work
        )
        work: Path = stack.work
        seed = iter(range(1, 10_000))
        n_combos = len(grid.combos(goog_spec(0)))
        print(
            f"GOOG grid: {n_combos:,} combos x 2,148 bars; slices of {settings.optimization_slice_backtests:,} "
            "backtests",
            flush=True,
        )
        direct_s, expected = direct(factory, goog_spec(0))
        direct_s = measure(
            "engine directly (this process, warm)", args.rounds, lambda _: direct(factory, goog_spec(0))[0]
        )
        results: dict[str, float] = {"direct": direct_s}
        for label, concurrency in (("1 worker", 1), ("2 workers", 2)):
            proc = start_worker(settings, concurrency, work / "worker.log")
            try:
                for _ in range(2):  # warm every pool process (imports, compiled kernels from the cache)
                    run_job(factory, settings, owner, goog_spec(next(seed)))

                def one(_: int) -> float:
                    elapsed, job_id = run_job(factory, settings, owner, goog_spec(next(seed)))
                    if not same_as_direct(factory, job_id, expected):
                        raise RuntimeError(f"optimization {job_id}: table differs from the direct grid")
                    return elapsed

                results[label] = measure(f"job, {label} (submit -> final seen)", args.rounds, one)
            finally:
                stop_process(proc)

        if args.skip_vectorbt:
            return 0
        data = load_goog()
        theirs = vbt_setup(data)
        first, _ = timed(vbt_run, theirs)
        print(f"  vectorbt first call in this process (JIT): {first:.2f} s", flush=True)
        results["vectorbt warm"] = measure(
            "vectorbt warm (total return)", args.rounds, lambda _: timed(vbt_run, theirs)[0]
        )
        results["vectorbt warm + summary"] = measure(
            "vectorbt warm (+ same summary)", args.rounds, lambda _: timed(vbt_run, theirs, summary=True)[0]
        )
        if not args.skip_cold:
            r = cold("vectorbt")
            results["vectorbt cold"] = r["import"] + r["run"]
            print(
                f"  vectorbt cold: {results['vectorbt cold']:.2f} s (import {r['import']:.2f} s, grid "
                f"{r['run']:.2f} s, process wall {r['wall']:.2f} s)",
                flush=True,
            )
        if not args.skip_backtesting_py:
            results["backtesting.py optimize"] = backtesting_py_optimize()
            print(f"  backtesting.py optimize: {results['backtesting.py optimize']:.2f} s", flush=True)

        print("\nGOOG 4,851-combo grid, medians; ratio = other / job with 2 workers:")
        base = results["2 workers"]
        for label, value in results.items():
            print(f"  {label:28s} {value:8.2f} s   ratio {value / base:6.2f}x")
        print(
            f"  goal (job beats vectorbt warm): 2 workers {base:.2f} s vs {results['vectorbt warm']:.2f} s -> "
            f"{'met' if base < results['vectorbt warm'] else 'NOT met'}; 1 worker {results['1 worker']:.2f} s"
        )

        if not args.skip_universe:
            began = time.perf_counter()
            load_demo_universe(engine, symbols=args.universe_symbols, years=args.universe_years, seed=1)
            with engine.begin() as conn:
                symbols = list(
                    conn.scalars(
                        text("SELECT symbol FROM symbols WHERE symbol <> 'GOOG' ORDER BY symbol LIMIT :n"),
                        {"n": args.universe_symbols},
                    )
                )
            print(
                f"\nloaded {len(symbols)} symbols x {args.universe_years} years in {time.perf_counter() - began:.1f} s;"
                f" grid of {len(grid.combos(universe_spec(symbols, 0)))} combos",
                flush=True,
            )
            u_direct, u_expected = direct(factory, universe_spec(symbols, 0))
            u_direct = measure(
                "engine directly (this process)", 1, lambda _: direct(factory, universe_spec(symbols, 0))[0]
            )
            u_results = {"direct": u_direct}
            for label, concurrency in (("1 worker", 1), ("2 workers", 2)):
                proc = start_worker(settings, concurrency, work / "worker.log")
                try:
                    run_job(factory, settings, owner, goog_spec(next(seed)))  # warm-up
                    run_job(factory, settings, owner, goog_spec(next(seed)))

                    def one_u(_: int) -> float:
                        elapsed, job_id = run_job(factory, settings, owner, universe_spec(symbols, next(seed)))
                        if not same_as_direct(factory, job_id, u_expected):
                            raise RuntimeError(f"optimization {job_id}: table differs from the direct scoring")
                        return elapsed

                    u_results[label] = measure(f"job, {label}", max(1, args.rounds - 1), one_u)
                finally:
                    stop_process(proc)
            print(f"\n{len(symbols)} symbols x 500 combos ({len(symbols) * 500:,} backtests), medians:")
            for label, value in u_results.items():
                print(
                    f"  {label:12s} {value:8.2f} s   ({len(symbols) * 500 / value:,.0f} backtests/s; "
                    f"{value / u_results['direct']:.2f}x direct)"
                )
        engine.dispose()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
