"""Backtest runs at scale: the run service with 1 and 2 worker processes against the engine called directly.

    .venv/bin/python -m benchmarks.run_scaling [--symbols 500] [--years 10] [--rounds 2] [--no-validation]

Loads a seeded synthetic universe into a fresh database (embedded PostgreSQL and Redis unless
ALPHAFORGE_BENCH_DATABASE_URL / ALPHAFORGE_BENCH_REDIS_URL name servers), then for 1 and 2 worker processes
(one Celery worker with that concurrency, started and pinged before timing) submits a dual-SMA run through
``backtests.submit.submit_run`` (what ``POST /api/runs`` calls) and times submit -> run final -> artifacts built.
The reference is the engine called directly in this one process over the same bars loaded with the same
query. Each round uses a new seed, so it is a new run (creation is idempotent per config). The per-symbol
metrics of the system and of the reference are compared for equality.

With validation (the default), each run also carries ``VALIDATION`` (all four methods: 24 permutations and 24
cost scenarios, each a backtest of every symbol, 2000 bootstrap resamples of the portfolio's returns, and the
default walk-forward grid of 9 pairs per symbol; tasks of 4 permutation / Monte Carlo draws, 1000 bootstrap draws,
50 walk-forward symbols); the reference then also calls
the same validation functions directly, once, over the same bars (``shared.domain.robustness.validate_in_process``), and
the run's validation result must equal it. Machines here are shared and noisy: only ratios within one run mean
much.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import secrets
import statistics
import subprocess
import sys
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sqlalchemy import insert, select, text
from sqlalchemy.orm import Session, sessionmaker

from benchmarks.stack import ROOT, bench_stack, stop_process
from shared.contract import TASK_RUN_BACKTEST_SHARD, create_celery, shard_enqueuer
from shared.domain import robustness as val
from shared.domain.backtest import BacktestConfig, run_backtest
from shared.infra.config import Settings
from shared.infra.db import make_engine, make_session_factory
from shared.infra.models import Job, JobResult, RunManifest, User
from shared.jobs.backtests import read as run_read
from shared.jobs.backtests import shard as run_shards
from shared.jobs.backtests import submit as runs
from shared.marketdata.bars import load_bars
from shared.marketdata.demo import load_demo_universe

FINAL = {"succeeded", "partial", "failed", "cancelled"}
VALIDATION = val.ValidationSpec.model_validate(
    {
        "permutation": {"n": 24},
        "monte_carlo": {"n": 24, "fee_bps_sigma": 5, "slippage_bps_sigma": 5},
        "bootstrap": {"n": 2000, "block": 20},
        "walk_forward": {},
        "chunk": 4,
    }
)


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


@dataclass
class Outcome:
    final_s: float  # submit (or start) -> run final
    metrics: dict[str, dict[str, Any]]
    validation: dict[str, Any] | None = None
    artifacts_s: float = 0.0
    validation_s: float = 0.0  # the reference's validation alone


def reference(factory: sessionmaker[Session], config: BacktestConfig, spec: val.ValidationSpec | None) -> Outcome:
    began = time.perf_counter()
    with factory() as session:
        bars = load_bars(session.connection(), config.symbols, config.start_date, config.end_date)
    metrics = {s: {k: clean(v) for k, v in run_backtest(run_shards.engine_bars(b), config).metrics.items()}
               for s, b in bars.items()}  # fmt: skip
    engine_s = time.perf_counter() - began
    if spec is None:
        return Outcome(engine_s, metrics)
    result = val.validate_in_process({s: run_shards.engine_bars(b) for s, b in bars.items()}, config, spec)
    total_s = time.perf_counter() - began
    return Outcome(total_s, metrics, json.loads(json.dumps(result)), validation_s=total_s - engine_s)


def system(
    factory: sessionmaker[Session],
    settings: Settings,
    owner: str,
    config: BacktestConfig,
    spec: val.ValidationSpec | None,
) -> Outcome:
    """Seconds to final and to artifacts, metrics per symbol, the validation result."""
    celery = create_celery(settings)
    began = time.perf_counter()
    submitted = runs.submit_run(
        factory,
        runs.RunRequest(config=config, owner_id=owner, validation=spec),
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
        _, run = run_read.get_run(session, job_id)
    assert final_at is not None
    result = run.validation_result  # stored by the worker that finalized the run
    if result is not None:  # what only a stored run says (failed tasks), beside the numbers
        result = {**result, "methods": {m: {k: x for k, x in b.items() if k not in ("tasks_failed", "errors")}
                                        for m, b in result["methods"].items()}}  # fmt: skip
    metrics = {s: (d or {}).get("metrics", {}) for s, d in rows}
    return Outcome(final_at, metrics, json.loads(json.dumps(result)), artifacts_s=artifacts_at)


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
    parser.add_argument("--no-validation", action="store_true", help="runs without validation")
    args = parser.parse_args()
    spec = None if args.no_validation else VALIDATION

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
        reference(factory, config_for(symbols[:5], 0), spec)  # warm: imports, compiled kernels from the cache
        if spec is not None:
            tasks = val.plan(spec, len(symbols))
            print(f"validation: {len(tasks)} tasks, {sum(t.work for t in tasks):,} backtests estimated "
                  f"({spec.model_dump(exclude_none=True)})", flush=True)  # fmt: skip

        results: dict[str, list[float]] = {"reference": [], "1 worker": [], "2 workers": []}
        artifacts_s: dict[str, list[float]] = {"1 worker": [], "2 workers": []}
        validation_s: list[float] = []
        seed = 1
        for label, concurrency in (("1 worker", 1), ("2 workers", 2)):
            proc = start_worker(settings, concurrency, work / "worker.log")
            try:
                system(factory, settings, owner, config_for(symbols[:20], 10_000 + concurrency), spec)  # warm-up
                for _ in range(args.rounds):
                    config = config_for(symbols, seed)
                    seed += 1
                    expected = reference(factory, config, spec)
                    got = system(factory, settings, owner, config, spec)
                    same = got.metrics == expected.metrics and got.validation == expected.validation
                    results["reference"].append(expected.final_s)
                    validation_s.append(expected.validation_s)
                    results[label].append(got.final_s)
                    artifacts_s[label].append(got.artifacts_s)
                    print(f"{label}: run final in {got.final_s:.2f} s (artifacts {got.artifacts_s:.2f} s); directly "
                          f"{expected.final_s:.2f} s (validation {expected.validation_s:.2f} s); per-symbol metrics "
                          f"and validation identical: {same}", flush=True)  # fmt: skip
                    if not same:
                        return 1
            finally:
                stop_process(proc)
        ref = statistics.median(results["reference"])
        what = "load + backtest" + (" + validation" if spec is not None else "")
        print(f"\n{args.symbols} symbols, dual SMA 10/50, median of {args.rounds} rounds each:")
        print(f"  engine directly, one process ({what}): {ref:.2f} s"
              + (f" (validation {statistics.median(validation_s):.2f} s)" if spec is not None else ""))  # fmt: skip
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
