"""Rate limits with flask-limiter, counted in Redis (moving windows), answered as 429 with Retry-After.

* job submissions: per user (``ALPHAFORGE_RATE_LIMIT_SUBMIT``);
* logins: attempts and failures per (username, address) pair, failures per username and per address, and the
  distinct usernames failing from one address, with an exemption for pairs that logged in before (the rule is in
  ``api.login_throttle``);
* registrations: per client address (``..._REGISTER``).

One :class:`~flask_limiter.Limiter` per app (tests build apps with different limits side by side); limits are
attached to view functions after the blueprints are registered. Counting fails open: when Redis cannot be
reached the limiter logs the error and lets the request through (the concurrent-jobs quota, in PostgreSQL,
still holds), whereas token revocation fails closed (a 503).
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from typing import Any

import redis
from flask import Flask, Response, current_app, g, request
from flask_limiter import Limiter, RateLimitExceeded

from api import login_throttle
from api.errors import error_response
from shared.errors import TooManyRequests
from shared.infra.config import Settings

_EXTENSION = "alphaforge_limiter"
_LIMIT_KEY_PREFIX = "alphaforge"


def client_address() -> str:
    return request.remote_addr or "unknown"


def _user_key() -> str:
    principal = g.get("principal")
    return f"user:{principal.user_id}" if principal is not None else f"addr:{client_address()}"


def _address_key() -> str:
    return f"addr:{client_address()}"


def _failed_login(response: Response) -> bool:
    return response.status_code == 401


def init_rate_limits(app: Flask, settings: Settings, pool: redis.ConnectionPool) -> Limiter:
    """``pool``: the app's Redis pool (api/redis_client.py), whose breaker makes a dead Redis cost one timeout."""
    limiter = Limiter(
        key_func=_address_key,
        storage_uri=settings.require_redis_url(),
        storage_options={"connection_pool": pool},  # type: ignore[dict-item]  # limits' RedisStorage takes a pool
        strategy="moving-window",
        key_prefix=_LIMIT_KEY_PREFIX,
        swallow_errors=True,
        headers_enabled=False,  # it would put Retry-After on successful responses too; 429s get ours below
    )
    limiter.init_app(app)
    app.extensions[_EXTENSION] = limiter
    app.register_error_handler(RateLimitExceeded, _rate_limited)
    app.register_error_handler(TooManyRequests, _too_many_requests)
    return limiter


def limit_endpoint(app: Flask, endpoint: str, *decorators: Callable[[Callable[..., Any]], Callable[..., Any]]) -> None:
    """Wrap a registered view function in limiter decorators (they check before the handler runs)."""
    view = app.view_functions[endpoint]
    for decorate in decorators:
        view = decorate(view)
    app.view_functions[endpoint] = view


def apply_rate_limits(app: Flask, limiter: Limiter, settings: Settings) -> None:
    rates = settings.rate_limits
    limit_endpoint(app, "calculations.execute", limiter.limit(rates.submit, key_func=_user_key))
    for endpoint in ("interactive.try_script", "interactive.execute_code"):
        limit_endpoint(app, endpoint, limiter.limit(rates.interactive, key_func=_user_key, scope="interactive"))
    failures: dict[str, Any] = {"deduct_when": _failed_login}
    limit_endpoint(
        app,
        "accounts.login",
        login_throttle.throttle_logins(rates.failed_login_usernames),  # innermost: runs after the limits pass
        limiter.limit(rates.login, key_func=login_throttle.pair_key, scope="attempts"),
        limiter.limit(rates.failed_login_pair, key_func=login_throttle.pair_key, scope="failed-pair", **failures),
        limiter.limit(rates.failed_login_user, key_func=login_throttle.username_key, scope="failed-user",
                      exempt_when=login_throttle.known_pair, **failures),
        limiter.limit(rates.failed_login_address, key_func=_address_key, scope="failed-address",
                      exempt_when=login_throttle.known_pair, **failures),
    )  # fmt: skip
    limit_endpoint(app, "accounts.register", limiter.limit(rates.register, key_func=_address_key))


def reset_rate_limits(app: Flask) -> None:
    """Forget every count (tests: each test starts with full allowances)."""
    limiter: Limiter = app.extensions[_EXTENSION]
    limiter.reset()
    login_throttle.forget(app.extensions["alphaforge"].redis)


def _too_many_requests(exc: TooManyRequests) -> Response:
    """Quotas (such as concurrently active jobs): the one error shape, plus Retry-After."""
    response = error_response(exc.status, exc.code, exc.message, exc.details)
    response.headers["Retry-After"] = str(exc.retry_after_s)
    return response


def _rate_limited(exc: RateLimitExceeded) -> Response:
    limiter: Limiter = current_app.extensions[_EXTENSION]
    window = exc.limit.limit.get_expiry() if exc.limit is not None else 60
    retry_after = window
    current = limiter.current_limit
    if current is not None:
        try:  # reset_at is a whole second rounded up: never promise more than one window
            retry_after = min(window, max(1, math.ceil(current.reset_at - time.time())))
        except Exception:  # the storage went away between the check and now
            retry_after = window
    limit = str(exc.limit.limit) if exc.limit is not None else "a rate limit"
    response = error_response(
        429,
        "rate_limited",
        f"too many requests: {limit}; retry in {retry_after} s",
        {"limit": limit, "retry_after_s": retry_after},
    )
    response.headers["Retry-After"] = str(retry_after)
    return response
