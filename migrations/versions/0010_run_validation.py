"""validation tasks of backtest runs (issue 7)

A run's validation is split into tasks that are extra shards of the run's job (``job_shards.task``, no symbols);
each task's numbers go to ``run_validation_parts``; the run keeps its validation spec and combined result.

Revision ID: 0010_run_validation
Revises: 0009_webhooks
Create Date: 2026-11-26 12:30:00
"""

from __future__ import annotations

from collections.abc import Sequence

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


def downgrade() -> None:
    op.drop_table("run_validation_parts")
    op.drop_column("backtest_runs", "validation_result")
    op.drop_column("backtest_runs", "validation")
    op.drop_column("job_shards", "task")
