"""Who is calling. Users and authentication arrive with their own issue; until then every request
is anonymous and jobs carry no owner. Handlers ask here, so ownership plugs in at one place."""

from __future__ import annotations


def current_owner_id() -> str | None:
    return None
