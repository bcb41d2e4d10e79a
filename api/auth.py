"""Who is calling: every request is authenticated here, before any handler runs.

Secure by default: a ``before_request`` hook requires credentials on every endpoint except the few listed in
:data:`PUBLIC_ENDPOINTS` (health, docs, register, login, refresh), so an endpoint added later is protected
without doing anything. Credentials are ``Authorization: Bearer <token>`` where the token is either

* a JWT access token (flask-jwt-extended, HS256, issuer ``alphaforge``), not expired, whose ``jti`` and login
  session (``fam``) are not on the Redis denylist, and whose account still exists and is active; or
* an API key (``afk_...``, see :mod:`shared.accounts.api_keys`) that is not revoked or expired.

Anything else is a 401 ``unauthorized`` with the reason in ``details.reason`` and a ``WWW-Authenticate``
header. Handlers ask :func:`current_principal` / :func:`current_owner_id`; ownership plugs in there.
"""

from __future__ import annotations

import datetime as dt
import uuid
from typing import Any

import jwt
from flask import Flask, Response, g, request
from flask_jwt_extended import JWTManager, create_access_token, create_refresh_token, decode_token
from flask_jwt_extended.exceptions import JWTExtendedException

from shared.accounts import api_keys, revocation
from shared.accounts.access import Principal
from shared.errors import Unauthorized
from shared.infra import log_context
from shared.infra.config import Settings
from shared.infra.models import User

JWT_ISSUER = "alphaforge"

PUBLIC_ENDPOINTS = frozenset(
    {"accounts.register", "accounts.login", "accounts.refresh", "health.health", "health.live", "health.ready", "docs"}
)
# Operations (api/metrics.py): readiness for orchestrators; metrics guarded by ALPHAFORGE_METRICS_TOKEN when set.
PUBLIC_ENDPOINTS |= {"ops_metrics.metrics"}
_PUBLIC_BLUEPRINTS = ("openapi.", "swagger.")  # the generated OpenAPI document and the Swagger UI


def _is_public(endpoint: str | None) -> bool:
    # No endpoint: the URL or method matched nothing, and the 404/405 error says so without revealing more.
    return (
        endpoint is None
        or endpoint in PUBLIC_ENDPOINTS
        or endpoint == "static"
        or endpoint.startswith(_PUBLIC_BLUEPRINTS)
    )


def init_auth(app: Flask, settings: Settings) -> None:
    """Configure flask-jwt-extended from Settings and install the authentication hook."""
    app.config.update(
        JWT_SECRET_KEY=settings.require_jwt_secret(),
        JWT_ALGORITHM="HS256",
        JWT_DECODE_ALGORITHMS=["HS256"],
        JWT_ACCESS_TOKEN_EXPIRES=dt.timedelta(seconds=settings.access_token_ttl_s),
        JWT_REFRESH_TOKEN_EXPIRES=dt.timedelta(seconds=settings.refresh_token_ttl_s),
        JWT_TOKEN_LOCATION=["headers"],
        JWT_ENCODE_ISSUER=JWT_ISSUER,
        JWT_DECODE_ISSUER=JWT_ISSUER,
        JWT_DECODE_LEEWAY=0,
    )
    JWTManager(app)
    app.before_request(authenticate_request)

    @app.after_request
    def _www_authenticate(response: Response) -> Response:
        if response.status_code == 401 and "WWW-Authenticate" not in response.headers:
            response.headers["WWW-Authenticate"] = 'Bearer realm="alphaforge"'
        return response


def _unauthorized(message: str, reason: str) -> Unauthorized:
    return Unauthorized(message, details={"reason": reason})


def bearer_token() -> str:
    header = request.headers.get("Authorization", "")
    if not header:
        raise _unauthorized("authentication required: send Authorization: Bearer <access token or API key>",
                            "missing_credentials")  # fmt: skip
    scheme, _, token = header.partition(" ")
    token = token.strip()
    if scheme.lower() != "bearer" or not token or " " in token:
        raise _unauthorized("malformed Authorization header: use 'Bearer <token>'", "malformed_header")
    return token


def decode_jwt(token: str, *, expected_type: str) -> dict[str, Any]:
    """Verify signature, issuer, expiry and type of a JWT (not the denylist); 401 if anything is off."""
    try:
        claims: dict[str, Any] = decode_token(token)
    except jwt.ExpiredSignatureError:
        raise _unauthorized("token has expired", "token_expired") from None
    except (jwt.InvalidTokenError, JWTExtendedException, ValueError, UnicodeError):
        raise _unauthorized("invalid token", "invalid_token") from None
    if claims.get("type") != expected_type:
        raise _unauthorized(f"not an {expected_type} token", "wrong_token_type")
    if not isinstance(claims.get("sub"), str) or not isinstance(claims.get("jti"), str):
        raise _unauthorized("invalid token", "invalid_token")
    return claims


def _principal_from_jwt(token: str) -> Principal:
    from api import services

    svc = services()
    claims = decode_jwt(token, expected_type="access")
    family = claims.get("fam") if isinstance(claims.get("fam"), str) else None
    if revocation.is_revoked(svc.redis, claims["jti"], family):
        raise _unauthorized("token has been revoked", "token_revoked")
    with svc.session_factory() as session:
        user = session.get(User, claims["sub"])
        if user is None or not user.is_active:
            raise _unauthorized("the account of this token no longer exists or is disabled", "account_disabled")
        return Principal(user.id, user.username, user.role, "jwt", token_jti=claims["jti"], token_family=family)


def _principal_from_api_key(key: str) -> Principal:
    from api import services

    with services().session_factory() as session:
        found = api_keys.resolve_api_key(session, key)
        if found is None:
            raise _unauthorized("invalid, revoked or expired API key", "invalid_api_key")
        row, user = found
        return Principal(user.id, user.username, user.role, "api_key", api_key_id=str(row.id))


def authenticate_request() -> None:
    if _is_public(request.endpoint):
        return
    token = bearer_token()
    principal = _principal_from_api_key(token) if api_keys.looks_like_api_key(token) else _principal_from_jwt(token)
    g.principal = principal
    g.log_context_token = log_context.bind(user_id=principal.user_id)


def current_principal() -> Principal:
    principal: Principal | None = g.get("principal")
    if principal is None:  # only reachable from a public endpoint that forgot it is public
        raise _unauthorized("authentication required", "missing_credentials")
    return principal


def current_owner_id() -> str:
    return current_principal().user_id


def issue_tokens(user_id: str, family: str | None = None) -> dict[str, Any]:
    """A fresh access/refresh pair; both carry the login session id ``fam`` (kept across refreshes)."""
    claims = {"fam": family or uuid.uuid4().hex}
    settings: Settings = _settings()
    return {
        "access_token": create_access_token(identity=user_id, additional_claims=claims),
        "refresh_token": create_refresh_token(identity=user_id, additional_claims=claims),
        "token_type": "Bearer",
        "expires_in": settings.access_token_ttl_s,
    }


def seconds_left(claims: dict[str, Any]) -> int:
    exp = claims.get("exp")
    now = int(dt.datetime.now(dt.UTC).timestamp())
    return max(1, int(exp) - now) if isinstance(exp, int) else 1


def _settings() -> Settings:
    from api import services

    return services().settings
