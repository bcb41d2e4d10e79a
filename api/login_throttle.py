"""Failed-login throttling that slows a password guesser without locking out everyone behind one address.

Counted in Redis, per window (defaults: 15 minutes), on ``POST /api/auth/login``:

* per (username, address) pair: every attempt (``ALPHAFORGE_RATE_LIMIT_LOGIN``) and every failure
  (``..._FAILED_LOGIN_PAIR``, 5). This is what stops a guesser at one address, and it touches no one else:
  the same account from another address, and other accounts from the same address, have their own pairs;
* per username, failures from any address (``..._FAILED_LOGIN_USER``, 20): higher than the pair limit, so one
  address cannot exhaust it, yet an attacker who rotates addresses still gets at most that many guesses per window;
* per address, failures over all usernames (``..._FAILED_LOGIN_ADDRESS``, 100, a generous ceiling for a NAT or an
  office) and distinct usernames that failed (``..._FAILED_LOGIN_USERNAMES``, 20: a password sprayer tries many
  accounts once each, which the pair limit never sees; the usernames already tried keep their pair allowance).

A pair that logged in successfully within ``ALPHAFORGE_LOGIN_KNOWN_DAYS`` (30) is *known*: it is exempt from the
per-username and per-address limits (never from its own pair limit). So while an account is under a distributed
attack, or an address is noisy, the people who have logged in from there before still get in; only a first login
from a new address can wait, at most one window. Counting fails open like the other rate limits: when Redis cannot
be reached the login goes ahead (the password is still checked).
"""

from __future__ import annotations

import functools
import logging
import math
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import redis
from flask import g, request
from limits import parse_many

from shared.errors import TooManyRequests, Unauthorized

if TYPE_CHECKING:
    from api import ApiServices

log = logging.getLogger(__name__)

_KNOWN_KEY = "alphaforge:login:known:{}|{}"
_USERNAMES_KEY = "alphaforge:login:usernames:{}"

# KEYS[1]: the address's set of usernames that failed (score: time of the last failure, ms). ARGV: username,
# budget, window (ms), record (1: add the username, 0: only check). Returns 0 when the username may try, else
# the ms until the oldest username leaves the window.
_USERNAMES = """
local now = redis.call('TIME')
local now_ms = tonumber(now[1]) * 1000 + math.floor(tonumber(now[2]) / 1000)
local window = tonumber(ARGV[3])
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now_ms - window)
if ARGV[4] == '1' then
    redis.call('ZADD', KEYS[1], now_ms, ARGV[1])
    redis.call('PEXPIRE', KEYS[1], window)
    return 0
end
if redis.call('ZSCORE', KEYS[1], ARGV[1]) or redis.call('ZCARD', KEYS[1]) < tonumber(ARGV[2]) then
    return 0
end
local oldest = redis.call('ZRANGE', KEYS[1], 0, 0, 'WITHSCORES')
return math.max(1, tonumber(oldest[2]) + window - now_ms)
"""


def _services() -> ApiServices:
    from api import services  # api/__init__ imports this module (through api.ratelimit) before it defines services

    return services()


def login_username() -> str | None:
    """The username of a login request as accounts are matched (trimmed, case-folded), or None."""
    body: Any = request.get_json(silent=True)
    username = body.get("username") if isinstance(body, dict) else None
    if not isinstance(username, str) or not username.strip():
        return None
    return username.strip().lower()[:64]


def login_address() -> str:
    return request.remote_addr or "unknown"


def username_key() -> str:
    return f"login-user:{login_username() or '<none>'}"


def pair_key() -> str:
    return f"login-pair:{login_username() or '<none>'}|{login_address()}"


def known_pair() -> bool:
    """This username has logged in from this address within the known period (memoised per request: each
    exempted limit asks)."""
    if "login_known_pair" not in g:
        username, days = login_username(), _services().settings.rate_limits.login_known_days
        known = False
        if username is not None and days > 0:
            try:
                known = bool(_services().redis.exists(_KNOWN_KEY.format(username, login_address())))
            except redis.RedisError as exc:
                log.warning("login throttling: known addresses unavailable: %s: %s", type(exc).__name__, exc)
        g.login_known_pair = known
    return bool(g.login_known_pair)


class UsernameBudget:
    """Distinct usernames that may fail from one address per window (a password sprayer's signature)."""

    def __init__(self, client: redis.Redis, rate: str) -> None:
        item = parse_many(rate)[0]  # one rate (checked at startup)
        self.budget, self.window_ms = item.amount, item.get_expiry() * 1000
        self.rate = rate
        self._script = client.register_script(_USERNAMES)

    def _call(self, username: str, record: bool) -> int:
        key = _USERNAMES_KEY.format(login_address())
        return int(self._script(keys=[key], args=[username, self.budget, self.window_ms, "1" if record else "0"]))

    def check(self, username: str) -> None:
        try:
            wait_ms = self._call(username, record=False)
        except redis.RedisError as exc:
            log.warning("login throttling: username budget unavailable: %s: %s", type(exc).__name__, exc)
            return
        if wait_ms:
            retry_after = max(1, math.ceil(wait_ms / 1000))
            raise TooManyRequests(
                f"too many different usernames failed to log in from this address: {self.rate}; retry in "
                f"{retry_after} s",
                retry_after_s=retry_after,
                details={"limit": self.rate, "retry_after_s": retry_after},
            )

    def record(self, username: str) -> None:
        try:
            self._call(username, record=True)
        except redis.RedisError as exc:
            log.warning("login throttling: failure not recorded: %s: %s", type(exc).__name__, exc)


def _remember(username: str) -> None:
    days = _services().settings.rate_limits.login_known_days
    if days > 0:
        try:
            _services().redis.set(_KNOWN_KEY.format(username, login_address()), "1", ex=days * 86_400)
        except redis.RedisError as exc:
            log.warning("login throttling: known address not recorded: %s: %s", type(exc).__name__, exc)


def forget(client: redis.Redis) -> None:
    """Forget every known pair and username budget (tests, with ``api.ratelimit.reset_rate_limits``)."""
    keys = list(client.scan_iter(match="alphaforge:login:*", count=1000))
    if keys:
        client.delete(*keys)


def throttle_logins(rate: str) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """Wrap the login view: check the address's username budget before the password is checked (unless the
    pair is known), count the username after a failure, and remember the pair after a success."""
    budget: UsernameBudget | None = None

    def decorate(view: Callable[..., Any]) -> Callable[..., Any]:
        @functools.wraps(view)
        def wrapped(*args: Any, **kwargs: Any) -> Any:
            username = login_username()
            if username is None:
                return view(*args, **kwargs)  # the body is refused by validation
            nonlocal budget
            if budget is None:  # the app's Redis client exists once the app serves requests
                budget = UsernameBudget(_services().redis, rate)
            known = known_pair()
            if not known:
                budget.check(username)
            try:
                response = view(*args, **kwargs)
            except Unauthorized:
                if not known:
                    budget.record(username)
                raise
            if getattr(response, "status_code", None) == 200:
                _remember(username)
            return response

        return wrapped

    return decorate
