"""Request and response schemas of ``/api/runs`` (the config itself is the engine's ``BacktestConfig``)."""

from __future__ import annotations

import datetime as dt
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from api.schemas import CallbackView, Progress
from shared.domain.robustness import ValidationSpec

RunStatus = Literal["queued", "running", "succeeded", "partial", "failed", "cancelled"]


class RunPath(BaseModel):
    run_id: str


class RunsQuery(BaseModel):
    model_config = ConfigDict(extra="forbid")

    status: RunStatus | None = None
    strategy: str | None = Field(default=None, max_length=64)
    limit: int = Field(default=50, ge=1, le=200)
    cursor: str | None = Field(default=None, max_length=300)


class RunResultsQuery(BaseModel):
    model_config = ConfigDict(extra="forbid")

    limit: int = Field(default=100, ge=1, le=1000)
    cursor: str | None = Field(default=None, max_length=200)


class RunLinks(BaseModel):
    self: str
    results: str
    cancel: str
    events: str
    artifacts: str
    job: str


class RunAccepted(BaseModel):
    run_id: str
    status: str
    config_hash: str
    shards: int
    symbols: int
    links: RunLinks


class SymbolSummary(BaseModel):
    """A few of the symbol's metrics (all of them: ``GET /api/runs/<id>/results``), or its error."""

    symbol: str
    return_pct: float | None = None
    buy_and_hold_return_pct: float | None = None
    sharpe: float | None = None
    max_drawdown_pct: float | None = None
    trades: int | None = None
    win_rate_pct: float | None = None
    error: dict[str, Any] | None = None


class ValidationProgress(BaseModel):
    """The run's validation tasks (extra shards of its job, counted in ``shards_*`` too)."""

    tasks_total: int
    tasks_done: int = Field(description="finished tasks, failed ones included")
    tasks_failed: int
    work_total: int = Field(description="estimated backtests of all tasks (draws x symbols + baselines)")
    work_done: int


class RunProgress(Progress):
    """``percent`` counts symbols and validation work alike, in backtests: a run whose symbols are done while
    its validation still runs is not near 100 %."""

    validation: ValidationProgress | None = None


class ValidationBody(BaseModel):
    """Wraps the request's ``validation`` so that errors name it (``validation.permutation.n``)."""

    model_config = ConfigDict(extra="forbid")

    validation: ValidationSpec


class RunValidation(BaseModel):
    spec: dict[str, Any] = Field(description="the validation spec as run (all methods off unless given)")
    seed: int = Field(description="the config's seed: every task's random stream derives from it")
    result: dict[str, Any] | None = Field(
        description="once the run is final: each method's result with its method, params, seed, draws and tasks"
    )


class RunSummaryItem(BaseModel):
    run_id: str
    name: str | None
    status: str
    strategy: str
    config_hash: str
    symbols: int
    progress: RunProgress
    created_at: dt.datetime
    finished_at: dt.datetime | None
    links: RunLinks


class RunsPage(BaseModel):
    runs: list[RunSummaryItem]
    next_cursor: str | None


class RunView(BaseModel):
    run_id: str
    name: str | None
    status: str
    owner_id: str
    strategy: str
    config_hash: str
    config: dict[str, Any]
    data_sha256: str | None = Field(
        default=None, description="the data the run was created on (its symbols' data versions); another is another run"
    )
    data_version: int | None = Field(default=None, description="the newest import among the run's bars then")
    progress: RunProgress
    created_at: dt.datetime
    started_at: dt.datetime | None
    finished_at: dt.datetime | None
    error: str | None
    symbols: list[SymbolSummary] = Field(
        description="per symbol, ordered by symbol, once it has finished; the first ones only when "
        "symbols_truncated (every symbol: links.results, paged)"
    )
    symbols_truncated: bool = False
    portfolio: dict[str, Any] | None = Field(
        description="a finished run of several symbols as one portfolio of equal-cash sleeves"
    )
    validation: RunValidation | None = None
    callback: CallbackView | None = Field(default=None, description="the webhook delivery, if callback_url was given")
    links: RunLinks


class RunResultRow(BaseModel):
    symbol: str
    metrics: dict[str, Any] | None
    orders: dict[str, Any] | None = None
    error: dict[str, Any] | None


class RunResultsPage(BaseModel):
    run_id: str
    status: str
    results: list[RunResultRow]
    next_cursor: str | None
