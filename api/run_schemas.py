"""Request and response schemas of ``/api/runs`` (the config itself is the engine's ``BacktestConfig``)."""

from __future__ import annotations

import datetime as dt
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from api.schemas import Progress

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


class RunSummaryItem(BaseModel):
    run_id: str
    name: str | None
    status: str
    strategy: str
    config_hash: str
    symbols: int
    progress: Progress
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
    progress: Progress
    created_at: dt.datetime
    started_at: dt.datetime | None
    finished_at: dt.datetime | None
    error: str | None
    symbols: list[SymbolSummary] = Field(description="per symbol, ordered by symbol, once it has finished")
    portfolio: dict[str, Any] | None = Field(
        description="a finished run of several symbols as one portfolio of equal-cash sleeves"
    )
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
