"""What a worker runs for an interactive run: the script on its symbol's bars (try) or the snippet alone (execute),
in the sandbox, with the run's own limits; the one outcome carries the answer's measures."""

from __future__ import annotations

import logging
from dataclasses import replace

from sqlalchemy import select
from sqlalchemy.orm import Session, sessionmaker

from shared.accounts import quotas as quota
from shared.infra.config import SandboxLimits
from shared.infra.events import JobEvents
from shared.infra.models import Symbol
from shared.infra.sandbox_config import ComputeQuotas
from shared.infra.security import record
from shared.jobs import pipeline as jobs
from shared.jobs.interactive.submit import MODE_TRY
from shared.marketdata.bars import load_bars
from shared.sandbox.runner import SandboxUsage, run_script, run_snippet

log = logging.getLogger(__name__)


def _try(factory: sessionmaker[Session], started: jobs.StartedShard, limits: SandboxLimits,
         usage: SandboxUsage) -> jobs.Outcome:  # fmt: skip
    job = started.job
    symbol = job.symbols[0]
    with factory() as session:
        bars = load_bars(session.connection(), [symbol], job.start_date, job.end_date, timeframe=job.timeframe,
                         adjustment=job.adjustment)  # fmt: skip
        known = bars or session.scalar(select(Symbol.symbol).where(Symbol.symbol == symbol)) is not None
    if symbol not in bars:
        kind, message = ("NoData", f"no bars for {symbol} in that range") if known else (
            "UnknownSymbol", f"unknown symbol {symbol}")  # fmt: skip
        return jobs.Outcome(symbol, None, {"type": kind, "message": message, "line": None})
    outcome = run_script(job.script, job.params.get("params", {}), [bars[symbol]], limits, capture_output=True,
                         usage=usage)[0]  # fmt: skip
    return replace(outcome, data_version=bars[symbol].version)


def run_interactive(
    factory: sessionmaker[Session],
    shard_id: int,
    *,
    limits: SandboxLimits,
    events: JobEvents | None = None,
    quotas: ComputeQuotas | None = None,
) -> bool | None:
    """Run the interactive job of ``shard_id`` end to end (None: nothing to do; True/False: stored or a duplicate)."""
    started = jobs.start_shard(factory, shard_id, events=events)
    if started is None:
        return None
    job = started.job
    limits = replace(limits, symbol_timeout_s=job.sandbox_timeout_s or limits.symbol_timeout_s,
                     memory_mb=job.sandbox_memory_mb or limits.memory_mb)  # fmt: skip
    usage = SandboxUsage()
    stopped = None
    if quotas is not None:
        with factory() as session:
            stopped = quota.exhausted(session, job.owner_id, quota.BUDGET_INTERACTIVE, quotas)
    if stopped is not None:
        outcome = jobs.Outcome(job.symbols[0], None, {"type": "QuotaExceeded", "message": stopped, "line": None})
    elif job.column_name == MODE_TRY:
        outcome = _try(factory, started, limits, usage)
    else:
        outcome = run_snippet(job.script, job.params.get("params", {}), limits, usage=usage)
        if not job.params.get("return_locals"):
            outcome = replace(outcome, data={k: v for k, v in (outcome.data or {}).items() if k != "locals"})
    quota.charge(factory, job.id, job.owner_id, quota.BUDGET_INTERACTIVE, usage.settle().cpu_s)
    measures = {
        "execution_time": round(sum(usage.item_seconds), 6),
        "memory_used_mb": round(max(usage.peak_memory_kb, 0) / 1024, 3),
        "cpu_s": round(usage.cpu_s, 6),
    }
    outcome = replace(outcome, data={**(outcome.data or {}), **measures})
    record(factory, [(outcome.symbol, i) for i in outcome.incidents], job_id=job.id, owner_id=job.owner_id)
    return jobs.complete_shard(factory, shard_id, [outcome], events=events)
