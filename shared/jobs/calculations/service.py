"""Calculation jobs: a user's script computed over each symbol's daily bars (a screener's custom column)."""

from __future__ import annotations

import datetime as dt
import hashlib
import json
import logging
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from sqlalchemy import select
from sqlalchemy.orm import Session, sessionmaker

from shared.domain.sandbox.policy import compile_script
from shared.errors import ScriptCompileError
from shared.infra.config import QUEUE_INTERACTIVE, SandboxLimits
from shared.infra.events import JobEvents
from shared.infra.models import Job, JobKind, Symbol
from shared.infra.security import record, record_compile_refusal
from shared.jobs import pipeline as jobs
from shared.marketdata.bars import SymbolBars, load_bars

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class CalculationRequest:
    """A validated calculation request (the API validates the raw body into this)."""

    script: str
    column_name: str
    symbols: list[str]
    start_date: dt.date | None = None
    end_date: dt.date | None = None
    params: dict[str, Any] = field(default_factory=dict)
    owner_id: str | None = None
    script_id: uuid.UUID | None = None  # set when the script text comes from a saved script ...
    script_version: int | None = None  # ... and this is the version whose exact text is ``script``
    queue: str = QUEUE_INTERACTIVE  # QUEUE_BULK for nightly recalculations (shared/jobs/fairness.py)
    callback_url: str | None = None  # checked by shared/jobs/webhooks.validate_callback_url before it gets here


def sha256_text(value: str) -> str:
    return hashlib.sha256(value.encode("utf-8")).hexdigest()


def symbols_sha256(symbols: Sequence[str]) -> str:
    """Hash of the ordered symbol list (newline-joined), for the reproducibility record."""
    return sha256_text("\n".join(symbols))


def submit_calculation(
    factory: sessionmaker[Session],
    request: CalculationRequest,
    *,
    shard_size: int,
    enqueue: jobs.Enqueue,
    max_active_per_owner: int | None = None,
    on_write: jobs.OnWrite | None = None,
    events: JobEvents | None = None,
) -> Job:
    """Compile-check the script (nothing is written if it fails), then write and enqueue the job."""
    check_script(factory, request.script, owner_id=request.owner_id)
    job = Job(
        kind=JobKind.CALCULATION.value,
        owner_id=request.owner_id,
        column_name=request.column_name,
        script=request.script,
        script_sha256=sha256_text(request.script),
        script_id=request.script_id,
        script_version=request.script_version,
        queue=request.queue,
        callback_url=request.callback_url,
        callback_state="pending" if request.callback_url else None,
        symbols=list(request.symbols),
        symbols_sha256=symbols_sha256(request.symbols),
        start_date=request.start_date,
        end_date=request.end_date,
        params=json.loads(json.dumps(request.params)),
    )
    return jobs.submit(
        factory, job, shard_size, enqueue, max_active_per_owner=max_active_per_owner, on_write=on_write, events=events
    )


def check_script(factory: sessionmaker[Session], source: str, *, owner_id: str | None) -> None:
    """Compile ``source`` under the sandbox policy; a policy refusal is recorded as a security event."""
    try:
        compile_script(source)
    except ScriptCompileError as exc:
        record_compile_refusal(factory, exc, owner_id=owner_id)
        raise


ScriptRunner = Callable[[str, dict[str, Any], Sequence[SymbolBars], SandboxLimits], Sequence[jobs.Outcome]]
"""Runs a script over bars in the sandbox (shared/sandbox/runner.run_script): one outcome per symbol."""


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
) -> bool | None:
    """Run one shard end to end. None: nothing to do (finished, cancelled or duplicate).
    True/False: whether this delivery's results were the ones stored."""
    started = jobs.start_shard(factory, shard_id, events=events)
    if started is None:
        log.info("shard %s: nothing to do (finished, cancelled or job inactive)", shard_id)
        return None
    job = started.job
    with factory() as session:
        bars = load_bars(session.connection(), started.symbols, job.start_date, job.end_date)
        missing = [s for s in started.symbols if s not in bars]
        known = set(session.scalars(select(Symbol.symbol).where(Symbol.symbol.in_(missing)))) if missing else set()
    present = [bars[s] for s in started.symbols if s in bars]
    computed = {o.symbol: o for o in runner(job.script, job.params, present, limits)}
    outcomes = [computed[s] if s in computed else _missing_outcome(s, known, job) for s in started.symbols]
    # Recorded before the results, in a transaction of their own: a rejection happened whether or not
    # this delivery's results end up stored, and a retried shard that is rejected again is a new event.
    record(factory, [(o.symbol, i) for o in outcomes for i in o.incidents], job_id=job.id, owner_id=job.owner_id)
    return jobs.complete_shard(factory, shard_id, outcomes, events=events)
