"""jobs.queue: the Celery queue of a job's shards (interactive, or bulk for nightly recalculations)

Revision ID: 0006_job_queue
Revises: 0005_shard_requeues
Create Date: 2026-11-26 10:20:00

The reconciler re-publishes a vanished shard on its job's queue. Existing jobs were all interactive.
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0006_job_queue"
down_revision: str | None = "0005_shard_requeues"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.add_column("jobs", sa.Column("queue", sa.String(length=16), server_default="interactive", nullable=False))


def downgrade() -> None:
    op.drop_column("jobs", "queue")
