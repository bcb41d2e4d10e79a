"""job finalization in the worker: when a job kind's finalization stored what its views read, or why it raised

Revision ID: 0015_job_finalization
Revises: 0014_shard_leases
Create Date: 2026-12-03 09:00:00

``jobs.finalized_at`` is set by a worker in the transaction that stores a job's finalization (a backtest run's
portfolio and validation result, an optimisation's outcome: shared/jobs/pipeline.py ``Finalize``);
``jobs.finalize_error`` says why one raised.
The partial index finds the ended jobs still to finalize (the reconciler's finalize pass).

Backfill: ended backtest runs whose portfolio and validation result were already computed (on a read, before this
revision), and ended optimisations whose outcome was (on a read, or by the worker after its last slice), that have
no open shard are marked finalized at their end; the others (never viewed, or a shard left open) stay NULL, and the
reconciler's finalize pass computes them in a worker. Jobs of the other kinds have no finalization and stay NULL.
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0015_job_finalization"
down_revision: str | None = "0014_shard_leases"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.add_column("jobs", sa.Column("finalized_at", sa.DateTime(timezone=True), nullable=True))
    op.add_column("jobs", sa.Column("finalize_error", sa.Text(), nullable=True))
    op.execute(
        """
        UPDATE jobs j SET finalized_at = coalesce(j.finished_at, now())
        FROM backtest_runs r
        WHERE r.job_id = j.id
          AND j.status IN ('succeeded', 'partial', 'failed', 'cancelled')
          AND (r.portfolio IS NOT NULL OR cardinality(j.symbols) < 2)
          AND (r.validation IS NULL OR r.validation_result IS NOT NULL)
          AND NOT EXISTS (
              SELECT 1 FROM job_shards s WHERE s.job_id = j.id AND s.status IN ('queued', 'running')
          )
        """
    )
    op.execute(
        """
        UPDATE jobs j SET finalized_at = coalesce(j.finished_at, now())
        FROM optimizations o
        WHERE o.job_id = j.id
          AND j.status IN ('succeeded', 'partial', 'failed', 'cancelled')
          AND o.outcome IS NOT NULL
          AND NOT EXISTS (
              SELECT 1 FROM job_shards s WHERE s.job_id = j.id AND s.status IN ('queued', 'running')
          )
        """
    )
    op.create_index(
        "ix_jobs_unfinalized", "jobs", ["kind", "finished_at"], postgresql_where=sa.text("finalized_at IS NULL")
    )


def downgrade() -> None:
    op.drop_index("ix_jobs_unfinalized", table_name="jobs")
    op.drop_column("jobs", "finalize_error")
    op.drop_column("jobs", "finalized_at")
