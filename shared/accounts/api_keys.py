"""API keys: long-lived credentials for programs, sent as ``Authorization: Bearer afk_...``.

A key is ``afk_`` plus 256 random bits (URL-safe base64). It is shown once, at creation; the database keeps
its SHA-256 (a fast hash is enough for a random secret of that size, and lets a request find its key with one
indexed lookup) and its first characters, so that listings can tell keys apart.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import secrets
import uuid

from sqlalchemy import func, select, update
from sqlalchemy.orm import Session

from shared.errors import Conflict, NotFound
from shared.infra.models import ApiKey, User

KEY_PREFIX = "afk_"
DISPLAY_CHARS = 12
MAX_ACTIVE_KEYS_PER_USER = 25
LAST_USED_GRANULARITY = dt.timedelta(minutes=1)  # write last_used_at at most this often per key


def looks_like_api_key(token: str) -> bool:
    return token.startswith(KEY_PREFIX)


def key_sha256(key: str) -> str:
    return hashlib.sha256(key.encode("utf-8")).hexdigest()


def create_api_key(
    session: Session, owner_id: str, name: str, *, expires_at: dt.datetime | None = None
) -> tuple[ApiKey, str]:
    """A new key for ``owner_id``: the row and the key itself (never stored, never shown again)."""
    session.execute(select(User.id).where(User.id == owner_id).with_for_update())  # serialize the count below
    active = session.scalar(
        select(func.count()).select_from(ApiKey).where(ApiKey.owner_id == owner_id, ApiKey.revoked_at.is_(None))
    )
    if (active or 0) >= MAX_ACTIVE_KEYS_PER_USER:
        raise Conflict(f"at most {MAX_ACTIVE_KEYS_PER_USER} active API keys per account; revoke one first")
    key = KEY_PREFIX + secrets.token_urlsafe(32)
    row = ApiKey(
        owner_id=owner_id, name=name, prefix=key[:DISPLAY_CHARS], key_sha256=key_sha256(key), expires_at=expires_at
    )
    session.add(row)
    session.flush()
    return row, key


def list_api_keys(session: Session, owner_id: str) -> list[ApiKey]:
    return list(session.scalars(select(ApiKey).where(ApiKey.owner_id == owner_id).order_by(ApiKey.created_at)))


def revoke_api_key(session: Session, owner_id: str, key_id: str) -> ApiKey:
    """Revoke one of the owner's keys (idempotent). Someone else's key is reported as not found."""
    not_found = NotFound(f"API key {key_id[:64]} not found", details={"api_key_id": key_id[:64]})
    try:
        parsed = uuid.UUID(key_id)
    except ValueError:
        raise not_found from None
    row = session.scalar(select(ApiKey).where(ApiKey.id == parsed, ApiKey.owner_id == owner_id).with_for_update())
    if row is None:
        raise not_found
    if row.revoked_at is None:
        row.revoked_at = session.scalar(select(func.now()))
    return row


def resolve_api_key(session: Session, key: str) -> tuple[ApiKey, User] | None:
    """The live key and its active owner, or None (unknown, revoked, expired, or the account is disabled)."""
    found = session.execute(
        select(ApiKey, User).join(User, User.id == ApiKey.owner_id).where(ApiKey.key_sha256 == key_sha256(key))
    ).first()
    if found is None:
        return None
    row, user = found
    now = session.scalar(select(func.now()))
    assert now is not None
    if row.revoked_at is not None or (row.expires_at is not None and row.expires_at <= now) or not user.is_active:
        return None
    if row.last_used_at is None or now - row.last_used_at >= LAST_USED_GRANULARITY:
        session.execute(update(ApiKey).where(ApiKey.id == row.id).values(last_used_at=now))
        session.commit()
    return row, user
