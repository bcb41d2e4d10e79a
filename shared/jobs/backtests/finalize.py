"""What runs once when a backtest run has ended: everything its views read that no single shard can compute.

:func:`finalize_run` is the run kind's finalization hook (``shared.jobs.pipeline.Finalize``): the portfolio-level
metrics of a run of several symbols (from its stored curves) and, with a validation spec, the validation result
combined from its tasks' parts. The pipeline calls it in a worker only, in the transaction that makes the run final
(the shard that completes it) or, for a run cancelled while shards ran, in the one that closes its last open shard;
for a run that ended with no shard left to close (cancelled while every shard waited), in the worker task the cancel
sends (``TASK_BUILD_RUN_ARTIFACTS``: :func:`finish_ended_run`); and the reconciler's finalize pass catches up on any
ended run nobody finalized. Views only read the rows this writes (:mod:`.read`).

After that commit, the worker builds the run's artifacts (``artifacts.build_if_finished``, which waits for the job
to be finalized and reads the stored portfolio and validation result).
"""

from __future__ import annotations

import math
import uuid
from typing import Any

import numpy as np
from sqlalchemy import select, update
from sqlalchemy.orm import Session, sessionmaker

from shared.domain import robustness as val
from shared.domain.backtest import BacktestConfig
from shared.domain.robustness.portfolio import PortfolioSum
from shared.domain.stats import TRADING_DAYS, sharpe_ratio
from shared.infra.models import BacktestRun, Job, JobShard, ShardStatus
from shared.jobs import pipeline as jobs
from shared.jobs.backtests.read import curve_batches, load_parts

as_days = val.as_days
portfolio_curve = val.portfolio_curve  # the sleeves' arithmetic, shared with validation (shared.domain.robustness)


def finite(value: Any) -> Any:
    return None if isinstance(value, float) and not math.isfinite(value) else value


def portfolio_metrics(curves: val.Curves, initial_cash: float, risk_free_rate: float = 0.0) -> dict[str, Any] | None:
    """Metrics of the run as one portfolio: each symbol a sleeve given ``initial_cash``, equal cash, never
    rebalanced. A sleeve holds its cash before its first bar and its last equity after its last bar; the
    portfolio's equity on each date of the union of dates is the sum of the sleeves'.

    Returns None without curves. Sharpe and volatility use daily returns annualised with 252 periods.
    """
    if not curves:
        return None
    all_dates, total = portfolio_curve(curves, initial_cash)
    return sum_metrics(all_dates, total, len(curves), initial_cash, risk_free_rate)


def sum_metrics(
    all_dates: np.ndarray, total: np.ndarray, sleeves: int, initial_cash: float, risk_free_rate: float = 0.0
) -> dict[str, Any]:
    """:func:`portfolio_metrics` of the portfolio's equity ``total`` of ``sleeves`` sleeves on ``all_dates``."""
    start_equity = initial_cash * sleeves
    final_equity = float(total[-1])
    series = np.concatenate([[start_equity], total])
    returns = series[1:] / series[:-1] - 1
    std = float(np.std(returns, ddof=1)) if len(returns) > 1 else math.nan
    peak = np.maximum.accumulate(series)
    max_drawdown = float(np.min(series / peak - 1))
    days = int((all_dates[-1] - all_dates[0]).astype(np.int64))
    growth = final_equity / start_equity
    annual = growth ** (365.25 / days) - 1 if days > 0 and growth > 0 else math.nan
    metrics = {
        "sleeves": sleeves,
        "start": str(all_dates[0]),
        "end": str(all_dates[-1]),
        "initial_equity": start_equity,
        "final_equity": final_equity,
        "return_pct": (growth - 1) * 100,
        "return_ann_pct": annual * 100,
        "volatility_ann_pct": std * math.sqrt(TRADING_DAYS) * 100,
        "sharpe": sharpe_ratio(returns, risk_free_rate),
        "max_drawdown_pct": max_drawdown * 100,
    }
    return {k: finite(float(v)) if isinstance(v, float) else v for k, v in metrics.items()}


def run_portfolio(session: Session, job: Job, run: BacktestRun) -> dict[str, Any] | None:
    """The portfolio metrics of an ended run of several symbols, from the curves its shards stored, read a batch at a
    time (``read.curve_batches``: ``ALPHAFORGE_RUN_BATCH_MB`` bounds what is held, whatever the run's size); None
    for a one-symbol run (its metrics are the symbol's) or a run without any curve."""
    if len(job.symbols) < 2:
        return None
    config = BacktestConfig.model_validate(run.config)
    total = PortfolioSum(config.initial_cash)
    for batch in curve_batches(session, job.id, with_trades=False, with_benchmark=False):
        total.add([(c.dates, c.equity) for c in batch])
    if not total.sleeves:
        return None
    return sum_metrics(total.dates, total.total, total.sleeves, config.initial_cash, config.risk_free_rate)


def run_validation_result(session: Session, job: Job, run: BacktestRun) -> dict[str, Any] | None:
    """The validation result of an ended run: its tasks' parts combined (in task order), plus each method's failed
    tasks and their reasons. A task cancelled before it ran has no part (its draws are missing from the result); one
    stopped at its cancellation checkpoint stored the draws it made. None for a run without validation."""
    if run.validation is None:
        return None
    spec = val.ValidationSpec.model_validate(run.validation)
    config = BacktestConfig.model_validate(run.config)
    shards = session.execute(
        select(JobShard.task, JobShard.status, JobShard.error).where(
            JobShard.job_id == job.id, JobShard.task.is_not(None)
        )
    ).all()
    planned = [val.Task.from_dict(task) for task, _, _ in shards]
    result = val.combine(spec, config.seed, planned, load_parts(session, job.id))
    for method, block in result["methods"].items():
        failed = [(t, e) for t, status, e in shards if t["method"] == method and status == ShardStatus.FAILED.value]
        block["tasks_failed"] = len(failed)
        block["errors"] = [{"task_index": t["task_index"], "error": e} for t, e in failed[:10]]
    return result


def finalize_run(session: Session, job: Job) -> None:
    """The run kind's ``pipeline.Finalize``: store the portfolio and validation result of the ended run ``job`` in
    the caller's transaction (the pipeline holds the job's row lock and commits). What is already stored is kept
    (runs finalized before this hook existed may have computed it on a read)."""
    run = session.get(BacktestRun, job.id)
    if run is None:
        raise RuntimeError(f"backtest job {job.id} has no run record")
    values: dict[str, Any] = {}
    if run.portfolio is None:
        values["portfolio"] = run_portfolio(session, job, run)
    if run.validation_result is None:
        values["validation_result"] = run_validation_result(session, job, run)
    if any(v is not None for v in values.values()):
        session.execute(update(BacktestRun).where(BacktestRun.job_id == job.id).values(**values))


def finish_ended_run(factory: sessionmaker[Session], job_id: uuid.UUID) -> bool:
    """Finalize a run that ended with no shard left to do it (cancelled while every shard waited). False when it
    is not ended, still has a shard open, or was finalized already (by its last shard or an earlier call)."""
    return jobs.finalize_job(factory, job_id, finalize_run)
