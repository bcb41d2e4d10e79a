"""Request and response schemas of ``/api/optimizations`` (the spec: shared.jobs.optimizations)."""

from __future__ import annotations

import datetime as dt
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from api.schemas import CallbackView

OptimizationStatus = Literal["queued", "running", "succeeded", "partial", "failed", "cancelled"]


class OptimizationPath(BaseModel):
    optimization_id: str


class OptimizationArtifactPath(BaseModel):
    optimization_id: str
    name: str = Field(max_length=64)


class OptimizationsQuery(BaseModel):
    model_config = ConfigDict(extra="forbid")

    status: OptimizationStatus | None = None
    limit: int = Field(default=50, ge=1, le=200)
    cursor: str | None = Field(default=None, max_length=300, description="next_cursor of the previous page")


class OptimizationResultsQuery(BaseModel):
    model_config = ConfigDict(extra="forbid")

    limit: int = Field(default=100, ge=1, le=1000)
    cursor: str | None = Field(default=None, max_length=500, description="next_cursor of the previous page")
    window: int = Field(default=0, ge=0, le=100_000, description="walk-forward window (0 without walk-forward)")
    include_filtered: bool = Field(default=False, description="also list the rows a constraint filtered out")


class OptimizationLinks(BaseModel):
    self: str
    results: str
    cancel: str
    events: str
    artifacts: str
    job: str


class OptimizationAccepted(BaseModel):
    optimization_id: str
    status: str
    spec_hash: str
    combos: int
    shards: int
    links: OptimizationLinks


class OptimizationProgress(BaseModel):
    shards_total: int
    shards_done: int
    shards_failed: int
    combos_total: int = Field(description="combos x walk-forward windows (or 1)")
    combos_done: int
    percent: float


class OptimizationView(BaseModel):
    optimization_id: str
    name: str | None
    status: str
    owner_id: str
    strategy: str
    spec_hash: str
    spec: dict[str, Any]
    data_sha256: str | None = None  # the data it was created on (its symbols' data versions); another is another
    data_version: int | None = None  # the newest import among its bars then
    combos: int
    progress: OptimizationProgress
    created_at: dt.datetime
    started_at: dt.datetime | None
    finished_at: dt.datetime | None
    error: str | None
    best: dict[str, Any] | None = Field(
        description="once final: the best combo (params, its summary, full metrics of one run_backtest per symbol)"
    )
    combos_passing: int | None = None
    walk_forward: dict[str, Any] | None = Field(
        default=None, description="once final: per window the in-sample choice, the parameter path, stitched equity"
    )
    callback: CallbackView | None = Field(default=None, description="the webhook delivery, if callback_url was given")
    links: OptimizationLinks


class OptimizationSummaryItem(BaseModel):
    optimization_id: str
    name: str | None
    status: str
    strategy: str
    spec_hash: str
    combos: int
    symbols: int
    created_at: dt.datetime
    finished_at: dt.datetime | None
    links: OptimizationLinks


class OptimizationsPage(BaseModel):
    optimizations: list[OptimizationSummaryItem]
    next_cursor: str | None


class RankedRowView(BaseModel):
    rank: int | None = Field(description="1-based among the rows passing every constraint; null when filtered out")
    combo_index: int
    window: int
    params: dict[str, Any]
    metrics: dict[str, float | None]
    symbols: int = Field(description="symbols with bars that the metrics aggregate")
    passed: bool
    reasons: list[str] = Field(description="the constraints this row fails")


class OptimizationResultsPage(BaseModel):
    optimization_id: str
    status: str
    objective: dict[str, Any]
    constraints: list[dict[str, Any]]
    window: int
    passing: int
    total: int
    results: list[RankedRowView]
    next_cursor: str | None
