"""shard leases: who holds a running shard and until when (shards of a dead worker back in seconds)

Revision ID: 0014_shard_leases
Revises: 0013_optimizations
Create Date: 2026-11-27 09:00:00

Both columns are nullable and added without a default, so the upgrade rewrites no row. Shards running during the
upgrade keep NULL leases and are judged by the grace rule, as before.

No index: the reconciler looks for expired leases among ``status = 'running'`` shards, which
``ix_job_shards_status`` already finds (at most the workers' total concurrency plus the stranded ones). An index on
``lease_expires_at`` would make every renewal (one per running shard every couple of seconds) a non-HOT update
that touches each of the table's indexes.
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0014_shard_leases"
down_revision: str | None = "0013_optimizations"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.add_column("job_shards", sa.Column("lease_holder", sa.String(255), nullable=True))
    op.add_column("job_shards", sa.Column("lease_expires_at", sa.DateTime(timezone=True), nullable=True))


def downgrade() -> None:
    op.drop_column("job_shards", "lease_expires_at")
    op.drop_column("job_shards", "lease_holder")
