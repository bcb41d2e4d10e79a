"""run artifacts: benchmark curve and trades per symbol, chained artifact manifests

Revision ID: 0007_run_artifacts
Revises: 0006_job_queue
Create Date: 2026-11-26 10:20:00
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

revision: str = "0007_run_artifacts"
down_revision: str | None = "0006_job_queue"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.add_column("backtest_curves", sa.Column("benchmark", postgresql.ARRAY(sa.Double()), nullable=True))
    op.add_column("backtest_curves", sa.Column("trades", postgresql.JSONB(), server_default="[]", nullable=False))
    op.create_table(
        "run_manifests",
        sa.Column("id", sa.BigInteger(), autoincrement=True, nullable=False),
        sa.Column("job_id", postgresql.UUID(as_uuid=True), nullable=False),
        sa.Column("owner_id", sa.String(length=64), nullable=False),
        sa.Column("location", sa.Text(), nullable=False),
        sa.Column("manifest", postgresql.JSONB(), nullable=False),
        sa.Column("manifest_sha256", sa.String(length=64), nullable=False),
        sa.Column("chain_prev", sa.String(length=64), nullable=True),
        sa.Column("created_at", sa.DateTime(timezone=True), server_default=sa.text("now()"), nullable=False),
        sa.PrimaryKeyConstraint("id"),
        sa.UniqueConstraint("job_id", name="uq_run_manifests_job"),
    )
    op.create_index("ix_run_manifests_owner_id", "run_manifests", ["owner_id", "id"])


def downgrade() -> None:
    op.drop_table("run_manifests")
    op.drop_column("backtest_curves", "trades")
    op.drop_column("backtest_curves", "benchmark")
