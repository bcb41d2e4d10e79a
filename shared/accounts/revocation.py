"""The JWT denylist in Redis: revoked token ids (``jti``) and revoked login sessions (token families).

Every token of one login carries the same family id (``fam``); refreshing rotates the pair within the family.
Logging out revokes the family, so the refresh token dies with the access token. A refresh token is spent by
its first use (an atomic ``SET NX``); presenting it again means it was copied, and the whole family is revoked.
Keys expire with the tokens they describe, so the denylist does not grow.
"""

from __future__ import annotations

import redis

_JTI = "alphaforge:jwt:jti:"
_FAMILY = "alphaforge:jwt:family:"


def revoke_token(client: redis.Redis, jti: str, ttl_s: int) -> None:
    client.set(_JTI + jti, "revoked", ex=max(1, ttl_s))


def revoke_family(client: redis.Redis, family: str, ttl_s: int) -> None:
    client.set(_FAMILY + family, "revoked", ex=max(1, ttl_s))


def spend_refresh_token(client: redis.Redis, jti: str, ttl_s: int) -> bool:
    """Mark a refresh token used; False if it had been used (or revoked) before."""
    return bool(client.set(_JTI + jti, "used", ex=max(1, ttl_s), nx=True))


def is_revoked(client: redis.Redis, jti: str, family: str | None) -> bool:
    keys = [_JTI + jti] + ([_FAMILY + family] if family else [])
    return bool(client.exists(*keys))
