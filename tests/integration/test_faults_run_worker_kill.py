"""Faults survived by backtest runs: the worker running a run's shards is killed with SIGKILL; the reconciler (beat
every second) re-publishes the stranded shards and a second worker finishes the run with every symbol exactly once.

Same harness as tests/integration/test_faults_worker_kill.py (a Redis database of its own, real processes).
"""

from __future__ import annotations

import os
import signal
import time

import psutil
import pytest
from sqlalchemy import Engine, func, select
from sqlalchemy.orm import Session, sessionmaker

from shared.contract import TASK_RUN_BACKTEST_SHARD, create_celery, shard_enqueuer
from shared.domain.backtest import BacktestConfig
from shared.infra.config import Settings
from shared.infra.models import BacktestRun, Job, JobResult, JobShard
from shared.jobs.backtests import submit as runs
from tests.helpers import FINAL, ApiUser, seed_bars
from tests.integration.test_faults_worker_kill import (  # noqa: F401 (fixtures)
    Processes,
    _group,
    fault_settings,
    processes,
    shard_statuses,
    wait_for,
)

pytestmark = pytest.mark.slow  # scheduled first (tests/conftest.py)

SYMBOLS = 60
SHARD_SIZE = 5  # 12 shards


def test_a_run_survives_sigkill_of_its_worker(
    clean_db: Engine,
    session_factory: sessionmaker[Session],
    fault_settings: Settings,  # noqa: F811
    processes: Processes,  # noqa: F811
    user: ApiUser,
) -> None:
    symbols = [f"K{i:03d}" for i in range(SYMBOLS)]
    seed_bars(clean_db, symbols, days=400)
    app = create_celery(fault_settings)
    try:
        worker_a = processes.start("run-worker-a", "worker", "--hostname", "run-fault-a@%h", "--concurrency", "2")
        processes.start("run-beat", "beat", "--schedule", str(fault_settings.data_dir / "run-fault-beat-schedule"))
        wait_for(lambda: app.control.ping(timeout=0.5), 60, "worker A")

        config = BacktestConfig.model_validate(
            {"symbols": symbols, "strategy": {"name": "dual_sma", "params": {"fast": 5, "slow": 30}}}
        )
        submitted = runs.submit_run(session_factory, runs.RunRequest(config, user.id), shard_size=SHARD_SIZE,
                                    enqueue=shard_enqueuer(app, TASK_RUN_BACKTEST_SHARD))  # fmt: skip
        job_id = submitted.job.id
        assert submitted.job.shards_total == SYMBOLS // SHARD_SIZE

        # A fresh pool process spends its first shard loading the compiled kernels: a window to kill it in.
        wait_for(lambda: "running" in shard_statuses(session_factory, job_id), 60, "a run shard to be running")
        os.kill(worker_a.pid, signal.SIGKILL)
        killed_at = time.monotonic()
        worker_a.wait(timeout=10)
        wait_for(lambda: not any(p.is_running() and p.status() != psutil.STATUS_ZOMBIE
                                 for p in _group(worker_a.pid)), 10, "worker A's pool to die")  # fmt: skip
        statuses = shard_statuses(session_factory, job_id)
        stranded = statuses.count("running")
        assert stranded >= 1 and statuses.count("succeeded") < len(statuses)

        processes.start("run-worker-b", "worker", "--hostname", "run-fault-b@%h", "--concurrency", "2")

        def finished() -> bool:
            with session_factory() as session:
                return session.scalar(select(Job.status).where(Job.id == job_id)) in FINAL

        wait_for(finished, 120, "the run to finish after the kill")
        recovered_s = time.monotonic() - killed_at
    finally:
        app.close()

    with session_factory() as session:
        final = session.get(Job, job_id)
        assert final is not None
        stored = session.execute(
            select(JobResult.symbol, func.count()).where(JobResult.job_id == job_id).group_by(JobResult.symbol)
        ).all()
        requeued = session.scalars(select(JobShard.requeues).where(JobShard.job_id == job_id)).all()
        errors = session.scalars(select(JobResult.error).where(JobResult.job_id == job_id)).all()
        metrics = session.scalars(select(JobResult.data).where(JobResult.job_id == job_id)).all()
        run = session.get(BacktestRun, job_id)
    assert final.status == "succeeded", final.error
    assert (final.shards_done, final.symbols_done, final.symbols_failed) == (len(requeued), SYMBOLS, 0)
    assert sorted(symbol for symbol, _ in stored) == symbols and {n for _, n in stored} == {1}  # each exactly once
    assert set(errors) == {None} and all(m and m.get("metrics") for m in metrics)
    # Finalized by the worker whose shard ended the run, in that transaction: the portfolio of every symbol.
    assert final.finalized_at is not None and run is not None and run.portfolio is not None
    assert run.portfolio["sleeves"] == SYMBOLS
    assert sum(1 for n in requeued if n >= 1) >= stranded  # the stranded shards came back through the reconciler
    assert "re-enqueued" in processes.log("run-worker-b")
    print(f"\n[fault] SIGKILL of a run's worker with {stranded} shards running: run finished {recovered_s:.1f} s "
          f"later, {sum(requeued)} re-enqueues")  # fmt: skip
