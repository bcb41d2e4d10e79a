"""Accounts and credentials: ``/api/auth/register|login|refresh|logout|me`` and ``/api/auth/api-keys``."""

from __future__ import annotations

import datetime as dt
import logging
from typing import Any

from flask import Response, jsonify
from flask_openapi3 import APIBlueprint, Tag
from pydantic import BaseModel
from sqlalchemy import func, select

from api import BEARER_SECURITY, services
from api.account_schemas import (
    ApiKeyCreateBody,
    ApiKeyCreated,
    ApiKeyList,
    ApiKeyPath,
    ApiKeyView,
    Credentials,
    MeView,
    RefreshBody,
    TokenPair,
    UserView,
)
from api.audit import audit
from api.auth import current_principal, decode_jwt, issue_tokens, seconds_left
from api.schemas import ErrorResponse
from shared.accounts import api_keys, quotas, revocation, users
from shared.accounts.audit import AuditAction
from shared.errors import BadRequest, Forbidden, Unauthorized
from shared.infra.db import session_scope
from shared.infra.models import ApiKey, User

log = logging.getLogger(__name__)

bp = APIBlueprint("accounts", __name__, url_prefix="/api/auth", abp_tags=[Tag(name="auth")])

_ERRORS: dict[str | int, type[BaseModel] | dict[Any, Any] | None] = {
    401: ErrorResponse,
    422: ErrorResponse,
    429: ErrorResponse,
}


def _user_view(user: User) -> UserView:
    return UserView(id=user.id, username=user.username, role=user.role, created_at=user.created_at)


@bp.post("/register", responses={201: UserView, 403: ErrorResponse, 409: ErrorResponse, **_ERRORS})
def register(body: Credentials) -> Response:
    """Create an account (role `user`). Passwords: 8 to 256 characters, stored as argon2id hashes."""
    svc = services()
    if not svc.settings.registration_open:
        raise Forbidden("registration is closed on this server; ask an operator for an account")
    with session_scope(svc.session_factory) as session:
        user = users.create_user(session, body.username, body.password)
        audit(session, AuditAction.REGISTER, resource_type="user", resource_id=user.id, actor_id=user.id,
              actor_username=user.username)  # fmt: skip
        view = _user_view(user)
    response = jsonify(view.model_dump(mode="json"))
    response.status_code = 201
    return response


@bp.post("/login", responses={200: TokenPair, **_ERRORS})
def login(body: Credentials) -> Response:
    """Exchange username and password for an access token (short-lived) and a refresh token."""
    svc = services()
    with session_scope(svc.session_factory) as session:
        user = users.authenticate(session, body.username, body.password)
        if user is None:
            audit(session, AuditAction.LOGIN_FAILED, actor_username=body.username.strip().lower()[:64])
            failed = True
        else:
            audit(session, AuditAction.LOGIN, resource_type="user", resource_id=user.id, actor_id=user.id,
                  actor_username=user.username)  # fmt: skip
            failed = False
            user_id = user.id
    if failed:  # raised after the commit: the failed attempt stays on record
        log.warning("failed login", extra={"username": body.username.strip().lower()[:64]})
        raise Unauthorized("invalid username or password", details={"reason": "invalid_credentials"})
    return jsonify(TokenPair.model_validate(issue_tokens(user_id)).model_dump(mode="json"))


@bp.post("/refresh", responses={200: TokenPair, **_ERRORS})
def refresh(body: RefreshBody) -> Response:
    """Trade a refresh token for a new pair. Each refresh token works once: a second use (a stolen copy)
    ends the whole login session."""
    svc = services()
    claims = decode_jwt(body.refresh_token, expected_type="refresh")
    family = claims.get("fam") if isinstance(claims.get("fam"), str) else None
    if family is None:
        raise Unauthorized("invalid token", details={"reason": "invalid_token"})
    if revocation.is_revoked(svc.redis, claims["jti"], family) or not revocation.spend_refresh_token(
        svc.redis, claims["jti"], seconds_left(claims)
    ):
        revocation.revoke_family(svc.redis, family, svc.settings.refresh_token_ttl_s)
        with session_scope(svc.session_factory) as session:
            audit(session, AuditAction.REFRESH_REUSED, resource_type="user", resource_id=claims["sub"],
                  actor_id=claims["sub"], family=family)  # fmt: skip
        raise Unauthorized(
            "refresh token was already used or revoked; log in again", details={"reason": "token_revoked"}
        )
    with svc.session_factory() as session:
        user = session.get(User, claims["sub"])
        if user is None or not user.is_active:
            raise Unauthorized("the account no longer exists or is disabled", details={"reason": "account_disabled"})
    return jsonify(TokenPair.model_validate(issue_tokens(user.id, family)).model_dump(mode="json"))


@bp.post("/logout", security=BEARER_SECURITY, responses={204: None, 400: ErrorResponse, 401: ErrorResponse})
def logout() -> Response:
    """End this login session: the access token and every refresh token of the session stop working."""
    svc = services()
    principal = current_principal()
    if principal.auth_method != "jwt" or principal.token_jti is None:
        raise BadRequest("logout ends a login session; to stop an API key, revoke it (DELETE /api/auth/api-keys/<id>)")
    revocation.revoke_token(svc.redis, principal.token_jti, svc.settings.access_token_ttl_s)
    if principal.token_family:
        revocation.revoke_family(svc.redis, principal.token_family, svc.settings.refresh_token_ttl_s)
    with session_scope(svc.session_factory) as session:
        audit(session, AuditAction.LOGOUT, resource_type="user", resource_id=principal.user_id)
    return Response(status=204)


@bp.get("/me", security=BEARER_SECURITY, responses={200: MeView, 401: ErrorResponse})
def me() -> Response:
    """The authenticated account."""
    principal = current_principal()
    with services().session_factory() as session:
        user = session.get(User, principal.user_id)
        assert user is not None  # authentication just loaded it
        view = MeView(**_user_view(user).model_dump(), auth_method=principal.auth_method,
                      quotas=quotas.standing(session, user.id, services().settings.quotas))  # fmt: skip
    return jsonify(view.model_dump(mode="json"))


# --- API keys -----------------------------------------------------------------------------------------------


def _key_view(row: ApiKey) -> ApiKeyView:
    return ApiKeyView(
        id=str(row.id),
        name=row.name,
        prefix=row.prefix,
        created_at=row.created_at,
        expires_at=row.expires_at,
        last_used_at=row.last_used_at,
        revoked_at=row.revoked_at,
    )


def _require_password_session() -> None:
    if current_principal().auth_method != "jwt":
        raise Forbidden("API keys are managed with a login session, not with another API key")


@bp.post(
    "/api-keys",
    security=BEARER_SECURITY,
    responses={201: ApiKeyCreated, 403: ErrorResponse, 409: ErrorResponse, **_ERRORS},
)
def create_api_key(body: ApiKeyCreateBody) -> Response:
    """Create an API key for programs; the response carries the key itself, shown only this once."""
    _require_password_session()
    principal = current_principal()
    svc = services()
    with session_scope(svc.session_factory) as session:
        expires_at = None
        if body.expires_in_days is not None:
            now = session.scalar(select(func.now()))  # the database's clock: expiry is checked against it
            assert now is not None
            expires_at = now + dt.timedelta(days=body.expires_in_days)
        row, key = api_keys.create_api_key(session, principal.user_id, body.name, expires_at=expires_at)
        session.refresh(row)
        audit(session, AuditAction.API_KEY_CREATED, resource_type="api_key", resource_id=row.id, name=body.name)
        created = ApiKeyCreated(**_key_view(row).model_dump(), key=key)
    response = jsonify(created.model_dump(mode="json"))
    response.status_code = 201
    response.headers["Cache-Control"] = "no-store"
    return response


@bp.get("/api-keys", security=BEARER_SECURITY, responses={200: ApiKeyList, 401: ErrorResponse})
def list_api_keys() -> Response:
    """Your API keys (never the keys themselves), oldest first, revoked ones included."""
    principal = current_principal()
    with services().session_factory() as session:
        rows = api_keys.list_api_keys(session, principal.user_id)
        view = ApiKeyList(api_keys=[_key_view(r) for r in rows])
    return jsonify(view.model_dump(mode="json"))


@bp.delete(
    "/api-keys/<key_id>", security=BEARER_SECURITY, responses={204: None, 403: ErrorResponse, 404: ErrorResponse}
)
def revoke_api_key(path: ApiKeyPath) -> Response:
    """Revoke one of your API keys; it stops working at once."""
    _require_password_session()
    principal = current_principal()
    with session_scope(services().session_factory) as session:
        row = api_keys.revoke_api_key(session, principal.user_id, path.key_id)
        audit(session, AuditAction.API_KEY_REVOKED, resource_type="api_key", resource_id=row.id)
    return Response(status=204)
