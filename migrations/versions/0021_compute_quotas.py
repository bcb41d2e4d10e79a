"""sandbox CPU seconds per user per day (the quotas), and per job

Revision ID: 0021_compute_quotas
Revises: 0020_interactive_runs
Create Date: 2026-12-08 05:00:00

``compute_usage`` holds one row per (owner, UTC day, budget): the sandbox CPU seconds the supervisor measured for the
owner's work charged to that budget (``interactive``: jobs and runs submitted through the API; ``nightly``: the
nightly recalculation), added to by each shard in its own transaction. ``jobs.sandbox_cpu_s`` is the same measure
for one job. Existing jobs get 0. The downgrade drops both.
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0021_compute_quotas"
down_revision: str | None = "0020_interactive_runs"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table(
        "compute_usage",
        sa.Column("owner_id", sa.String(64), sa.ForeignKey("users.id", ondelete="CASCADE"), primary_key=True),
        sa.Column("day", sa.Date(), primary_key=True),
        sa.Column("budget", sa.String(16), primary_key=True),
        sa.Column("cpu_s", sa.Double(), nullable=False, server_default="0"),
        sa.Column("updated_at", sa.DateTime(timezone=True), nullable=False, server_default=sa.func.now()),
        sa.CheckConstraint("budget IN ('interactive', 'nightly')", name="ck_compute_usage_budget"),
        sa.CheckConstraint("cpu_s >= 0", name="ck_compute_usage_cpu"),
    )
    op.add_column("jobs", sa.Column("sandbox_cpu_s", sa.Double(), nullable=False, server_default="0"))


def downgrade() -> None:
    op.drop_column("jobs", "sandbox_cpu_s")
    op.drop_table("compute_usage")
