"""saved scripts that are strategies

A script gets a ``kind`` ("calculation", the default for every existing script, or "strategy") and declared
``parameters`` (JSON, on the script for its current version and on each version for the text it belongs to);
a strategy is never a nightly recalculation. A backtest run over a script strategy keeps the exact code it runs
(``backtest_runs.strategy_code``).

Revision ID: 0012_strategy_scripts
Revises: 0011_presets_universes
Create Date: 2026-11-26 13:20:00
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects.postgresql import JSONB

revision: str = "0012_strategy_scripts"
down_revision: str | None = "0011_presets_universes"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.add_column("scripts", sa.Column("kind", sa.String(16), nullable=False, server_default="calculation"))
    op.add_column("scripts", sa.Column("parameters", JSONB(), nullable=False, server_default=sa.text("'{}'::jsonb")))
    op.create_check_constraint("ck_scripts_kind", "scripts", "kind IN ('calculation', 'strategy')")
    op.create_check_constraint("ck_scripts_strategy_not_nightly", "scripts", "kind = 'calculation' OR NOT nightly")
    op.add_column(
        "script_versions", sa.Column("parameters", JSONB(), nullable=False, server_default=sa.text("'{}'::jsonb"))
    )
    op.add_column("backtest_runs", sa.Column("strategy_code", sa.Text(), nullable=True))


def downgrade() -> None:
    op.drop_column("backtest_runs", "strategy_code")
    op.drop_column("script_versions", "parameters")
    op.drop_constraint("ck_scripts_strategy_not_nightly", "scripts", type_="check")
    op.drop_constraint("ck_scripts_kind", "scripts", type_="check")
    op.drop_column("scripts", "parameters")
    op.drop_column("scripts", "kind")
