"""interactive runs: a job kind for /api/custom-calculations/try and /api/security/execute

Revision ID: 0020_interactive_runs
Revises: 0019_job_sandbox_limits
Create Date: 2026-12-08 04:00:00

An interactive run is a job of kind ``interactive`` with one shard and one result row: its ``column_name`` says
which (``try`` or ``execute``), its result's ``data`` holds the answer (print output, timing, memory, locals). Being a
job, it has the pipeline's guarantees (claim, retry, reconcile) and a poll URL when its request stops waiting. The
downgrade deletes the interactive jobs (their shards and results cascade) and restores the kind check.
"""

from __future__ import annotations

from collections.abc import Sequence

from alembic import op

revision: str = "0020_interactive_runs"
down_revision: str | None = "0019_job_sandbox_limits"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.drop_constraint("ck_jobs_kind", "jobs", type_="check")
    op.create_check_constraint(
        "ck_jobs_kind", "jobs", "kind IN ('calculation', 'backtest', 'optimization', 'interactive')"
    )


def downgrade() -> None:
    op.execute("DELETE FROM jobs WHERE kind = 'interactive'")
    op.drop_constraint("ck_jobs_kind", "jobs", type_="check")
    op.create_check_constraint("ck_jobs_kind", "jobs", "kind IN ('calculation', 'backtest', 'optimization')")
