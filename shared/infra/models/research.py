"""Backtest runs, their curves, validation and artifacts; saved universes, presets; optimisations."""

from __future__ import annotations

import datetime as dt
import uuid
from typing import Any

from sqlalchemy import (
    BigInteger,
    CheckConstraint,
    DateTime,
    Double,
    ForeignKey,
    Index,
    Integer,
    LargeBinary,
    String,
    Text,
    UniqueConstraint,
    func,
)
from sqlalchemy.dialects.postgresql import ARRAY, JSONB, UUID
from sqlalchemy.orm import Mapped, mapped_column

from shared.infra.models.base import Base


class BacktestRun(Base):
    """A backtest job's run record: its validated config and the config's canonical hash.

    The job row (kind ``backtest``) carries status, shards and per-symbol results like any job; this row adds
    what only a run has. ``(owner_id, config_hash, data_sha256)`` is unique: submitting the same config on the same
    data finds this run; on changed data (a re-import: new data versions) it makes a new one.
    """

    __tablename__ = "backtest_runs"
    __table_args__ = (
        UniqueConstraint("owner_id", "config_hash", "data_sha256", name="uq_backtest_runs_owner_config_data"),
        Index("ix_backtest_runs_owner_created", "owner_id", "created_at"),
    )

    job_id: Mapped[uuid.UUID] = mapped_column(
        UUID(as_uuid=True), ForeignKey("jobs.id", ondelete="CASCADE"), primary_key=True
    )
    owner_id: Mapped[str] = mapped_column(String(64), ForeignKey("users.id", ondelete="CASCADE"), nullable=False)
    name: Mapped[str | None] = mapped_column(String(100))
    strategy: Mapped[str] = mapped_column(String(64), nullable=False)
    config: Mapped[dict[str, Any]] = mapped_column(JSONB, nullable=False)
    config_hash: Mapped[str] = mapped_column(String(64), nullable=False)
    data_sha256: Mapped[str | None] = mapped_column(String(64))  # its job's (NULL before data versions)
    # Portfolio-level metrics of a finished multi-symbol run (equal-cash sleeves), computed once on first read.
    portfolio: Mapped[dict[str, Any] | None] = mapped_column(JSONB(none_as_null=True))
    # The run's validation spec (shared.domain.robustness.ValidationSpec; NULL: none) and, once the run is final, the
    # result combined from its tasks' parts (computed once, then kept).
    validation: Mapped[dict[str, Any] | None] = mapped_column(JSONB(none_as_null=True))
    validation_result: Mapped[dict[str, Any] | None] = mapped_column(JSONB(none_as_null=True))
    # A script strategy's exact code (the pinned version's text, copied at submission like a calculation job's
    # script): the run stays explainable and runnable after the script changes or is deleted.
    strategy_code: Mapped[str | None] = mapped_column(Text)
    created_at: Mapped[dt.datetime] = mapped_column(DateTime(timezone=True), server_default=func.now())


class BacktestCurve(Base):
    """One symbol's daily equity curve in a run (for portfolio metrics, charts): written by the shard task."""

    __tablename__ = "backtest_curves"

    job_id: Mapped[uuid.UUID] = mapped_column(
        UUID(as_uuid=True), ForeignKey("jobs.id", ondelete="CASCADE"), primary_key=True
    )
    symbol: Mapped[str] = mapped_column(String(32), primary_key=True)
    # Compact (backtests.shard.pack_curve / read.load_curves): dates as big-endian int32 days since 1970-01-01,
    # equity and benchmark as big-endian float64; arrays of dates and doubles cost ~15x more to write.
    dates: Mapped[bytes] = mapped_column(LargeBinary, nullable=False)
    equity: Mapped[bytes] = mapped_column(LargeBinary, nullable=False)
    # Buy and hold of the same cash from the first tradable bar (the chart's benchmark), and the closed trades.
    benchmark: Mapped[bytes | None] = mapped_column(LargeBinary)
    trades: Mapped[list[dict[str, Any]]] = mapped_column(JSONB, nullable=False, server_default="[]", default=list)


class RunValidationPart(Base):
    """What one validation task of a run produced: its draws as float64 bytes (a bootstrap draw is three
    values) and its baseline or, for walk-forward, its symbols' results (``detail``)."""

    __tablename__ = "run_validation_parts"

    job_id: Mapped[uuid.UUID] = mapped_column(
        UUID(as_uuid=True), ForeignKey("jobs.id", ondelete="CASCADE"), primary_key=True
    )
    method: Mapped[str] = mapped_column(String(32), primary_key=True)
    task_index: Mapped[int] = mapped_column(Integer, primary_key=True)
    draws: Mapped[bytes] = mapped_column(LargeBinary, nullable=False)
    detail: Mapped[dict[str, Any]] = mapped_column(JSONB, nullable=False)
    computed_at: Mapped[dt.datetime] = mapped_column(DateTime(timezone=True), server_default=func.now())


class RunManifest(Base):
    """The manifest of a run's artifacts: each file's name, size and SHA-256, chained to the owner's previous
    manifest (``chain_prev`` is that manifest's ``manifest_sha256``) so that an altered or removed file, or a
    rewritten manifest, is detectable. No foreign keys on purpose: the chain must outlive deleted runs."""

    __tablename__ = "run_manifests"
    __table_args__ = (
        UniqueConstraint("job_id", name="uq_run_manifests_job"),
        Index("ix_run_manifests_owner_id", "owner_id", "id"),
    )

    id: Mapped[int] = mapped_column(BigInteger, primary_key=True, autoincrement=True)
    job_id: Mapped[uuid.UUID] = mapped_column(UUID(as_uuid=True), nullable=False)
    owner_id: Mapped[str] = mapped_column(String(64), nullable=False)
    location: Mapped[str] = mapped_column(Text, nullable=False)  # the artifact directory
    manifest: Mapped[dict[str, Any]] = mapped_column(JSONB, nullable=False)
    manifest_sha256: Mapped[str] = mapped_column(String(64), nullable=False)
    chain_prev: Mapped[str | None] = mapped_column(String(64))
    created_at: Mapped[dt.datetime] = mapped_column(DateTime(timezone=True), server_default=func.now())


class SavedUniverse(Base):
    """A user's named list of symbols (``/api/universes``); a run may be created over it by id or name."""

    __tablename__ = "universes"
    __table_args__ = (
        UniqueConstraint("owner_id", "name", name="uq_universes_owner_name"),
        CheckConstraint("cardinality(symbols) > 0", name="ck_universes_symbols"),
        CheckConstraint(
            "timeframe IN ('1m', '5m', '15m', '30m', '1h', '1d', '1w', '1mo')", name="ck_universes_timeframe"
        ),
    )

    id: Mapped[uuid.UUID] = mapped_column(UUID(as_uuid=True), primary_key=True, default=uuid.uuid4)
    owner_id: Mapped[str] = mapped_column(String(64), ForeignKey("users.id", ondelete="CASCADE"), nullable=False)
    name: Mapped[str] = mapped_column(String(100), nullable=False)
    description: Mapped[str] = mapped_column(Text, nullable=False, default="")
    symbols: Mapped[list[str]] = mapped_column(ARRAY(String(32)), nullable=False)
    timeframe: Mapped[str] = mapped_column(String(4), nullable=False, default="1d", server_default="1d")
    version: Mapped[int] = mapped_column(Integer, nullable=False, default=1)
    created_at: Mapped[dt.datetime] = mapped_column(DateTime(timezone=True), server_default=func.now())
    updated_at: Mapped[dt.datetime] = mapped_column(DateTime(timezone=True), server_default=func.now())


class Preset(Base):
    """A user's named backtest config without symbols (``/api/presets``); a run may start from it.
    ``config_hash`` is the SHA-256 of the config's canonical JSON: creating the same name and config again
    finds this row."""

    __tablename__ = "presets"
    __table_args__ = (UniqueConstraint("owner_id", "name", name="uq_presets_owner_name"),)

    id: Mapped[uuid.UUID] = mapped_column(UUID(as_uuid=True), primary_key=True, default=uuid.uuid4)
    owner_id: Mapped[str] = mapped_column(String(64), ForeignKey("users.id", ondelete="CASCADE"), nullable=False)
    name: Mapped[str] = mapped_column(String(100), nullable=False)
    description: Mapped[str] = mapped_column(Text, nullable=False, default="")
    config: Mapped[dict[str, Any]] = mapped_column(JSONB, nullable=False)
    config_hash: Mapped[str] = mapped_column(String(64), nullable=False)
    version: Mapped[int] = mapped_column(Integer, nullable=False, default=1)
    created_at: Mapped[dt.datetime] = mapped_column(DateTime(timezone=True), server_default=func.now())
    updated_at: Mapped[dt.datetime] = mapped_column(DateTime(timezone=True), server_default=func.now())


class Optimization(Base):
    """An optimisation job's record (``shared.jobs.optimizations``): its validated spec and the spec's canonical hash.

    The job row (kind ``optimization``) carries status and shards (one per slice of combos, ``JobShard.task``);
    ``(owner_id, spec_hash, data_sha256)`` is unique: the same spec on the same data finds this row. ``outcome`` (best
    combo with full metrics, walk-forward path) is computed once the job is final, then kept."""

    __tablename__ = "optimizations"
    __table_args__ = (
        UniqueConstraint("owner_id", "spec_hash", "data_sha256", name="uq_optimizations_owner_spec_data"),
        Index("ix_optimizations_owner_created", "owner_id", "created_at"),
    )

    job_id: Mapped[uuid.UUID] = mapped_column(
        UUID(as_uuid=True), ForeignKey("jobs.id", ondelete="CASCADE"), primary_key=True
    )
    owner_id: Mapped[str] = mapped_column(String(64), ForeignKey("users.id", ondelete="CASCADE"), nullable=False)
    name: Mapped[str | None] = mapped_column(String(100))
    strategy: Mapped[str] = mapped_column(String(64), nullable=False)
    spec: Mapped[dict[str, Any]] = mapped_column(JSONB, nullable=False)
    spec_hash: Mapped[str] = mapped_column(String(64), nullable=False)
    data_sha256: Mapped[str | None] = mapped_column(String(64))  # its job's (NULL before data versions)
    combos: Mapped[int] = mapped_column(Integer, nullable=False)
    outcome: Mapped[dict[str, Any] | None] = mapped_column(JSONB(none_as_null=True))
    # A script strategy's pinned code and declared parameters (kept: deleting the script keeps what ran).
    strategy_code: Mapped[str | None] = mapped_column(Text)
    script_parameters: Mapped[dict[str, Any] | None] = mapped_column(JSONB(none_as_null=True))
    created_at: Mapped[dt.datetime] = mapped_column(DateTime(timezone=True), server_default=func.now())


class OptimizationResult(Base):
    """One parameter combination's summary metrics in one optimisation (``window``: the walk-forward window
    whose in-sample period it was scored on; 0 for a plain optimisation). NaN metrics are stored as NULL."""

    __tablename__ = "optimization_results"

    job_id: Mapped[uuid.UUID] = mapped_column(
        UUID(as_uuid=True), ForeignKey("jobs.id", ondelete="CASCADE"), primary_key=True
    )
    window: Mapped[int] = mapped_column(Integer, primary_key=True)
    combo_index: Mapped[int] = mapped_column(Integer, primary_key=True)
    params: Mapped[dict[str, Any]] = mapped_column(JSONB, nullable=False)
    symbols: Mapped[int] = mapped_column(Integer, nullable=False)  # symbols with a result in this combo
    equity_final: Mapped[float | None] = mapped_column(Double)
    return_pct: Mapped[float | None] = mapped_column(Double)
    return_ann_pct: Mapped[float | None] = mapped_column(Double)
    volatility_ann_pct: Mapped[float | None] = mapped_column(Double)
    sharpe: Mapped[float | None] = mapped_column(Double)
    max_drawdown_pct: Mapped[float | None] = mapped_column(Double)
    trades: Mapped[float | None] = mapped_column(Double)
    win_rate_pct: Mapped[float | None] = mapped_column(Double)
