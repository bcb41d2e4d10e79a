"""nightly recalculation: runs, their jobs, and the latest nightly value per saved script and symbol

Revision ID: 0008_nightly_runs
Revises: 0007_run_artifacts
Create Date: 2026-11-26 10:40:00
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

revision: str = "0008_nightly_runs"
down_revision: str | None = "0007_run_artifacts"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table(
        "nightly_runs",
        sa.Column("id", sa.UUID(), nullable=False),
        sa.Column("trigger", sa.String(length=16), nullable=False),
        sa.Column("requested_by", sa.String(length=64), nullable=True),
        sa.Column("status", sa.String(length=16), nullable=False),
        sa.Column("scripts", sa.Integer(), nullable=False),
        sa.Column("jobs", sa.Integer(), nullable=False),
        sa.Column("errors", postgresql.JSONB(astext_type=sa.Text()), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), server_default=sa.text("now()"), nullable=False),
        sa.Column("submitted_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("finished_at", sa.DateTime(timezone=True), nullable=True),
        sa.CheckConstraint("status IN ('running', 'finished')", name="ck_nightly_runs_status"),
        sa.PrimaryKeyConstraint("id"),
    )
    op.create_index("ix_nightly_runs_status", "nightly_runs", ["status"])
    op.create_table(
        "nightly_run_jobs",
        sa.Column("run_id", sa.UUID(), nullable=False),
        sa.Column("job_id", sa.UUID(), nullable=False),
        sa.Column("script_id", sa.UUID(), nullable=False),
        sa.Column("script_version", sa.Integer(), nullable=False),
        sa.Column("harvested_at", sa.DateTime(timezone=True), nullable=True),
        sa.ForeignKeyConstraint(["run_id"], ["nightly_runs.id"], ondelete="CASCADE"),
        sa.PrimaryKeyConstraint("run_id", "job_id"),
    )
    op.create_index("ix_nightly_run_jobs_pending", "nightly_run_jobs", ["harvested_at"])
    op.create_table(
        "script_latest_values",
        sa.Column("script_id", sa.UUID(), nullable=False),
        sa.Column("symbol", sa.String(length=32), nullable=False),
        sa.Column("value", sa.Double(), nullable=True),
        sa.Column("error", postgresql.JSONB(none_as_null=True, astext_type=sa.Text()), nullable=True),
        sa.Column("script_version", sa.Integer(), nullable=False),
        sa.Column("job_id", sa.UUID(), nullable=False),
        sa.Column("computed_at", sa.DateTime(timezone=True), nullable=False),
        sa.ForeignKeyConstraint(["script_id"], ["scripts.id"], ondelete="CASCADE"),
        sa.PrimaryKeyConstraint("script_id", "symbol"),
    )


def downgrade() -> None:
    op.drop_table("script_latest_values")
    op.drop_index("ix_nightly_run_jobs_pending", table_name="nightly_run_jobs")
    op.drop_table("nightly_run_jobs")
    op.drop_index("ix_nightly_runs_status", table_name="nightly_runs")
    op.drop_table("nightly_runs")
