"""a calculation job's own sandbox limits and print capture

Revision ID: 0019_job_sandbox_limits
Revises: 0018_corporate_actions
Create Date: 2026-12-08 03:20:00

``jobs.sandbox_timeout_s`` and ``jobs.sandbox_memory_mb`` are the wall-clock seconds per symbol and the memory of a
sandbox child the submitter asked for, within the operator's bounds (NULL: the worker's defaults, as before).
``jobs.capture_output`` keeps what each symbol's script printed (bounded) in its result's ``data``. Existing jobs get
NULL, NULL and false: exactly what they ran with. The downgrade drops the columns.
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0019_job_sandbox_limits"
down_revision: str | None = "0018_corporate_actions"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.add_column("jobs", sa.Column("sandbox_timeout_s", sa.Double(), nullable=True))
    op.add_column("jobs", sa.Column("sandbox_memory_mb", sa.Integer(), nullable=True))
    op.add_column("jobs", sa.Column("capture_output", sa.Boolean(), nullable=False, server_default=sa.false()))
    op.create_check_constraint("ck_jobs_sandbox_timeout", "jobs", "sandbox_timeout_s IS NULL OR sandbox_timeout_s > 0")
    op.create_check_constraint("ck_jobs_sandbox_memory", "jobs", "sandbox_memory_mb IS NULL OR sandbox_memory_mb > 0")


def downgrade() -> None:
    op.drop_constraint("ck_jobs_sandbox_memory", "jobs", type_="check")
    op.drop_constraint("ck_jobs_sandbox_timeout", "jobs", type_="check")
    op.drop_column("jobs", "capture_output")
    op.drop_column("jobs", "sandbox_memory_mb")
    op.drop_column("jobs", "sandbox_timeout_s")
