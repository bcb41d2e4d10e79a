"""backtest runs: job kind ``backtest``, per-symbol result data, run records and equity curves

Revision ID: 0004_backtest_runs
Revises: 0003
Create Date: 2026-11-26 10:10:00

A backtest run is a job of kind ``backtest`` (same shards, counters and finalization as calculation jobs);
``backtest_runs`` adds its config and the config's hash (unique per owner: creation is idempotent), and
``backtest_curves`` each symbol's equity curve. ``job_results.data`` holds a symbol's full metrics.
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

revision: str = "0004_backtest_runs"
down_revision: str | None = "0003"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.drop_constraint("ck_jobs_kind", "jobs", type_="check")
    op.create_check_constraint("ck_jobs_kind", "jobs", "kind IN ('calculation', 'backtest')")
    op.add_column("job_results", sa.Column("data", postgresql.JSONB(none_as_null=True), nullable=True))
    op.create_table(
        "backtest_runs",
        sa.Column("job_id", postgresql.UUID(as_uuid=True), nullable=False),
        sa.Column("owner_id", sa.String(length=64), nullable=False),
        sa.Column("name", sa.String(length=100), nullable=True),
        sa.Column("strategy", sa.String(length=64), nullable=False),
        sa.Column("config", postgresql.JSONB(), nullable=False),
        sa.Column("config_hash", sa.String(length=64), nullable=False),
        sa.Column("portfolio", postgresql.JSONB(none_as_null=True), nullable=True),
        sa.Column("created_at", sa.DateTime(timezone=True), server_default=sa.text("now()"), nullable=False),
        sa.ForeignKeyConstraint(["job_id"], ["jobs.id"], ondelete="CASCADE"),
        sa.ForeignKeyConstraint(["owner_id"], ["users.id"], ondelete="CASCADE"),
        sa.PrimaryKeyConstraint("job_id"),
        sa.UniqueConstraint("owner_id", "config_hash", name="uq_backtest_runs_owner_config"),
    )
    op.create_index("ix_backtest_runs_owner_created", "backtest_runs", ["owner_id", "created_at"])
    op.create_table(
        "backtest_curves",
        sa.Column("job_id", postgresql.UUID(as_uuid=True), nullable=False),
        sa.Column("symbol", sa.String(length=32), nullable=False),
        sa.Column("dates", postgresql.ARRAY(sa.Date()), nullable=False),
        sa.Column("equity", postgresql.ARRAY(sa.Double()), nullable=False),
        sa.ForeignKeyConstraint(["job_id"], ["jobs.id"], ondelete="CASCADE"),
        sa.PrimaryKeyConstraint("job_id", "symbol"),
    )


def downgrade() -> None:
    op.drop_table("backtest_curves")
    op.drop_table("backtest_runs")
    op.drop_column("job_results", "data")
    op.execute("DELETE FROM jobs WHERE kind = 'backtest'")
    op.drop_constraint("ck_jobs_kind", "jobs", type_="check")
    op.create_check_constraint("ck_jobs_kind", "jobs", "kind IN ('calculation')")
