"""self-healing shards: when a shard's task was (re-)published and how often the reconciler re-published it

Revision ID: 0005_shard_requeues
Revises: 0004_backtest_runs
Create Date: 2026-11-26 10:30:00

Existing shards get ``enqueued_at = now()`` (the time of the migration): the reconciler then waits its grace
period before judging any of them vanished.
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0005_shard_requeues"
down_revision: str | None = "0004_backtest_runs"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.add_column(
        "job_shards",
        sa.Column("enqueued_at", sa.DateTime(timezone=True), server_default=sa.text("now()"), nullable=False),
    )
    op.add_column("job_shards", sa.Column("requeues", sa.Integer(), server_default="0", nullable=False))


def downgrade() -> None:
    op.drop_column("job_shards", "requeues")
    op.drop_column("job_shards", "enqueued_at")
