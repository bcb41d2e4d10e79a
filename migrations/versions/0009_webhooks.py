"""webhooks: a job's callback URL and delivery state, the attempts, and each user's signing secret

Revision ID: 0009_webhooks
Revises: 0008_nightly_runs
Create Date: 2026-11-26 11:00:00
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0009_webhooks"
down_revision: str | None = "0008_nightly_runs"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.add_column("users", sa.Column("webhook_secret", sa.String(length=64), nullable=True))
    op.add_column("jobs", sa.Column("callback_url", sa.Text(), nullable=True))
    op.add_column("jobs", sa.Column("callback_state", sa.String(length=16), nullable=True))
    op.add_column("jobs", sa.Column("callback_attempts", sa.Integer(), server_default="0", nullable=False))
    op.add_column("jobs", sa.Column("callback_next_at", sa.DateTime(timezone=True), nullable=True))
    op.add_column("jobs", sa.Column("callback_last_error", sa.Text(), nullable=True))
    op.create_table(
        "webhook_deliveries",
        sa.Column("id", sa.BigInteger(), autoincrement=True, nullable=False),
        sa.Column("job_id", sa.UUID(), nullable=False),
        sa.Column("attempt", sa.Integer(), nullable=False),
        sa.Column("url", sa.Text(), nullable=False),
        sa.Column("status_code", sa.Integer(), nullable=True),
        sa.Column("error", sa.Text(), nullable=True),
        sa.Column("duration_ms", sa.Double(), nullable=True),
        sa.Column("created_at", sa.DateTime(timezone=True), server_default=sa.text("now()"), nullable=False),
        sa.ForeignKeyConstraint(["job_id"], ["jobs.id"], ondelete="CASCADE"),
        sa.PrimaryKeyConstraint("id"),
    )
    op.create_index("ix_webhook_deliveries_job", "webhook_deliveries", ["job_id", "attempt"])


def downgrade() -> None:
    op.drop_index("ix_webhook_deliveries_job", table_name="webhook_deliveries")
    op.drop_table("webhook_deliveries")
    for column in ("callback_last_error", "callback_next_at", "callback_attempts", "callback_state", "callback_url"):
        op.drop_column("jobs", column)
    op.drop_column("users", "webhook_secret")
