"""validation tasks of backtest runs

A run's validation is split into tasks that are extra shards of the run's job (``job_shards.task``, no symbols);
each task's numbers go to ``run_validation_parts``; the run keeps its validation spec and combined result.
Equity curves are stored compactly: ``backtest_curves.dates`` as big-endian int32 days since 1970-01-01 and
``equity`` / ``benchmark`` as big-endian float64, in BYTEA (arrays of dates and doubles cost ~15x more to write);
existing rows are converted in SQL.

Revision ID: 0010_run_validation
Revises: 0009_webhooks
Create Date: 2026-11-26 12:30:00
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

revision: str = "0010_run_validation"
down_revision: str | None = "0009_webhooks"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.add_column("job_shards", sa.Column("task", postgresql.JSONB(), nullable=True))
    op.add_column("backtest_runs", sa.Column("validation", postgresql.JSONB(), nullable=True))
    op.add_column("backtest_runs", sa.Column("validation_result", postgresql.JSONB(), nullable=True))
    op.create_table(
        "run_validation_parts",
        sa.Column("job_id", postgresql.UUID(as_uuid=True), nullable=False),
        sa.Column("method", sa.String(length=32), nullable=False),
        sa.Column("task_index", sa.Integer(), nullable=False),
        sa.Column("draws", sa.LargeBinary(), nullable=False),
        sa.Column("detail", postgresql.JSONB(), nullable=False),
        sa.Column("computed_at", sa.DateTime(timezone=True), server_default=sa.text("now()"), nullable=False),
        sa.ForeignKeyConstraint(["job_id"], ["jobs.id"], ondelete="CASCADE"),
        sa.PrimaryKeyConstraint("job_id", "method", "task_index"),
    )
    _curves_to_bytes()


_PACK = """
UPDATE backtest_curves SET
    dates_bin = coalesce((SELECT string_agg(int4send(d - DATE '1970-01-01'), ''::bytea ORDER BY i)
                          FROM unnest(dates) WITH ORDINALITY AS u(d, i)), ''::bytea),
    equity_bin = coalesce((SELECT string_agg(float8send(x), ''::bytea ORDER BY i)
                           FROM unnest(equity) WITH ORDINALITY AS u(x, i)), ''::bytea),
    benchmark_bin = (SELECT string_agg(float8send(x), ''::bytea ORDER BY i)
                     FROM unnest(benchmark) WITH ORDINALITY AS u(x, i))
"""


def _curves_to_bytes() -> None:
    for name in ("dates", "equity", "benchmark"):
        op.add_column("backtest_curves", sa.Column(f"{name}_bin", sa.LargeBinary(), nullable=True))
    op.execute(_PACK)
    for name in ("dates", "equity", "benchmark"):
        op.drop_column("backtest_curves", name)
        op.alter_column("backtest_curves", f"{name}_bin", new_column_name=name)
    op.alter_column("backtest_curves", "dates", nullable=False)
    op.alter_column("backtest_curves", "equity", nullable=False)


def _curves_to_arrays() -> None:
    op.add_column("backtest_curves", sa.Column("dates_arr", postgresql.ARRAY(sa.Date()), nullable=True))
    op.add_column("backtest_curves", sa.Column("equity_arr", postgresql.ARRAY(sa.Double()), nullable=True))
    op.add_column("backtest_curves", sa.Column("benchmark_arr", postgresql.ARRAY(sa.Double()), nullable=True))
    bind = op.get_bind()
    rows = bind.execute(sa.text("SELECT job_id, symbol, dates, equity, benchmark FROM backtest_curves")).all()
    for job_id, symbol, dates, equity, benchmark in rows:
        days = np.frombuffer(dates, dtype=">i4").astype(np.int64).astype("datetime64[D]").tolist()
        values = {
            "d": days,
            "e": np.frombuffer(equity, dtype=">f8").astype(float).tolist(),
            "b": np.frombuffer(benchmark, dtype=">f8").astype(float).tolist() if benchmark is not None else None,
            "j": job_id,
            "s": symbol,
        }
        bind.execute(
            sa.text("UPDATE backtest_curves SET dates_arr = :d, equity_arr = :e, benchmark_arr = :b "
                    "WHERE job_id = :j AND symbol = :s"),
            values,
        )  # fmt: skip
    for name in ("dates", "equity", "benchmark"):
        op.drop_column("backtest_curves", name)
        op.alter_column("backtest_curves", f"{name}_arr", new_column_name=name)
    op.alter_column("backtest_curves", "dates", nullable=False)
    op.alter_column("backtest_curves", "equity", nullable=False)


def downgrade() -> None:
    _curves_to_arrays()
    op.drop_table("run_validation_parts")
    op.drop_column("backtest_runs", "validation_result")
    op.drop_column("backtest_runs", "validation")
    op.drop_column("job_shards", "task")
