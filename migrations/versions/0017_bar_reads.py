"""what a calculation job reads: its bars' timeframe and their adjustment for corporate actions

Revision ID: 0017_bar_reads
Revises: 0016_bar_series
Create Date: 2026-12-07 23:00:00

``jobs.timeframe`` is the timeframe its scripts see (a stored one, or ``1w`` / ``1mo`` resampled on read), and
``jobs.adjustment`` how its prices are adjusted (``none``, ``splits``, ``total_return``). Jobs from before read daily
bars as traded, which is what they are given.
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0017_bar_reads"
down_revision: str | None = "0016_bar_series"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.add_column("jobs", sa.Column("timeframe", sa.String(4), nullable=False, server_default="1d"))
    op.add_column("jobs", sa.Column("adjustment", sa.String(16), nullable=False, server_default="none"))
    op.create_check_constraint(
        "ck_jobs_timeframe", "jobs", "timeframe IN ('1m', '5m', '15m', '30m', '1h', '1d', '1w', '1mo')"
    )
    op.create_check_constraint("ck_jobs_adjustment", "jobs", "adjustment IN ('none', 'splits', 'total_return')")


def downgrade() -> None:
    op.drop_constraint("ck_jobs_adjustment", "jobs", type_="check")
    op.drop_constraint("ck_jobs_timeframe", "jobs", type_="check")
    op.drop_column("jobs", "adjustment")
    op.drop_column("jobs", "timeframe")
