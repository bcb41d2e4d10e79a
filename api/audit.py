"""Audit helpers for handlers, and ``GET /api/audit-log`` (your own entries; admins: everyone's)."""

from __future__ import annotations

from typing import Any

from flask import Response, g, jsonify, request
from flask_openapi3 import APIBlueprint, Tag
from sqlalchemy import select
from sqlalchemy.orm import Session

from api import BEARER_SECURITY, services
from api.account_schemas import AuditEntry, AuditPage, AuditQuery
from api.auth import current_principal
from api.ratelimit import client_address
from api.schemas import ErrorResponse
from shared.accounts import audit as audit_log
from shared.accounts.access import Principal
from shared.accounts.audit import AuditAction
from shared.errors import Forbidden
from shared.infra import pagination
from shared.infra.models import AuditLog

bp = APIBlueprint("audit", __name__, url_prefix="/api", abp_tags=[Tag(name="audit")], abp_security=BEARER_SECURITY)

NEWEST_FIRST: pagination.Keyset[AuditLog] = pagination.Keyset(
    (AuditLog.id,), (pagination.integer,), lambda e: (e.id,), descending=True
)


def audit(
    session: Session,
    action: AuditAction,
    *,
    resource_type: str | None = None,
    resource_id: object | None = None,
    principal: Principal | None = None,
    actor_id: str | None = None,
    actor_username: str | None = None,
    **details: Any,
) -> None:
    """Add an audit row for the current request to ``session`` (committed with the change it records).
    The actor is the authenticated caller; public endpoints (register, login) name it explicitly."""
    principal = principal or g.get("principal")
    audit_log.record(
        session,
        action,
        actor_id=principal.user_id if principal else actor_id,
        actor_username=principal.username if principal else actor_username,
        resource_type=resource_type,
        resource_id=resource_id,
        client_address=client_address() if request else None,
        request_id=g.get("request_id"),
        details={k: v for k, v in details.items() if v is not None},
    )


@bp.get("/audit-log", responses={200: AuditPage, 403: ErrorResponse, 422: ErrorResponse})
def list_audit_log(query: AuditQuery) -> Response:
    """Audit entries newest first: your own actions; admins may see anyone's (all, or one ``actor_id``)."""
    principal = current_principal()
    stmt = select(AuditLog)
    if principal.is_admin:
        if query.actor_id:
            stmt = stmt.where(AuditLog.actor_id == query.actor_id)
    else:
        if query.actor_id and query.actor_id != principal.user_id:
            raise Forbidden("only admins may read other users' audit entries")
        stmt = stmt.where(AuditLog.actor_id == principal.user_id)
    if query.action:
        stmt = stmt.where(AuditLog.action == query.action)
    if query.request_id:
        stmt = stmt.where(AuditLog.request_id == query.request_id)
    with services().session_factory() as session:
        rows, next_cursor = pagination.page(session, stmt, NEWEST_FIRST, limit=query.limit, cursor=query.cursor)
    page = AuditPage(
        entries=[AuditEntry.model_validate(row, from_attributes=True) for row in rows], next_cursor=next_cursor
    )
    return jsonify(page.model_dump(mode="json"))
