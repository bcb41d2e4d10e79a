"""Request and response schemas: they validate the API and generate its OpenAPI document."""

from __future__ import annotations

import datetime as dt
import json
import math
import re
from typing import Annotated, Any, Literal

from pydantic import AfterValidator, BaseModel, BeforeValidator, ConfigDict, Field, StrictBool, model_validator

from shared.jobs.calculations.submit import CALCULATION_ADJUSTMENT
from shared.marketdata.bars import SYMBOL_PATTERN

MAX_PARAMS_BYTES = 16_384
_ISO_DATE = re.compile(r"^\d{4}-\d{2}-\d{2}$")


def _symbol(value: str) -> str:
    symbol = value.strip().upper()
    if not symbol:
        raise ValueError("symbol is empty")
    if not SYMBOL_PATTERN.fullmatch(symbol):
        raise ValueError(f"invalid symbol {value[:40]!r}: use letters, digits and . - ^ = _ (at most 32)")
    return symbol


def _iso_date(value: Any) -> Any:
    if isinstance(value, str) and not _ISO_DATE.match(value):
        raise ValueError(f"invalid date {value[:40]!r}: use YYYY-MM-DD")
    if not isinstance(value, (str, dt.date)):
        raise ValueError("invalid date: use a YYYY-MM-DD string")
    return value


def _non_blank(value: str) -> str:
    if not value.strip():
        raise ValueError("must not be empty or blank")
    return value


MAX_PARAMS_DEPTH = 10


def _check_json_value(value: Any, path: str, depth: int) -> None:
    """Only what PostgreSQL's JSONB can take: finite numbers (``1e999`` parses as infinity), bounded depth.
    (NUL characters and lone surrogates are refused for every field in ``api._require_json_body``.)"""
    if depth > MAX_PARAMS_DEPTH:
        raise ValueError(f"{path}: nested deeper than {MAX_PARAMS_DEPTH} levels")
    if isinstance(value, float) and not math.isfinite(value):
        raise ValueError(f"{path}: numbers must be finite")
    if isinstance(value, dict):
        for key, item in value.items():
            _check_json_value(item, f"{path}.{key}", depth + 1)
    elif isinstance(value, list):
        for index, item in enumerate(value):
            _check_json_value(item, f"{path}[{index}]", depth + 1)


def _params(value: dict[str, Any]) -> dict[str, Any]:
    _check_json_value(value, "params", 0)
    if len(json.dumps(value)) > MAX_PARAMS_BYTES:
        raise ValueError(f"params larger than {MAX_PARAMS_BYTES} bytes as JSON")
    return value


def _column_name(value: str) -> str:
    value = _non_blank(value).strip()
    if not value.isprintable():
        raise ValueError("must contain only printable characters")
    return value


StockSymbol = Annotated[str, AfterValidator(_symbol)]
IsoDate = Annotated[dt.date, BeforeValidator(_iso_date)]


Timeframe = Literal["1m", "5m", "15m", "30m", "1h", "1d", "1w", "1mo"]
Adjustment = Literal["none", "splits", "total_return"]


class CalculationExecuteBody(BaseModel):
    """Run a script over each symbol's bars. The script assigns `result` (a finite number or None)."""

    model_config = ConfigDict(extra="forbid")

    script: Annotated[str, AfterValidator(_non_blank)] | None = Field(
        default=None,
        description="Python source run per symbol in the sandbox (at most ALPHAFORGE_MAX_SCRIPT_CHARS characters);"
        " give exactly one of script and script_id",
    )
    script_id: str | None = Field(default=None, max_length=64, description="run one of your saved scripts")
    version: int | None = Field(default=None, ge=1, description="with script_id: run this version (default: latest)")
    column_name: Annotated[str, AfterValidator(_column_name)] = Field(max_length=100)
    stock_symbols: list[StockSymbol] = Field(min_length=1, description="symbols; duplicates are removed, order kept")
    start_date: IsoDate | None = None
    end_date: IsoDate | None = None
    as_of: IsoDate | None = Field(
        default=None, description="keep only the symbols listed on this day (delisted ones included, later ones not)"
    )
    timeframe: Timeframe = Field(
        default="1d", description="bars the script sees: stored ones, or coarser ones resampled (1w, 1mo from daily)"
    )
    adjustment: Adjustment = Field(
        default=CALCULATION_ADJUSTMENT,
        description="prices adjusted for corporate actions, backward: none (as traded), splits, or total_return "
        "(splits and dividends). Default splits: levels stay today's quotes and a split breaks no indicator",
    )
    params: Annotated[dict[str, Any], AfterValidator(_params)] = Field(default_factory=dict)
    callback_url: str | None = Field(
        default=None, max_length=2000, description="POSTed a signed JSON summary when the job ends (http/https, public)"
    )
    timeout: float | None = Field(
        default=None,
        description="wall-clock seconds the script may take per symbol, within GET /api/security/limits (default: "
        "ALPHAFORGE_SANDBOX_TIMEOUT)",
    )
    memory_mb: int | None = Field(
        default=None,
        description="memory the sandbox may allocate, MB, within GET /api/security/limits (default: "
        "ALPHAFORGE_SANDBOX_MEMORY_MB)",
    )
    capture_output: StrictBool = Field(
        default=False,
        description="keep what the script prints, per symbol, in its result's `output` (bounded per symbol and per "
        "job; `output_dropped` counts the characters past the bound)",
    )

    @model_validator(mode="after")
    def _date_order(self) -> CalculationExecuteBody:
        if self.start_date and self.end_date and self.start_date > self.end_date:
            raise ValueError("start_date must not be after end_date")
        return self


class JobPath(BaseModel):
    job_id: str


class ResultsQuery(BaseModel):
    model_config = ConfigDict(extra="forbid")

    limit: int = Field(default=100, ge=1, le=1000)
    cursor: str | None = Field(default=None, max_length=200)


class JobLinks(BaseModel):
    self: str
    results: str
    cancel: str


class JobAccepted(BaseModel):
    job_id: str
    status: str
    shards: int
    symbols: int
    links: JobLinks


class Progress(BaseModel):
    shards_total: int
    shards_done: int
    shards_failed: int
    symbols_total: int
    symbols_done: int
    symbols_failed: int
    percent: float


class Reproducibility(BaseModel):
    script_sha256: str
    symbols_sha256: str
    data_sha256: str | None = None  # the data the job was submitted on: the SHA-256 of its symbols' data versions
    data_version: int | None = None  # the newest import among them
    symbol_count: int
    start_date: dt.date | None
    end_date: dt.date | None
    timeframe: str = "1d"
    adjustment: str = "none"
    params: dict[str, Any]
    shard_size: int


class SecurityRejection(BaseModel):
    symbol: str | None
    layer: str
    reason: str
    explanation: str
    detail: str


class Rejections(BaseModel):
    """What the sandbox refused while running the job (README, "The sandbox")."""

    total: int
    by_reason: dict[str, int]
    events: list[SecurityRejection]
    truncated: bool


class ScriptRef(BaseModel):
    """The saved script a job ran, and the exact version (its text is the job's; the script may be gone)."""

    script_id: str
    version: int


class JobView(BaseModel):
    job_id: str
    kind: str
    status: str
    owner_id: str | None
    script: ScriptRef | None = None
    column_name: str
    progress: Progress
    created_at: dt.datetime
    started_at: dt.datetime | None
    finished_at: dt.datetime | None
    error: str | None
    reproducibility: Reproducibility
    links: JobLinks
    rejections: Rejections | None = None
    callback: CallbackView | None = None
    compute: dict[str, Any] | None = Field(
        default=None,
        description="sandbox CPU seconds the job used (`cpu_s`, as the supervisor measured them), the budget it is "
        "charged to, and its owner's standing on that budget today (`used_s`, `limit_s`, `left_s`, `resets_at`)",
    )


class CallbackView(BaseModel):
    """The job's webhook: its delivery state and attempts (details: ``GET /api/jobs/<id>/callback-deliveries``)."""

    url: str
    state: str  # pending | delivered | failed
    attempts: int
    next_attempt_at: dt.datetime | None
    last_error: str | None


class ResultError(BaseModel):
    type: str
    message: str
    line: int | None = None


class ResultRow(BaseModel):
    symbol: str
    value: float | None
    error: ResultError | None
    output: str | None = Field(default=None, description="what the script printed (jobs with capture_output)")
    output_dropped: int | None = Field(default=None, description="characters printed past the bound")


class ResultsPage(BaseModel):
    job_id: str
    column_name: str
    status: str
    results: list[ResultRow]
    next_cursor: str | None


class HealthView(BaseModel):
    status: str
    database: dict[str, Any]
    broker: dict[str, Any]
    workers: dict[str, Any]
    sandbox: dict[str, Any]


class ErrorBody(BaseModel):
    code: str
    message: str
    details: dict[str, Any]


class ErrorResponse(BaseModel):
    error: ErrorBody
