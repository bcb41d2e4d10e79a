"""One calculation shard: its symbols' bars loaded a batch at a time (``ALPHAFORGE_BATCH_BARS`` bars: a shard of
intraday series holds no more than one of daily bars), the script run over each in the sandbox
(shared/sandbox/runner.py), one outcome per symbol for the pipeline to store. A calculation needs no finalize
step: the pipeline's last shard ends the job, and views read its result rows."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import replace
from typing import Any, Protocol

from sqlalchemy import select
from sqlalchemy.orm import Session, sessionmaker

from shared.accounts import quotas as quota
from shared.infra.config import SandboxLimits
from shared.infra.events import JobEvents
from shared.infra.models import Job, Symbol
from shared.infra.sandbox_config import ComputeQuotas
from shared.infra.security import record
from shared.jobs import pipeline as jobs
from shared.marketdata.bars import DEFAULT_BATCH_BARS, SymbolBars, bar_batches
from shared.sandbox.runner import SandboxUsage

log = logging.getLogger(__name__)


class ScriptRunner(Protocol):
    """Runs a script over bars in the sandbox (shared/sandbox/runner.run_script): one outcome per symbol."""

    def __call__(
        self,
        script: str,
        params: dict[str, Any],
        items: Sequence[SymbolBars],
        limits: SandboxLimits,
        *,
        capture_output: bool = False,
        usage: SandboxUsage | None = None,
    ) -> Sequence[jobs.Outcome]: ...


def job_limits(limits: SandboxLimits, job: Job, job_output_chars: int) -> SandboxLimits:
    """The sandbox limits a job runs with: the worker's, with the job's own timeout and memory where it asked for
    them, and each symbol's share of the job's print output bound."""
    share = job_output_chars // max(job.symbols_total, 1)
    return replace(
        limits,
        symbol_timeout_s=job.sandbox_timeout_s or limits.symbol_timeout_s,
        memory_mb=job.sandbox_memory_mb or limits.memory_mb,
        max_output_chars=min(limits.max_output_chars, share),
    )


def _missing_outcome(symbol: str, known: set[str], job: Job) -> jobs.Outcome:
    if symbol not in known:
        return jobs.Outcome(
            symbol, None, {"type": "UnknownSymbol", "message": f"unknown symbol {symbol}", "line": None}
        )
    start = job.start_date.isoformat() if job.start_date else "the first bar"
    end = job.end_date.isoformat() if job.end_date else "the last bar"
    message = f"no bars for {symbol} between {start} and {end}"
    return jobs.Outcome(symbol, None, {"type": "NoData", "message": message, "line": None})


def run_shard(
    factory: sessionmaker[Session],
    shard_id: int,
    *,
    limits: SandboxLimits,
    runner: ScriptRunner,
    events: JobEvents | None = None,
    batch_bars: int = DEFAULT_BATCH_BARS,
    job_output_chars: int = 1_000_000,
    quotas: ComputeQuotas | None = None,
) -> bool | None:
    """Run one shard end to end. None: nothing to do (finished, cancelled or duplicate).
    True/False: whether this delivery's results were the ones stored."""
    started = jobs.start_shard(factory, shard_id, events=events)
    if started is None:
        log.info("shard %s: nothing to do (finished, cancelled or job inactive)", shard_id)
        return None
    job = started.job
    limits = job_limits(limits, job, job_output_chars)
    budget = quota.budget_of(job)
    usage = SandboxUsage()
    stopped: str | None = None  # why the rest of the shard does not run: its owner's budget is used up
    computed: dict[str, jobs.Outcome] = {}
    versions: dict[str, int] = {}  # the data version each symbol's outcome was computed from
    batches = bar_batches(factory, started.symbols, job.start_date, job.end_date, timeframe=job.timeframe,
                               adjustment=job.adjustment, max_bars=batch_bars)  # fmt: skip
    for group, bars in batches:
        if quotas is not None:
            with factory() as session:
                stopped = quota.exhausted(session, job.owner_id, budget, quotas)
            if stopped is not None:
                break
        present = [bars[s] for s in group if s in bars]
        outcomes = runner(job.script, job.params, present, limits, capture_output=job.capture_output, usage=usage)
        computed |= {o.symbol: o for o in outcomes}
        versions |= {s: b.version for s, b in bars.items()}
        del bars, present
    # Before the results: a job's CPU is complete when the job is final (its view never changes after).
    quota.charge(factory, job.id, job.owner_id, budget, usage.settle().cpu_s)
    if stopped is not None:
        log.info("shard %s: %s; its remaining symbols stop", shard_id, stopped)
        error = {"type": "QuotaExceeded", "message": stopped, "line": None}
        computed |= {s: jobs.Outcome(s, None, error) for s in started.symbols if s not in computed}
    missing = [s for s in started.symbols if s not in computed]
    with factory() as session:
        known = set(session.scalars(select(Symbol.symbol).where(Symbol.symbol.in_(missing)))) if missing else set()
    outcomes = [computed[s] if s in computed else _missing_outcome(s, known, job) for s in started.symbols]
    outcomes = jobs.read_at(outcomes, versions)
    # Recorded before the results, in a transaction of their own: a rejection happened whether or not
    # this delivery's results end up stored, and a retried shard that is rejected again is a new event.
    record(factory, [(o.symbol, i) for o in outcomes for i in o.incidents], job_id=job.id, owner_id=job.owner_id)
    return jobs.complete_shard(factory, shard_id, outcomes, events=events)
