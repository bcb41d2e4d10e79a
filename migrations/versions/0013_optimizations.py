"""optimisation jobs

Revision ID: 0013_optimizations
Revises: 0012_strategy_scripts
Create Date: 2026-11-26 13:20:00
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

revision: str = "0013_optimizations"
down_revision: str | None = "0012_strategy_scripts"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

METRICS = (
    "equity_final",
    "return_pct",
    "return_ann_pct",
    "volatility_ann_pct",
    "sharpe",
    "max_drawdown_pct",
    "trades",
    "win_rate_pct",
)


def upgrade() -> None:
    op.drop_constraint("ck_jobs_kind", "jobs", type_="check")
    op.create_check_constraint("ck_jobs_kind", "jobs", "kind IN ('calculation', 'backtest', 'optimization')")
    op.create_table(
        "optimizations",
        sa.Column("job_id", postgresql.UUID(as_uuid=True), sa.ForeignKey("jobs.id", ondelete="CASCADE"),
                  primary_key=True),
        sa.Column("owner_id", sa.String(64), sa.ForeignKey("users.id", ondelete="CASCADE"), nullable=False),
        sa.Column("name", sa.String(100)),
        sa.Column("strategy", sa.String(64), nullable=False),
        sa.Column("spec", postgresql.JSONB(), nullable=False),
        sa.Column("spec_hash", sa.String(64), nullable=False),
        sa.Column("combos", sa.Integer(), nullable=False),
        sa.Column("outcome", postgresql.JSONB()),
        sa.Column("strategy_code", sa.Text()),
        sa.Column("script_parameters", postgresql.JSONB()),
        sa.Column("created_at", sa.DateTime(timezone=True), server_default=sa.func.now(), nullable=False),
        sa.UniqueConstraint("owner_id", "spec_hash", name="uq_optimizations_owner_spec"),
    )  # fmt: skip
    op.create_index("ix_optimizations_owner_created", "optimizations", ["owner_id", "created_at"])
    op.create_table(
        "optimization_results",
        sa.Column("job_id", postgresql.UUID(as_uuid=True), sa.ForeignKey("jobs.id", ondelete="CASCADE"),
                  primary_key=True),
        sa.Column("window", sa.Integer(), primary_key=True),
        sa.Column("combo_index", sa.Integer(), primary_key=True),
        sa.Column("params", postgresql.JSONB(), nullable=False),
        sa.Column("symbols", sa.Integer(), nullable=False),
        *(sa.Column(name, sa.Double()) for name in METRICS),
    )  # fmt: skip


def downgrade() -> None:
    op.drop_table("optimization_results")
    op.drop_index("ix_optimizations_owner_created", table_name="optimizations")
    op.drop_table("optimizations")
    op.execute("DELETE FROM jobs WHERE kind = 'optimization'")
    op.drop_constraint("ck_jobs_kind", "jobs", type_="check")
    op.create_check_constraint("ck_jobs_kind", "jobs", "kind IN ('calculation', 'backtest')")
