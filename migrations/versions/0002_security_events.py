"""security events: every rejection of untrusted code by a sandbox layer

Revision ID: 0002
Revises: 0001
Create Date: 2026-11-26 09:20:00
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0002"
down_revision: str | None = "0001"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table(
        "security_events",
        sa.Column("id", sa.BigInteger(), autoincrement=True, nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), server_default=sa.text("now()"), nullable=False),
        sa.Column("owner_id", sa.String(length=64), nullable=True),
        sa.Column("job_id", sa.UUID(), nullable=True),
        sa.Column("symbol", sa.String(length=32), nullable=True),
        sa.Column("layer", sa.String(length=32), nullable=False),
        sa.Column("reason", sa.String(length=64), nullable=False),
        sa.Column("detail", sa.Text(), nullable=False),
        sa.PrimaryKeyConstraint("id"),
    )
    op.create_index("ix_security_events_job", "security_events", ["job_id"])
    op.create_index("ix_security_events_created", "security_events", ["created_at"])
    op.create_index("ix_security_events_owner_created", "security_events", ["owner_id", "created_at"])


def downgrade() -> None:
    op.drop_table("security_events")
