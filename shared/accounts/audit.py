"""The audit log: who did what to which resource, in which request.

Rows are added in the caller's session, so an audited change and its audit row commit (or roll back)
together. Failed logins have no change to join: the caller commits their row on its own.
"""

from __future__ import annotations

import enum
from typing import Any

from sqlalchemy.orm import Session

from shared.infra import log_context
from shared.infra.models import AuditLog


class AuditAction(str, enum.Enum):
    REGISTER = "auth.register"
    LOGIN = "auth.login"
    LOGIN_FAILED = "auth.login_failed"
    LOGOUT = "auth.logout"
    REFRESH_REUSED = "auth.refresh_reused"
    USER_CREATED = "user.create"
    API_KEY_CREATED = "api_key.create"
    API_KEY_REVOKED = "api_key.revoke"
    SCRIPT_CREATED = "script.create"
    SCRIPT_UPDATED = "script.update"
    SCRIPT_DELETED = "script.delete"
    JOB_SUBMITTED = "job.submit"
    JOB_CANCELLED = "job.cancel"
    RUN_SUBMITTED = "run.submit"
    RUN_CANCELLED = "run.cancel"
    UNIVERSE_CREATED = "universe.create"
    UNIVERSE_UPDATED = "universe.update"
    UNIVERSE_DELETED = "universe.delete"
    PRESET_CREATED = "preset.create"
    PRESET_UPDATED = "preset.update"
    PRESET_DELETED = "preset.delete"


def record(
    session: Session,
    action: AuditAction,
    *,
    actor_id: str | None,
    actor_username: str | None,
    resource_type: str | None = None,
    resource_id: object | None = None,
    client_address: str | None = None,
    request_id: str | None = None,
    details: dict[str, Any] | None = None,
) -> AuditLog:
    row = AuditLog(
        action=action.value,
        actor_id=actor_id,
        actor_username=actor_username[:64] if actor_username else None,
        resource_type=resource_type,
        resource_id=str(resource_id)[:64] if resource_id is not None else None,
        request_id=request_id or log_context.current_request_id(),
        client_address=client_address[:64] if client_address else None,
        details=details or {},
    )
    session.add(row)
    return row
