"""Submitting a calculation job: the script compile-checked before anything is written, then the job and its
symbol shards through the pipeline (shared/jobs/pipeline.py)."""

from __future__ import annotations

import datetime as dt
import hashlib
import json
import uuid
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Final

from sqlalchemy.orm import Session, sessionmaker

from shared.domain.sandbox.policy import compile_script
from shared.errors import ScriptCompileError
from shared.infra.config import QUEUE_INTERACTIVE
from shared.infra.events import JobEvents
from shared.infra.models import Job, JobKind
from shared.infra.security import record_compile_refusal
from shared.jobs import pipeline as jobs
from shared.marketdata.bars import data_stamp
from shared.marketdata.series import DEFAULT_TIMEFRAME

# A screener's column is computed on split-adjusted prices: levels stay those of today's quotes and a split does not
# break an indicator; dividends are left out (they would move every past level). Backtests default to total return.
CALCULATION_ADJUSTMENT: Final = "splits"


@dataclass(frozen=True)
class CalculationRequest:
    """A validated calculation request (the API validates the raw body into this)."""

    script: str
    column_name: str
    symbols: list[str]
    start_date: dt.date | None = None
    end_date: dt.date | None = None
    params: dict[str, Any] = field(default_factory=dict)
    timeframe: str = DEFAULT_TIMEFRAME  # of the bars the script sees (stored, or 1w / 1mo resampled from daily)
    adjustment: str = CALCULATION_ADJUSTMENT
    owner_id: str | None = None
    script_id: uuid.UUID | None = None  # set when the script text comes from a saved script ...
    script_version: int | None = None  # ... and this is the version whose exact text is ``script``
    queue: str = QUEUE_INTERACTIVE  # QUEUE_BULK for nightly recalculations (shared/jobs/fairness.py)
    callback_url: str | None = None  # checked by shared/jobs/webhooks.validate_callback_url before it gets here
    sandbox_timeout_s: float | None = None  # the job's own limits (checked against the operator's bounds) ...
    sandbox_memory_mb: int | None = None  # ... None: the worker's
    capture_output: bool = False  # keep each symbol's print output in its result


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
    with factory() as session:
        stamp = data_stamp(session.connection(), request.symbols, request.timeframe)
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
        timeframe=request.timeframe,
        adjustment=request.adjustment,
        symbols_sha256=symbols_sha256(request.symbols),
        data_sha256=stamp.sha256,
        data_version=stamp.version,
        start_date=request.start_date,
        end_date=request.end_date,
        params=json.loads(json.dumps(request.params)),
        sandbox_timeout_s=request.sandbox_timeout_s,
        sandbox_memory_mb=request.sandbox_memory_mb,
        capture_output=request.capture_output,
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
