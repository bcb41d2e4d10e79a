"""Backtest runs at scale: the run service with 1 and 2 worker processes against the engine called directly.

    .venv/bin/python -m benchmarks.run_scaling [--symbols 500] [--years 10] [--rounds 2]

Loads a seeded synthetic universe into a fresh database (embedded PostgreSQL and Redis unless
ALPHAFORGE_BENCH_DATABASE_URL / ALPHAFORGE_BENCH_REDIS_URL name servers), then for 1 and 2 worker processes
(one Celery worker with that concurrency, started and pinged before timing) submits a dual-SMA run through
``shared.runs.submit_run`` (what ``POST /api/runs`` calls) and times submit -> run final -> artifacts built.
The reference is the engine called directly in this one process over the same bars loaded with the same
query. Each round uses a new seed, so it is a new run (creation is idempotent per config). The per-symbol
metrics of the system and of the reference are compared for equality.

Validation (permutation, bootstrap, Monte Carlo) is not yet part of a run (issue 7 leaves it to be wired), so
this measures the run path only. Machines here are shared and noisy: only ratios within one run mean much.
"""

from __future__ import annotations

import argparse
import math
import os
import secrets
import statistics
import subprocess
import sys
import time
import uuid
from pathlib import Path
from typing import Any

from sqlalchemy import insert, select, text
from sqlalchemy.orm import Session, sessionmaker

from benchmarks.stack import ROOT, bench_stack, stop_process
from shared import runs
from shared.backtest import BacktestConfig, run_backtest
from shared.bars import load_bars
from shared.bars_demo import load_demo_universe
from shared.config import Settings
from shared.db import make_engine, make_session_factory
from shared.models import Job, JobResult, RunManifest, User
from worker.celery_app import TASK_RUN_BACKTEST_SHARD, create_celery, shard_enqueuer

FINAL = {"succeeded", "partial", "failed", "cancelled"}


def config_for(symbols: list[str], seed: int) -> BacktestConfig:
    return BacktestConfig.model_validate(
        {
            "symbols": symbols,
            "strategy": {"name": "dual_sma", "params": {"fast": 10, "slow": 50}},
            "execution": {"fee_bps": 5, "slippage_bps": 2},
            "seed": seed,
        }
    )


def clean(value: Any) -> Any:
    return None if isinstance(value, float) and not math.isfinite(value) else value


def reference(factory: sessionmaker[Session], config: BacktestConfig) -> tuple[float, dict[str, dict[str, Any]]]:
    began = time.perf_counter()
    with factory() as session:
        bars = load_bars(session.connection(), config.symbols, config.start_date, config.end_date)
    metrics = {s: {k: clean(v) for k, v in run_backtest(runs.engine_bars(b), config).metrics.items()}
               for s, b in bars.items()}  # fmt: skip
    return time.perf_counter() - began, metrics


def system(
    factory: sessionmaker[Session], settings: Settings, owner: str, config: BacktestConfig
) -> tuple[float, float, dict[str, dict[str, Any]]]:
    """(seconds to final, seconds to artifacts, metrics per symbol)."""
    celery = create_celery(settings)
    began = time.perf_counter()
    submitted = runs.submit_run(
        factory,
        runs.RunRequest(config=config, owner_id=owner),
        shard_size=settings.shard_size,
        enqueue=shard_enqueuer(celery, TASK_RUN_BACKTEST_SHARD),
    )
    job_id = submitted.job.id
    final_at = None
    while True:
        with factory() as session:
            status = session.scalar(select(Job.status).where(Job.id == job_id))
            built = session.scalar(select(RunManifest.id).where(RunManifest.job_id == job_id))
        if status in FINAL and final_at is None:
            final_at = time.perf_counter() - began
        if built is not None:
            break
        time.sleep(0.02)
    artifacts_at = time.perf_counter() - began
    celery.close()
    with factory() as session:
        rows = session.execute(select(JobResult.symbol, JobResult.data).where(JobResult.job_id == job_id)).all()
    assert final_at is not None
    return final_at, artifacts_at, {s: (d or {}).get("metrics", {}) for s, d in rows}


def start_worker(settings: Settings, concurrency: int, log_path: Path) -> subprocess.Popen[bytes]:
    env = {**os.environ, **settings.child_env()}
    with open(log_path, "ab") as log:
        proc = subprocess.Popen(
            [sys.executable, "-m", "worker", "worker", f"--concurrency={concurrency}", "--loglevel=WARNING",
             "--hostname", f"bench-{secrets.token_hex(3)}@%h"],
            cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
        )  # fmt: skip
    app = create_celery(settings)
    deadline = time.monotonic() + 90
    while not app.control.ping(timeout=0.5):
        if proc.poll() is not None or time.monotonic() > deadline:
            raise RuntimeError(f"worker did not start; see {log_path}")
    app.close()
    return proc


def main() -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n")[0])
    parser.add_argument("--symbols", type=int, default=500)
    parser.add_argument("--years", type=int, default=10)
    parser.add_argument("--rounds", type=int, default=2)
    args = parser.parse_args()

    with bench_stack("runs") as stack:  # drops the database WITH (FORCE): open connections do not matter
        database_url, redis_url, work = stack.database_url, stack.redis_url, stack.work
        engine = make_engine(database_url, pool_size=2)
        began = time.perf_counter()
        load_demo_universe(engine, symbols=args.symbols, years=args.years, seed=1)
        print(f"loaded {args.symbols} symbols x {args.years} years in {time.perf_counter() - began:.1f} s", flush=True)
        factory = make_session_factory(engine)
        with engine.begin() as conn:
            symbols = list(
                conn.scalars(text("SELECT symbol FROM symbols ORDER BY symbol LIMIT :n"), {"n": args.symbols})
            )
            owner = str(uuid.uuid4())
            conn.execute(insert(User).values(id=owner, username="bench", password_hash="x"))
        settings = Settings.from_env().with_overrides(database_url=database_url, redis_url=redis_url, data_dir=work)
        reference(factory, config_for(symbols[:5], 0))  # warm: imports, compiled kernels from the cache

        results: dict[str, list[float]] = {"reference": [], "1 worker": [], "2 workers": []}
        artifacts_s: dict[str, list[float]] = {"1 worker": [], "2 workers": []}
        seed = 1
        for label, concurrency in (("1 worker", 1), ("2 workers", 2)):
            proc = start_worker(settings, concurrency, work / "worker.log")
            try:
                system(factory, settings, owner, config_for(symbols[:20], 10_000 + concurrency))  # warm-up run
                for _ in range(args.rounds):
                    config = config_for(symbols, seed)
                    seed += 1
                    ref_s, expected = reference(factory, config)
                    final_s, built_s, got = system(factory, settings, owner, config)
                    same = got == expected
                    results["reference"].append(ref_s)
                    results[label].append(final_s)
                    artifacts_s[label].append(built_s)
                    print(f"{label}: run final in {final_s:.2f} s (artifacts {built_s:.2f} s); engine directly "
                          f"{ref_s:.2f} s; per-symbol metrics identical: {same}", flush=True)  # fmt: skip
                    if not same:
                        return 1
            finally:
                stop_process(proc)
        ref = statistics.median(results["reference"])
        print(f"\n{args.symbols} symbols, dual SMA 10/50, median of {args.rounds} rounds each:")
        print(f"  engine directly, one process (load + backtest): {ref:.2f} s")
        for label in ("1 worker", "2 workers"):
            med = statistics.median(results[label])
            print(f"  run service, {label:9s}: {med:.2f} s to final ({med / ref:.2f}x the direct engine), "
                  f"{statistics.median(artifacts_s[label]):.2f} s with artifacts")  # fmt: skip
        speedup = statistics.median(results["1 worker"]) / statistics.median(results["2 workers"])
        print(f"  2 workers vs 1: {speedup:.2f}x faster")
        engine.dispose()
        return 0


if __name__ == "__main__":
    raise SystemExit(main())
