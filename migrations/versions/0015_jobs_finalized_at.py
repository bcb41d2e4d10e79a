"""jobs.finalized_at: when a job kind's finalize hook (an optimisation's outcome and artifacts) ran in a worker

Revision ID: 0015_jobs_finalized_at
Revises: 0014_shard_leases
Create Date: 2026-12-02 09:00:00

A job whose kind declares a finalize hook (``shared.jobs.pipeline.Finalize``) reads final only once the hook has
run; ``finalized_at`` records that it did (for a cancelled job, whose status is final at once, it is the only
record). NULL: not yet, or a kind without a hook. The reconciler finishes the jobs of hooked kinds left with NULL
(a worker died between its last shard and the hook): the partial index holds only those rows (and jobs of kinds
without a hook, which it never asks for).

Existing optimisations with an outcome are marked finalized; those without one (never viewed: the outcome used to
be computed on read) are left NULL, so a worker computes it after the upgrade.
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0015_jobs_finalized_at"
down_revision: str | None = "0014_shard_leases"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.add_column("jobs", sa.Column("finalized_at", sa.DateTime(timezone=True), nullable=True))
    op.execute(
        "UPDATE jobs SET finalized_at = coalesce(finished_at, now()) WHERE kind = 'optimization'"
        " AND EXISTS (SELECT 1 FROM optimizations o WHERE o.job_id = jobs.id AND o.outcome IS NOT NULL)"
    )
    op.create_index("ix_jobs_unfinalized", "jobs", ["kind"], postgresql_where=sa.text("finalized_at IS NULL"))


def downgrade() -> None:
    op.drop_index("ix_jobs_unfinalized", table_name="jobs")
    op.drop_column("jobs", "finalized_at")
