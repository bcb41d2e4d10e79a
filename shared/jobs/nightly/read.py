"""What screeners read: a script's latest values, from one Redis key (filled from ``script_latest_values`` on a
miss)."""

from __future__ import annotations

import json
import logging
import uuid
from typing import Any

import redis
from sqlalchemy import select
from sqlalchemy.orm import Session

from shared.infra.models import ScriptLatestValue

log = logging.getLogger(__name__)


CACHE_TTL_S = 24 * 3600


def cache_key(script_id: uuid.UUID) -> str:
    return f"alphaforge:script-latest:{script_id}"


def _row(value: ScriptLatestValue) -> dict[str, Any]:
    return {
        "symbol": value.symbol,
        "value": value.value,
        "error": value.error,
        "script_version": value.script_version,
        "job_id": str(value.job_id),
        "computed_at": value.computed_at.isoformat(),
    }


def latest_values(
    session: Session, cache: redis.Redis | None, script_id: uuid.UUID
) -> tuple[list[dict[str, Any]], bool]:
    """A script's latest nightly values ordered by symbol, and whether they came from the Redis cache. Without
    Redis the database answers."""
    key = cache_key(script_id)
    if cache is not None:
        try:
            raw = cache.get(key)
            if raw is not None:
                return json.loads(raw), True
        except redis.RedisError:
            log.warning("latest values cache unavailable; reading the database", exc_info=True)
            cache = None
    rows = [
        _row(v)
        for v in session.scalars(
            select(ScriptLatestValue).where(ScriptLatestValue.script_id == script_id).order_by(ScriptLatestValue.symbol)
        )
    ]
    if cache is not None:
        try:
            cache.set(key, json.dumps(rows, separators=(",", ":")), ex=CACHE_TTL_S)
        except redis.RedisError:
            log.warning("could not cache the latest values of script %s", script_id, exc_info=True)
    return rows, False
