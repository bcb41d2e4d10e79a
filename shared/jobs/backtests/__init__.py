"""Backtest runs: the engine's config over one symbol or many (and optionally its validation), as a job of kind
``backtest``.

submit.py checks and writes a run (its job, symbol shards, validation tasks and run record); shard.py is what a
worker runs for one shard or validation task; finalize.py is what runs once the run has ended, in the worker that ends
it (portfolio metrics, validation result: the rows its views show); read.py is what views read (rows only, never the
engine); artifacts.py builds its files once it is finalized; retention.py prunes old runs.
"""

from shared.jobs.backtests.finalize import finalize_run, finish_ended_run
from shared.jobs.backtests.read import FINAL_STATUSES, get_run, validation_progress
from shared.jobs.backtests.shard import run_shard
from shared.jobs.backtests.submit import RunRequest, ValidationLimits, submit_run

__all__ = [
    "FINAL_STATUSES",
    "RunRequest",
    "ValidationLimits",
    "finalize_run",
    "finish_ended_run",
    "get_run",
    "run_shard",
    "submit_run",
    "validation_progress",
]
