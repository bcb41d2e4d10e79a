"""Request and response schemas of interactive runs (api/interactive.py)."""

from __future__ import annotations

from typing import Annotated, Any

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, StrictBool, model_validator

from api.schemas import Adjustment, IsoDate, JobLinks, StockSymbol, Timeframe, _non_blank, _params
from shared.jobs.calculations.submit import CALCULATION_ADJUSTMENT


class TryBody(BaseModel):
    """Run a calculation script once, on one symbol's bars, and see its value or error and what it printed."""

    model_config = ConfigDict(extra="forbid")

    script: Annotated[str, AfterValidator(_non_blank)] | None = Field(
        default=None, description="Python source (give exactly one of script and script_id)"
    )
    script_id: str | None = Field(default=None, max_length=64, description="one of your saved calculation scripts")
    version: int | None = Field(default=None, ge=1, description="with script_id: this version (default: latest)")
    symbol: StockSymbol
    params: Annotated[dict[str, Any], AfterValidator(_params)] = Field(default_factory=dict)
    start_date: IsoDate | None = None
    end_date: IsoDate | None = None
    timeframe: Timeframe = "1d"
    adjustment: Adjustment = CALCULATION_ADJUSTMENT
    timeout: float | None = Field(default=None, description="seconds; within GET /api/security/limits")
    memory_mb: int | None = Field(default=None, description="MB; within GET /api/security/limits")

    @model_validator(mode="after")
    def _date_order(self) -> TryBody:
        if self.start_date and self.end_date and self.start_date > self.end_date:
            raise ValueError("start_date must not be after end_date")
        return self


class ExecuteBody(BaseModel):
    """Execute a snippet in the sandbox (no bars): what it printed, its error, and optionally its locals."""

    model_config = ConfigDict(extra="forbid")

    code: Annotated[str, AfterValidator(_non_blank)]
    timeout: float | None = Field(default=None, description="seconds; within GET /api/security/limits (default 30)")
    max_memory_mb: int | None = Field(default=None, description="MB; within GET /api/security/limits (default 512)")
    return_locals: StrictBool = Field(default=False, description="answer the snippet's top-level names too")


class ScriptError(BaseModel):
    type: str
    message: str
    line: int | None = None


class TryAnswer(BaseModel):
    job_id: str | None
    status: str
    symbol: str
    value: float | None
    error: ScriptError | None
    output: str
    output_truncated: bool
    output_dropped: int
    execution_time: float | None
    memory_used_mb: float | None


class ExecuteAnswer(BaseModel):
    job_id: str | None
    success: bool
    stdout: str
    stderr: str
    error_type: str | None
    error_message: str | None
    execution_time: float | None
    memory_used_mb: float | None
    output_truncated: bool = False
    locals: dict[str, Any] | None = None


class StillRunning(BaseModel):
    """The run did not end within the wait: poll the job."""

    job_id: str
    status: str
    links: JobLinks


class Bounds(BaseModel):
    min: float
    max: float
    default: float


class LimitsView(BaseModel):
    """What interactive runs and calculation jobs may ask of the sandbox (the operator's configuration)."""

    timeout: Bounds
    max_memory_mb: Bounds
    job_timeout: Bounds
    job_memory_mb: Bounds
    output_chars_per_symbol: int
    output_chars_per_job: int
    interactive_wait_s: float


class SandboxHealth(BaseModel):
    status: str
    workers: dict[str, Any]
    inactive: list[str]
