"""accounts, API keys, saved scripts with versions, audit log; jobs get an owner and a script reference

Revision ID: 0003
Revises: 0002
Create Date: 2026-11-26 12:00:00

``users.id`` is a UUID in text form (String(64)): the type ``jobs.owner_id`` and ``security_events.owner_id``
already had, so both keep their type and ``jobs.owner_id`` gains a foreign key. Jobs written before accounts
existed keep a NULL owner (only admins see them); any other owner value they might hold is cleared, since it
cannot name an account.
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

revision: str = "0003"
down_revision: str | None = "0002"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table(
        "users",
        sa.Column("id", sa.String(length=64), nullable=False),
        sa.Column("username", sa.String(length=64), nullable=False),
        sa.Column("password_hash", sa.Text(), nullable=False),
        sa.Column("role", sa.String(length=16), nullable=False),
        sa.Column("is_active", sa.Boolean(), server_default="true", nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), server_default=sa.text("now()"), nullable=False),
        sa.CheckConstraint("role IN ('user', 'admin')", name="ck_users_role"),
        sa.CheckConstraint("username = lower(username)", name="ck_users_username_lower"),
        sa.PrimaryKeyConstraint("id"),
        sa.UniqueConstraint("username"),
    )
    op.create_table(
        "api_keys",
        sa.Column("id", sa.UUID(), nullable=False),
        sa.Column("owner_id", sa.String(length=64), nullable=False),
        sa.Column("name", sa.String(length=100), nullable=False),
        sa.Column("prefix", sa.String(length=16), nullable=False),
        sa.Column("key_sha256", sa.String(length=64), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), server_default=sa.text("now()"), nullable=False),
        sa.Column("expires_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("last_used_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("revoked_at", sa.DateTime(timezone=True), nullable=True),
        sa.ForeignKeyConstraint(["owner_id"], ["users.id"], ondelete="CASCADE"),
        sa.PrimaryKeyConstraint("id"),
        sa.UniqueConstraint("key_sha256"),
    )
    op.create_index("ix_api_keys_owner", "api_keys", ["owner_id"])
    op.create_table(
        "scripts",
        sa.Column("id", sa.UUID(), nullable=False),
        sa.Column("owner_id", sa.String(length=64), nullable=False),
        sa.Column("name", sa.String(length=100), nullable=False),
        sa.Column("description", sa.Text(), nullable=False),
        sa.Column("code", sa.Text(), nullable=False),
        sa.Column("version", sa.Integer(), nullable=False),
        sa.Column("nightly", sa.Boolean(), server_default="false", nullable=False),
        sa.Column("universe", postgresql.ARRAY(sa.String(length=32)), server_default="{}", nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), server_default=sa.text("now()"), nullable=False),
        sa.Column("updated_at", sa.DateTime(timezone=True), server_default=sa.text("now()"), nullable=False),
        sa.CheckConstraint("NOT nightly OR cardinality(universe) > 0", name="ck_scripts_nightly_universe"),
        sa.ForeignKeyConstraint(["owner_id"], ["users.id"], ondelete="CASCADE"),
        sa.PrimaryKeyConstraint("id"),
        sa.UniqueConstraint("owner_id", "name", name="uq_scripts_owner_name"),
    )
    op.create_index("ix_scripts_owner_updated", "scripts", ["owner_id", "updated_at"])
    op.create_table(
        "script_versions",
        sa.Column("script_id", sa.UUID(), nullable=False),
        sa.Column("version", sa.Integer(), nullable=False),
        sa.Column("code", sa.Text(), nullable=False),
        sa.Column("code_sha256", sa.String(length=64), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), server_default=sa.text("now()"), nullable=False),
        sa.ForeignKeyConstraint(["script_id"], ["scripts.id"], ondelete="CASCADE"),
        sa.PrimaryKeyConstraint("script_id", "version"),
    )
    op.create_table(
        "audit_log",
        sa.Column("id", sa.BigInteger(), autoincrement=True, nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), server_default=sa.text("now()"), nullable=False),
        sa.Column("actor_id", sa.String(length=64), nullable=True),
        sa.Column("actor_username", sa.String(length=64), nullable=True),
        sa.Column("action", sa.String(length=64), nullable=False),
        sa.Column("resource_type", sa.String(length=32), nullable=True),
        sa.Column("resource_id", sa.String(length=64), nullable=True),
        sa.Column("request_id", sa.String(length=128), nullable=True),
        sa.Column("client_address", sa.String(length=64), nullable=True),
        sa.Column("details", postgresql.JSONB(astext_type=sa.Text()), nullable=False),
        sa.PrimaryKeyConstraint("id"),
    )
    op.create_index("ix_audit_log_actor_created", "audit_log", ["actor_id", "created_at"])
    op.create_index("ix_audit_log_resource", "audit_log", ["resource_type", "resource_id"])
    op.create_index("ix_audit_log_created", "audit_log", ["created_at"])
    op.create_index("ix_audit_log_request", "audit_log", ["request_id"])

    op.add_column("jobs", sa.Column("script_id", sa.UUID(), nullable=True))
    op.add_column("jobs", sa.Column("script_version", sa.Integer(), nullable=True))
    op.create_check_constraint("ck_jobs_script_ref", "jobs", "(script_id IS NULL) = (script_version IS NULL)")
    op.create_index("ix_jobs_owner_status", "jobs", ["owner_id", "status"])
    op.execute("UPDATE jobs SET owner_id = NULL WHERE owner_id IS NOT NULL")  # no account can own them
    op.create_foreign_key("jobs_owner_id_fkey", "jobs", "users", ["owner_id"], ["id"])


def downgrade() -> None:
    op.drop_constraint("jobs_owner_id_fkey", "jobs", type_="foreignkey")
    op.drop_index("ix_jobs_owner_status", table_name="jobs")
    op.drop_constraint("ck_jobs_script_ref", "jobs", type_="check")
    op.drop_column("jobs", "script_version")
    op.drop_column("jobs", "script_id")
    op.drop_table("audit_log")
    op.drop_table("script_versions")
    op.drop_table("scripts")
    op.drop_table("api_keys")
    op.drop_table("users")
