"""Writing an interactive run: one job of kind ``interactive`` with one shard, on the sandbox queue."""

from __future__ import annotations

import datetime as dt
import json
import time
import uuid
from dataclasses import dataclass, field
from typing import Any, Final

from sqlalchemy import select
from sqlalchemy.orm import Session, sessionmaker

from shared.infra.config import QUEUE_SANDBOX
from shared.infra.events import JobEvents
from shared.infra.models import Job, JobKind
from shared.jobs import pipeline as jobs
from shared.jobs.calculations.submit import CALCULATION_ADJUSTMENT, sha256_text, symbols_sha256
from shared.marketdata.series import DEFAULT_TIMEFRAME
from shared.sandbox.runner import SNIPPET

MODE_TRY: Final = "try"  # a script on one symbol's bars: its value or error, and what it printed
MODE_EXECUTE: Final = "execute"  # a snippet with no bars: what it printed, its error, its top-level names


@dataclass(frozen=True)
class InteractiveRequest:
    """A validated interactive run (the API checks the limits against the operator's bounds first)."""

    mode: str
    script: str
    timeout_s: float
    memory_mb: int
    owner_id: str | None
    symbol: str | None = None  # MODE_TRY only
    params: dict[str, Any] = field(default_factory=dict)
    start_date: dt.date | None = None
    end_date: dt.date | None = None
    timeframe: str = DEFAULT_TIMEFRAME
    adjustment: str = CALCULATION_ADJUSTMENT
    return_locals: bool = False  # MODE_EXECUTE: answer the snippet's top-level names too
    script_id: uuid.UUID | None = None
    script_version: int | None = None


def submit_interactive(
    factory: sessionmaker[Session],
    request: InteractiveRequest,
    *,
    enqueue: jobs.Enqueue,
    events: JobEvents | None = None,
) -> Job:
    """Write the run's job and shard and enqueue it (the script was compile-checked by the caller)."""
    symbols = [request.symbol if request.mode == MODE_TRY and request.symbol else SNIPPET]
    job = Job(
        kind=JobKind.INTERACTIVE.value,
        owner_id=request.owner_id,
        column_name=request.mode,
        script=request.script,
        script_sha256=sha256_text(request.script),
        script_id=request.script_id,
        script_version=request.script_version,
        queue=QUEUE_SANDBOX,
        symbols=symbols,
        symbols_sha256=symbols_sha256(symbols),
        timeframe=request.timeframe,
        adjustment=request.adjustment,
        start_date=request.start_date,
        end_date=request.end_date,
        params={"params": json.loads(json.dumps(request.params)), "return_locals": request.return_locals},
        sandbox_timeout_s=request.timeout_s,
        sandbox_memory_mb=request.memory_mb,
        capture_output=True,
    )
    return jobs.submit(factory, job, 1, enqueue, events=events)


def wait_final(factory: sessionmaker[Session], job_id: uuid.UUID, wait_s: float) -> bool:
    """Whether the run ended within ``wait_s`` (the job's status read with a backoff from 2 to 50 ms)."""
    deadline = time.monotonic() + wait_s
    pause = 0.002
    while True:
        with factory() as session:
            if session.scalar(select(Job.status).where(Job.id == job_id)) in jobs.FINAL_STATUSES:
                return True
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            return False
        time.sleep(min(pause, remaining))
        pause = min(pause * 2, 0.05)
