"""Configuration, read from the environment in exactly one place.

Every process (API, worker, beat, launcher, tests) builds a :class:`Settings` with
:meth:`Settings.from_env`; tests build their own with explicit values instead of patching.
The documented defaults are the embedded development setup.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from limits import parse_many

from shared.errors import ConfigError

# Queue names: interactive jobs never wait behind bulk work on the same queue.
QUEUE_INTERACTIVE = "interactive"
QUEUE_BULK = "bulk"
QUEUE_MAINTENANCE = "maintenance"  # reconciler, retention: never stuck behind a flood of shards


def _int(env: Mapping[str, str], name: str, default: int, *, minimum: int = 1) -> int:
    raw = env.get(name)
    if raw is None or raw == "":
        return default
    try:
        value = int(raw)
    except ValueError as exc:
        raise ConfigError(f"{name} must be an integer, got {raw!r}") from exc
    if value < minimum:
        raise ConfigError(f"{name} must be >= {minimum}, got {value}")
    return value


def _bool(env: Mapping[str, str], name: str, default: bool) -> bool:
    raw = (env.get(name) or "").strip().lower()
    if not raw:
        return default
    if raw in ("1", "true", "yes", "on"):
        return True
    if raw in ("0", "false", "no", "off"):
        return False
    raise ConfigError(f"{name} must be true or false, got {raw!r}")


def _rate(env: Mapping[str, str], name: str, default: str) -> str:
    """A flask-limiter rate string (``"30/minute"``, ``"5 per 15 minutes;100/day"``), checked at startup."""
    raw = (env.get(name) or "").strip() or default
    try:
        parse_many(raw)
    except ValueError as exc:
        raise ConfigError(f"{name} is not a rate limit like '30/minute' or '5 per 15 minutes': {raw!r}") from exc
    return raw


def _single_rate(env: Mapping[str, str], name: str, default: str) -> str:
    """One rate (``"20 per 15 minutes"``): a count within a window, not a list of limits."""
    raw = _rate(env, name, default)
    if len(parse_many(raw)) != 1:
        raise ConfigError(f"{name} must be one rate like '20 per 15 minutes', not a list: {raw!r}")
    return raw


def _float(env: Mapping[str, str], name: str, default: float, *, minimum: float = 0.0) -> float:
    raw = env.get(name)
    if raw is None or raw == "":
        return default
    try:
        value = float(raw)
    except ValueError as exc:
        raise ConfigError(f"{name} must be a number, got {raw!r}") from exc
    if not value > minimum:
        raise ConfigError(f"{name} must be > {minimum}, got {value}")
    return value


def _cron(env: Mapping[str, str], name: str, default: str) -> str:
    """Five cron fields (checked by Celery's own parser at startup), or ``off``."""
    raw = " ".join((env.get(name) or default).split())
    if raw.lower() == "off":
        return "off"
    fields = raw.split(" ")
    if len(fields) != 5:
        raise ConfigError(f"{name} must be 5 cron fields (minute hour day-of-month month day-of-week) or off: {raw!r}")
    from celery.schedules import crontab

    try:
        minute, hour, day_of_month, month_of_year, day_of_week = fields
        crontab(minute, hour, day_of_week, day_of_month, month_of_year)
    except (ValueError, IndexError) as exc:
        raise ConfigError(f"{name} is not a valid cron schedule: {raw!r} ({exc})") from exc
    return raw


def _timezone(env: Mapping[str, str], name: str, default: str) -> str:
    raw = (env.get(name) or default).strip()
    from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

    try:
        ZoneInfo(raw)
    except (ZoneInfoNotFoundError, ValueError) as exc:
        raise ConfigError(f"{name} is not a known time zone: {raw!r}") from exc
    return raw


@dataclass(frozen=True)
class SandboxLimits:
    """Resource limits of one sandbox process (see shared/sandbox/runner.py)."""

    symbol_timeout_s: float = 10.0  # wall clock per symbol, enforced by the parent with a kill
    startup_timeout_s: float = 15.0  # process start + reading its input
    memory_mb: int = 1024  # RLIMIT_AS of the sandbox process
    max_output_line_bytes: int = 65_536  # one result line from the child
    max_error_chars: int = 2_000  # exception message kept per symbol


@dataclass(frozen=True)
class RateLimits:
    """Per-user and per-address request limits (flask-limiter strings, counted in Redis) and job quotas."""

    submit: str = "30/minute;500/hour"  # ALPHAFORGE_RATE_LIMIT_SUBMIT: job submissions per user
    # Failed-login throttling (api/login_throttle.py): a pair that logged in before is exempt from the per-username
    # and per-address limits, never from its own.
    login: str = "10/minute"  # ALPHAFORGE_RATE_LIMIT_LOGIN: login attempts per (username, client address) pair
    failed_login_pair: str = "5 per 15 minutes"  # ALPHAFORGE_RATE_LIMIT_FAILED_LOGIN_PAIR: failures per pair
    # ALPHAFORGE_RATE_LIMIT_FAILED_LOGIN_USER: failures per username from any address (above the pair limit: one
    # address cannot lock an account; an attacker rotating addresses gets at most this many guesses)
    failed_login_user: str = "20 per 15 minutes"
    # ALPHAFORGE_RATE_LIMIT_FAILED_LOGIN_ADDRESS: failures per client address over all usernames (a NAT's ceiling)
    failed_login_address: str = "100 per 15 minutes"
    # ALPHAFORGE_RATE_LIMIT_FAILED_LOGIN_USERNAMES: distinct usernames that may fail from one address (one limit)
    failed_login_usernames: str = "20 per 15 minutes"
    login_known_days: int = 30  # ALPHAFORGE_LOGIN_KNOWN_DAYS: a successful login makes its pair known (0: never)
    register: str = "10/hour"  # ALPHAFORGE_RATE_LIMIT_REGISTER: registrations per client address
    max_active_jobs: int = 8  # ALPHAFORGE_MAX_ACTIVE_JOBS: queued + running jobs per user


@dataclass(frozen=True)
class Maintenance:
    """Self-healing and housekeeping that Celery beat schedules (shared/jobs/reconciler.py, retention.py)."""

    # ALPHAFORGE_RECONCILE_INTERVAL: seconds between reconciler passes over running shards whose lease expired
    # (queued shards are judged every max(this, ALPHAFORGE_RECONCILE_GRACE / 2): Maintenance.queued_pass_interval_s)
    reconcile_interval_s: float = 2.0
    # ALPHAFORGE_RECONCILE_GRACE: a queued shard (re-)enqueued less than this long ago is never judged vanished
    reconcile_grace_s: float = 120.0
    # ALPHAFORGE_SHARD_LEASE: seconds a running shard's lease lasts (set by its claim, renewed while its task runs);
    # once it has expired the reconciler's next pass re-publishes the shard unless a live worker still holds it
    shard_lease_s: float = 6.0
    shard_lease_renew_s: float = 2.0  # ALPHAFORGE_SHARD_LEASE_RENEW: seconds between renewals of a running lease
    reconcile_max_requeues: int = 3  # ALPHAFORGE_RECONCILE_MAX_REQUEUES: then the shard fails, with the reason
    retention_interval_s: float = 3600.0  # ALPHAFORGE_RETENTION_INTERVAL: seconds between retention passes
    retention_days: int = 30  # ALPHAFORGE_RETENTION_DAYS: finished calculation jobs older than this go (0: never)
    retention_max_jobs: int = 1000  # ALPHAFORGE_RETENTION_MAX_JOBS: finished jobs kept per owner (0: no limit)
    # ALPHAFORGE_RUN_RETENTION_KEEP: finished backtest runs kept per owner, newest first (0: keep all); the older ones
    # go with their artifacts, on the same beat interval (shared/jobs/backtests/retention.py)
    run_retention_keep: int = 100
    # ALPHAFORGE_OPTIMIZATION_RETENTION_KEEP: finished optimisations kept per owner, newest first (0: keep all); the
    # older ones go with their result rows and artifacts, on the same beat interval (shared/jobs/backtests/retention.py)
    optimization_retention_keep: int = 100
    # ALPHAFORGE_NIGHTLY_SCHEDULE: cron "minute hour day-of-month month day-of-week" in the exchange's time zone
    # for the nightly recalculation of scripts flagged nightly ("off": only on demand)
    nightly_schedule: str = "0 2 * * *"
    exchange_timezone: str = "America/New_York"  # ALPHAFORGE_EXCHANGE_TIMEZONE: the time zone of the schedule

    def __post_init__(self) -> None:
        if not 0 < self.shard_lease_renew_s <= self.shard_lease_s / 2:
            raise ConfigError(
                f"ALPHAFORGE_SHARD_LEASE_RENEW ({self.shard_lease_renew_s}) must be > 0 and at most half of "
                f"ALPHAFORGE_SHARD_LEASE ({self.shard_lease_s}): a lease must survive a late or failed renewal"
            )

    @property
    def queued_pass_interval_s(self) -> float:
        """How often queued shards are judged by the grace rule (a queue scan and a worker query, costly during a
        flood): a lost message waits out the grace period anyway, so looking more often than half of it buys
        little."""
        return max(self.reconcile_interval_s, self.reconcile_grace_s / 2)


@dataclass(frozen=True)
class Webhooks:
    """Job callbacks (shared/jobs/webhooks.py)."""

    allow_private: bool = False  # ALPHAFORGE_WEBHOOK_ALLOW_PRIVATE: loopback/private/link-local targets allowed
    max_attempts: int = 5  # ALPHAFORGE_WEBHOOK_MAX_ATTEMPTS: then the delivery is marked failed
    backoff_s: float = 10.0  # ALPHAFORGE_WEBHOOK_BACKOFF: wait before the 2nd attempt; doubles each time
    timeout_s: float = 10.0  # ALPHAFORGE_WEBHOOK_TIMEOUT: seconds per attempt
    poll_interval_s: float = 5.0  # ALPHAFORGE_WEBHOOK_POLL_INTERVAL: how often beat looks for due deliveries


@dataclass(frozen=True)
class ApiServer:
    """The API's gunicorn processes (api/gunicorn_conf.py) and its limit on server-sent event streams."""

    workers: int = 2  # ALPHAFORGE_API_WORKERS: gunicorn worker processes
    threads: int = 16  # ALPHAFORGE_API_THREADS: threads per worker process (requests served at once)
    # ALPHAFORGE_SSE_MAX_STREAMS: event streams open at once per worker process; the rest of the threads stay free
    # for other requests (default: threads - 4). Above it a stream request gets a 503 with Retry-After.
    sse_max_streams: int = 12
    # ALPHAFORGE_SSE_MAX_STREAMS_PER_USER: event streams one user may hold at once, across every API process and
    # host (counted in Redis)
    sse_max_streams_per_user: int = 4
    sse_heartbeat_s: float = 15.0  # ALPHAFORGE_SSE_HEARTBEAT_S: seconds between heartbeat comments on an idle stream
    # ALPHAFORGE_SSE_SLOT_LEASE_S: a stream's per-user slot lapses unless renewed within this (a killed API process's
    # streams stop counting after it); at least 2 x the heartbeat, since an idle stream renews once per heartbeat
    sse_slot_lease_s: float = 45.0

    def __post_init__(self) -> None:
        if not 1 <= self.sse_max_streams < self.threads:
            raise ConfigError(
                f"ALPHAFORGE_SSE_MAX_STREAMS must be between 1 and ALPHAFORGE_API_THREADS - 1 ({self.threads - 1}): "
                f"{self.sse_max_streams}"
            )
        if self.sse_slot_lease_s < 2 * self.sse_heartbeat_s:
            raise ConfigError(
                f"ALPHAFORGE_SSE_SLOT_LEASE_S ({self.sse_slot_lease_s:g}) must be at least twice "
                f"ALPHAFORGE_SSE_HEARTBEAT_S ({self.sse_heartbeat_s:g}): an idle stream renews its slot once per "
                "heartbeat"
            )


@dataclass(frozen=True)
class Supervision:
    """How ``alphaforge up`` restarts a child or embedded server that died (shared/ops/launcher.py)."""

    backoff_s: float = 1.0  # ALPHAFORGE_RESTART_BACKOFF: wait before the first restart; doubles each time
    backoff_max_s: float = 30.0  # ALPHAFORGE_RESTART_BACKOFF_MAX: the longest wait between restarts
    # ALPHAFORGE_RESTART_STABLE_AFTER: a process that stayed up this long starts again from the shortest wait
    stable_after_s: float = 60.0
    # ALPHAFORGE_RESTART_MAX and ALPHAFORGE_RESTART_WINDOW: one process dying more than this many times within the
    # window (seconds) stops `up` (exit 1) instead of being restarted again
    max_restarts: int = 5
    window_s: float = 300.0

    def __post_init__(self) -> None:
        if self.backoff_max_s < self.backoff_s:
            raise ConfigError(
                f"ALPHAFORGE_RESTART_BACKOFF_MAX ({self.backoff_max_s}) must be >= ALPHAFORGE_RESTART_BACKOFF "
                f"({self.backoff_s})"
            )


@dataclass(frozen=True)
class Timeouts:
    """Bounds on every wait for PostgreSQL and Redis (shared/infra/db.py, api/__init__.py, api/health.py).

    An API request never waits longer than these for a server that stopped answering: it gets a 503 instead. A
    frozen server (SIGSTOP, a hung host) still ACKs TCP, so server-side timeouts alone cannot bound that wait; the
    client-side deadline of each statement (its statement timeout plus ``DB_DEADLINE_MARGIN_S``) does."""

    db_connect_s: float = 1.5  # ALPHAFORGE_DB_CONNECT_TIMEOUT: opening a PostgreSQL connection (TCP + startup)
    db_ping_s: float = 1.0  # ALPHAFORGE_DB_PING_TIMEOUT: the liveness ping of a pooled connection at checkout
    # ALPHAFORGE_DB_STATEMENT_TIMEOUT: one SQL statement of an API request (server-side statement_timeout; the client
    # gives up half a second later)
    db_statement_s: float = 3.0
    db_lock_s: float = 2.0  # ALPHAFORGE_DB_LOCK_TIMEOUT: waiting for a row or advisory lock in an API request
    db_pool_checkout_s: float = 2.0  # ALPHAFORGE_DB_POOL_TIMEOUT: waiting for a free pooled connection
    # ALPHAFORGE_DB_WORKER_STATEMENT_TIMEOUT: one SQL statement of a worker, beat or CLI (large bar loads, bulk
    # upserts); a worker whose statement times out retries its shard with backoff
    db_worker_statement_s: float = 600.0
    db_idle_in_transaction_s: float = 60.0  # ALPHAFORGE_DB_IDLE_IN_TRANSACTION_TIMEOUT: a transaction left open
    redis_connect_s: float = 1.0  # ALPHAFORGE_REDIS_CONNECT_TIMEOUT: opening a Redis connection (API)
    redis_socket_s: float = 1.0  # ALPHAFORGE_REDIS_TIMEOUT: one Redis command of an API request
    # ALPHAFORGE_REDIS_COOLDOWN: after a Redis command of the API failed for want of an answer, the API's further
    # Redis calls fail at once for this long (rate limits open, a 503 where Redis is needed) instead of each
    # waiting its own timeout
    redis_cooldown_s: float = 2.0
    health_cache_s: float = 1.0  # ALPHAFORGE_HEALTH_CACHE: how long one health check answers every probe (0: none)
    health_budget_s: float = 2.5  # ALPHAFORGE_HEALTH_BUDGET: the longest a health or readiness probe waits


_BUCKET = re.compile(r"[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]")


@dataclass(frozen=True)
class ArtifactStorage:
    """Where run artifacts are written (shared/infra/artifact_store.py). Unset ``url``: ``<data dir>/artifacts``.

    Credentials left unset are found the way AWS tools find them (instance or container role, web identity)."""

    url: str | None = None  # ALPHAFORGE_ARTIFACTS_URL: s3://bucket[/prefix]
    s3_endpoint_url: str | None = None  # ALPHAFORGE_S3_ENDPOINT_URL: an S3-compatible server (MinIO, Ceph); unset: AWS
    s3_region: str | None = None  # ALPHAFORGE_S3_REGION, else AWS_REGION or AWS_DEFAULT_REGION
    s3_access_key_id: str | None = field(default=None, repr=False)  # AWS_ACCESS_KEY_ID
    s3_secret_access_key: str | None = field(default=None, repr=False)  # AWS_SECRET_ACCESS_KEY
    s3_session_token: str | None = field(default=None, repr=False)  # AWS_SESSION_TOKEN


def _artifacts_url(env: Mapping[str, str], name: str) -> str | None:
    """``s3://bucket[/prefix]`` with a valid bucket name (normalised without trailing slash), or None when unset."""
    raw = (env.get(name) or "").strip()
    if not raw:
        return None
    scheme, _, rest = raw.partition("://")
    bucket, _, prefix = rest.partition("/")
    if scheme != "s3" or not _BUCKET.fullmatch(bucket) or ".." in bucket:
        raise ConfigError(f"{name} must be s3://bucket[/prefix] (unset: the data directory), got {raw!r}")
    prefix = prefix.strip("/")
    if prefix and any(part in ("", ".", "..") for part in prefix.split("/")):
        raise ConfigError(f"{name} has an empty, '.' or '..' part in its prefix: {raw!r}")
    return f"s3://{bucket}/{prefix}" if prefix else f"s3://{bucket}"


def _endpoint_url(env: Mapping[str, str], name: str) -> str | None:
    raw = (env.get(name) or "").strip().rstrip("/")
    if raw and not raw.startswith(("http://", "https://")):
        raise ConfigError(f"{name} must be an http:// or https:// URL, got {raw!r}")
    return raw or None


MIN_JWT_SECRET_CHARS = 32  # HS256 wants a key of at least 256 bits
MIN_FLOWER_PASSWORD_CHARS = 12


@dataclass(frozen=True)
class Settings:
    """All tunables of AlphaForge. Environment variable names are given per field."""

    database_url: str | None = None  # DATABASE_URL (embedded PostgreSQL when unset, `up` only)
    redis_url: str | None = None  # REDIS_URL (embedded Redis when unset, `up` only)
    data_dir: Path = Path(".alphaforge")  # ALPHAFORGE_DATA_DIR
    api_host: str = "127.0.0.1"  # ALPHAFORGE_API_HOST
    api_port: int = 8000  # ALPHAFORGE_API_PORT
    worker_concurrency: int = 2  # ALPHAFORGE_WORKER_CONCURRENCY
    shard_size: int = 50  # ALPHAFORGE_SHARD_SIZE: symbols per Celery task
    max_symbols_per_job: int = 5000  # ALPHAFORGE_MAX_SYMBOLS
    max_script_chars: int = 50_000  # ALPHAFORGE_MAX_SCRIPT_CHARS
    max_request_bytes: int = 2_000_000  # ALPHAFORGE_MAX_REQUEST_BYTES
    enqueue_timeout_s: float = 5.0  # ALPHAFORGE_ENQUEUE_TIMEOUT: broker publish budget per job
    shard_max_retries: int = 3  # ALPHAFORGE_SHARD_MAX_RETRIES: attempts after a failure that is not a DB outage
    # ALPHAFORGE_MAX_VALIDATION_BACKTESTS: a run's validation, in backtests (draws x symbols + each task's baseline)
    max_validation_backtests: int = 250_000
    # ALPHAFORGE_MAX_VALIDATION_TASK_BACKTESTS: one validation task (its chunk of draws x symbols), in backtests
    max_validation_task_backtests: int = 50_000
    # ALPHAFORGE_MAX_SCRIPT_VALIDATION_BACKTESTS: a script strategy's permutation test (draws x symbols), each
    # backtest's signals computed in the sandbox
    max_script_validation_backtests: int = 20_000
    # ALPHAFORGE_MAX_GRID_COMBOS: parameter combinations one optimisation may evaluate (grid or random budget)
    max_grid_combos: int = 20_000
    # ALPHAFORGE_MAX_OPTIMIZATION_BACKTESTS: combos x symbols x (walk-forward windows or 1), per optimisation
    max_optimization_backtests: int = 2_000_000
    # ALPHAFORGE_OPTIMIZATION_SLICE: backtests (combos x symbols) per optimisation task (one JobShard each)
    optimization_slice_backtests: int = 2_500
    # ALPHAFORGE_MAX_SCRIPT_COMBOS: combos one optimisation of a script strategy may evaluate (a sandbox run each)
    max_script_combos: int = 200
    # ALPHAFORGE_SCRIPT_OPTIMIZATION_SLICE: combos per optimisation task of a script strategy
    script_optimization_slice_combos: int = 10
    sandbox: SandboxLimits = field(default_factory=SandboxLimits)
    # ALPHAFORGE_SANDBOX_TIMEOUT (s per symbol), ALPHAFORGE_SANDBOX_MEMORY_MB
    jwt_secret_key: str | None = field(default=None, repr=False)  # JWT_SECRET_KEY: required by the API
    access_token_ttl_s: int = 900  # ALPHAFORGE_ACCESS_TOKEN_TTL: seconds an access token is valid
    refresh_token_ttl_s: int = 14 * 24 * 3600  # ALPHAFORGE_REFRESH_TOKEN_TTL: seconds a refresh token is valid
    registration_open: bool = True  # ALPHAFORGE_REGISTRATION_OPEN: whether POST /api/auth/register is allowed
    proxy_hops: int = 0  # ALPHAFORGE_PROXY_HOPS: trusted reverse proxies in front of the API (X-Forwarded-For)
    log_level: str = "INFO"  # ALPHAFORGE_LOG_LEVEL
    rate_limits: RateLimits = field(default_factory=RateLimits)
    maintenance: Maintenance = field(default_factory=Maintenance)
    flower_port: int = 5555  # ALPHAFORGE_FLOWER_PORT: where `up` starts Flower (on ALPHAFORGE_API_HOST)
    # FLOWER_BASIC_AUTH: "user:password" for Flower (generated by `up` in embedded mode only; required otherwise)
    flower_basic_auth: str | None = field(default=None, repr=False)
    metrics_token: str | None = field(default=None, repr=False)  # ALPHAFORGE_METRICS_TOKEN: bearer token of /metrics
    webhooks: Webhooks = field(default_factory=Webhooks)
    api: ApiServer = field(default_factory=ApiServer)
    artifacts: ArtifactStorage = field(default_factory=ArtifactStorage)
    supervision: Supervision = field(default_factory=Supervision)
    timeouts: Timeouts = field(default_factory=Timeouts)

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> Settings:
        env = os.environ if env is None else env
        defaults = cls()
        sandbox = SandboxLimits(
            symbol_timeout_s=_float(env, "ALPHAFORGE_SANDBOX_TIMEOUT", defaults.sandbox.symbol_timeout_s),
            memory_mb=_int(env, "ALPHAFORGE_SANDBOX_MEMORY_MB", defaults.sandbox.memory_mb, minimum=64),
        )
        rate = defaults.rate_limits
        rate_limits = RateLimits(
            submit=_rate(env, "ALPHAFORGE_RATE_LIMIT_SUBMIT", rate.submit),
            login=_rate(env, "ALPHAFORGE_RATE_LIMIT_LOGIN", rate.login),
            failed_login_user=_rate(env, "ALPHAFORGE_RATE_LIMIT_FAILED_LOGIN_USER", rate.failed_login_user),
            failed_login_address=_rate(env, "ALPHAFORGE_RATE_LIMIT_FAILED_LOGIN_ADDRESS", rate.failed_login_address),
            failed_login_pair=_rate(env, "ALPHAFORGE_RATE_LIMIT_FAILED_LOGIN_PAIR", rate.failed_login_pair),
            failed_login_usernames=_single_rate(
                env, "ALPHAFORGE_RATE_LIMIT_FAILED_LOGIN_USERNAMES", rate.failed_login_usernames
            ),
            login_known_days=_int(env, "ALPHAFORGE_LOGIN_KNOWN_DAYS", rate.login_known_days, minimum=0),
            register=_rate(env, "ALPHAFORGE_RATE_LIMIT_REGISTER", rate.register),
            max_active_jobs=_int(env, "ALPHAFORGE_MAX_ACTIVE_JOBS", rate.max_active_jobs),
        )
        maint = defaults.maintenance
        maintenance = Maintenance(
            reconcile_interval_s=_float(env, "ALPHAFORGE_RECONCILE_INTERVAL", maint.reconcile_interval_s),
            reconcile_grace_s=_float(env, "ALPHAFORGE_RECONCILE_GRACE", maint.reconcile_grace_s),
            reconcile_max_requeues=_int(env, "ALPHAFORGE_RECONCILE_MAX_REQUEUES", maint.reconcile_max_requeues),
            shard_lease_s=_float(env, "ALPHAFORGE_SHARD_LEASE", maint.shard_lease_s),
            shard_lease_renew_s=_float(env, "ALPHAFORGE_SHARD_LEASE_RENEW", maint.shard_lease_renew_s),
            retention_interval_s=_float(env, "ALPHAFORGE_RETENTION_INTERVAL", maint.retention_interval_s),
            retention_days=_int(env, "ALPHAFORGE_RETENTION_DAYS", maint.retention_days, minimum=0),
            retention_max_jobs=_int(env, "ALPHAFORGE_RETENTION_MAX_JOBS", maint.retention_max_jobs, minimum=0),
            run_retention_keep=_int(env, "ALPHAFORGE_RUN_RETENTION_KEEP", maint.run_retention_keep, minimum=0),
            optimization_retention_keep=_int(
                env, "ALPHAFORGE_OPTIMIZATION_RETENTION_KEEP", maint.optimization_retention_keep, minimum=0
            ),
            nightly_schedule=_cron(env, "ALPHAFORGE_NIGHTLY_SCHEDULE", maint.nightly_schedule),
            exchange_timezone=_timezone(env, "ALPHAFORGE_EXCHANGE_TIMEZONE", maint.exchange_timezone),
        )
        api_threads = _int(env, "ALPHAFORGE_API_THREADS", ApiServer.threads, minimum=2)
        api_server = ApiServer(
            workers=_int(env, "ALPHAFORGE_API_WORKERS", ApiServer.workers),
            threads=api_threads,
            sse_max_streams=_int(env, "ALPHAFORGE_SSE_MAX_STREAMS", max(1, api_threads - 4)),
            sse_max_streams_per_user=_int(
                env, "ALPHAFORGE_SSE_MAX_STREAMS_PER_USER", ApiServer.sse_max_streams_per_user
            ),
            sse_heartbeat_s=_float(env, "ALPHAFORGE_SSE_HEARTBEAT_S", ApiServer.sse_heartbeat_s),
            sse_slot_lease_s=_float(env, "ALPHAFORGE_SSE_SLOT_LEASE_S", ApiServer.sse_slot_lease_s),
        )
        log_level = (env.get("ALPHAFORGE_LOG_LEVEL") or defaults.log_level).strip().upper()
        if log_level not in ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL"):
            raise ConfigError(f"ALPHAFORGE_LOG_LEVEL must be DEBUG, INFO, WARNING, ERROR or CRITICAL: {log_level!r}")
        return cls(
            database_url=env.get("DATABASE_URL") or None,
            redis_url=env.get("REDIS_URL") or None,
            data_dir=Path(env.get("ALPHAFORGE_DATA_DIR") or defaults.data_dir),
            api_host=env.get("ALPHAFORGE_API_HOST") or defaults.api_host,
            api_port=_int(env, "ALPHAFORGE_API_PORT", defaults.api_port),
            worker_concurrency=_int(env, "ALPHAFORGE_WORKER_CONCURRENCY", defaults.worker_concurrency),
            shard_size=_int(env, "ALPHAFORGE_SHARD_SIZE", defaults.shard_size),
            max_symbols_per_job=_int(env, "ALPHAFORGE_MAX_SYMBOLS", defaults.max_symbols_per_job),
            max_script_chars=_int(env, "ALPHAFORGE_MAX_SCRIPT_CHARS", defaults.max_script_chars),
            max_request_bytes=_int(env, "ALPHAFORGE_MAX_REQUEST_BYTES", defaults.max_request_bytes),
            enqueue_timeout_s=_float(env, "ALPHAFORGE_ENQUEUE_TIMEOUT", defaults.enqueue_timeout_s),
            shard_max_retries=_int(env, "ALPHAFORGE_SHARD_MAX_RETRIES", defaults.shard_max_retries, minimum=0),
            max_validation_backtests=_int(
                env, "ALPHAFORGE_MAX_VALIDATION_BACKTESTS", defaults.max_validation_backtests
            ),
            max_validation_task_backtests=_int(
                env, "ALPHAFORGE_MAX_VALIDATION_TASK_BACKTESTS", defaults.max_validation_task_backtests
            ),
            max_script_validation_backtests=_int(
                env, "ALPHAFORGE_MAX_SCRIPT_VALIDATION_BACKTESTS", defaults.max_script_validation_backtests
            ),
            max_grid_combos=_int(env, "ALPHAFORGE_MAX_GRID_COMBOS", defaults.max_grid_combos),
            max_optimization_backtests=_int(
                env, "ALPHAFORGE_MAX_OPTIMIZATION_BACKTESTS", defaults.max_optimization_backtests
            ),
            optimization_slice_backtests=_int(
                env, "ALPHAFORGE_OPTIMIZATION_SLICE", defaults.optimization_slice_backtests
            ),
            max_script_combos=_int(env, "ALPHAFORGE_MAX_SCRIPT_COMBOS", defaults.max_script_combos),
            script_optimization_slice_combos=_int(
                env, "ALPHAFORGE_SCRIPT_OPTIMIZATION_SLICE", defaults.script_optimization_slice_combos
            ),
            sandbox=sandbox,
            jwt_secret_key=env.get("JWT_SECRET_KEY") or None,
            access_token_ttl_s=_int(env, "ALPHAFORGE_ACCESS_TOKEN_TTL", defaults.access_token_ttl_s),
            refresh_token_ttl_s=_int(env, "ALPHAFORGE_REFRESH_TOKEN_TTL", defaults.refresh_token_ttl_s),
            registration_open=_bool(env, "ALPHAFORGE_REGISTRATION_OPEN", defaults.registration_open),
            proxy_hops=_int(env, "ALPHAFORGE_PROXY_HOPS", defaults.proxy_hops, minimum=0),
            log_level=log_level,
            rate_limits=rate_limits,
            maintenance=maintenance,
            flower_port=_int(env, "ALPHAFORGE_FLOWER_PORT", defaults.flower_port),
            flower_basic_auth=env.get("FLOWER_BASIC_AUTH") or None,
            metrics_token=env.get("ALPHAFORGE_METRICS_TOKEN") or None,
            webhooks=Webhooks(
                allow_private=_bool(env, "ALPHAFORGE_WEBHOOK_ALLOW_PRIVATE", False),
                max_attempts=_int(env, "ALPHAFORGE_WEBHOOK_MAX_ATTEMPTS", Webhooks.max_attempts),
                backoff_s=_float(env, "ALPHAFORGE_WEBHOOK_BACKOFF", Webhooks.backoff_s),
                timeout_s=_float(env, "ALPHAFORGE_WEBHOOK_TIMEOUT", Webhooks.timeout_s),
                poll_interval_s=_float(env, "ALPHAFORGE_WEBHOOK_POLL_INTERVAL", Webhooks.poll_interval_s),
            ),
            api=api_server,
            artifacts=ArtifactStorage(
                url=_artifacts_url(env, "ALPHAFORGE_ARTIFACTS_URL"),
                s3_endpoint_url=_endpoint_url(env, "ALPHAFORGE_S3_ENDPOINT_URL"),
                s3_region=env.get("ALPHAFORGE_S3_REGION") or env.get("AWS_REGION") or env.get("AWS_DEFAULT_REGION"),
                s3_access_key_id=env.get("AWS_ACCESS_KEY_ID") or None,
                s3_secret_access_key=env.get("AWS_SECRET_ACCESS_KEY") or None,
                s3_session_token=env.get("AWS_SESSION_TOKEN") or None,
            ),
            timeouts=Timeouts(
                db_connect_s=_float(env, "ALPHAFORGE_DB_CONNECT_TIMEOUT", Timeouts.db_connect_s),
                db_ping_s=_float(env, "ALPHAFORGE_DB_PING_TIMEOUT", Timeouts.db_ping_s),
                db_statement_s=_float(env, "ALPHAFORGE_DB_STATEMENT_TIMEOUT", Timeouts.db_statement_s),
                db_lock_s=_float(env, "ALPHAFORGE_DB_LOCK_TIMEOUT", Timeouts.db_lock_s),
                db_pool_checkout_s=_float(env, "ALPHAFORGE_DB_POOL_TIMEOUT", Timeouts.db_pool_checkout_s),
                db_worker_statement_s=_float(
                    env, "ALPHAFORGE_DB_WORKER_STATEMENT_TIMEOUT", Timeouts.db_worker_statement_s
                ),
                db_idle_in_transaction_s=_float(
                    env, "ALPHAFORGE_DB_IDLE_IN_TRANSACTION_TIMEOUT", Timeouts.db_idle_in_transaction_s
                ),
                redis_connect_s=_float(env, "ALPHAFORGE_REDIS_CONNECT_TIMEOUT", Timeouts.redis_connect_s),
                redis_socket_s=_float(env, "ALPHAFORGE_REDIS_TIMEOUT", Timeouts.redis_socket_s),
                redis_cooldown_s=_float(env, "ALPHAFORGE_REDIS_COOLDOWN", Timeouts.redis_cooldown_s),
                health_cache_s=max(0.0, _float(env, "ALPHAFORGE_HEALTH_CACHE", Timeouts.health_cache_s, minimum=-1.0)),
                health_budget_s=_float(env, "ALPHAFORGE_HEALTH_BUDGET", Timeouts.health_budget_s),
            ),
            supervision=Supervision(
                backoff_s=_float(env, "ALPHAFORGE_RESTART_BACKOFF", Supervision.backoff_s),
                backoff_max_s=_float(env, "ALPHAFORGE_RESTART_BACKOFF_MAX", Supervision.backoff_max_s),
                stable_after_s=_float(env, "ALPHAFORGE_RESTART_STABLE_AFTER", Supervision.stable_after_s),
                max_restarts=_int(env, "ALPHAFORGE_RESTART_MAX", Supervision.max_restarts, minimum=0),
                window_s=_float(env, "ALPHAFORGE_RESTART_WINDOW", Supervision.window_s),
            ),
        )

    def with_overrides(self, **changes: Any) -> Settings:
        return replace(self, **changes)

    def require_database_url(self) -> str:
        if not self.database_url:
            raise ConfigError(
                "DATABASE_URL is not set (./alphaforge up starts an embedded PostgreSQL when it is unset)"
            )
        return self.database_url

    def require_redis_url(self) -> str:
        if not self.redis_url:
            raise ConfigError("REDIS_URL is not set (./alphaforge up starts an embedded Redis when it is unset)")
        return self.redis_url

    def require_jwt_secret(self) -> str:
        """The API signs tokens with this; there is no default outside the embedded setup (`up` makes one)."""
        if not self.jwt_secret_key:
            raise ConfigError(
                "JWT_SECRET_KEY is not set: the API needs a secret to sign login tokens "
                f"(at least {MIN_JWT_SECRET_CHARS} random characters, e.g. from "
                "`python -c 'import secrets; print(secrets.token_urlsafe(48))'`)"
            )
        if len(self.jwt_secret_key) < MIN_JWT_SECRET_CHARS:
            raise ConfigError(
                f"JWT_SECRET_KEY is {len(self.jwt_secret_key)} characters; use at least {MIN_JWT_SECRET_CHARS}"
            )
        return self.jwt_secret_key

    def require_flower_basic_auth(self) -> tuple[str, str]:
        """Flower is never open: ``FLOWER_BASIC_AUTH`` must be ``user:password`` with a password of 12+ characters."""
        user, sep, password = (self.flower_basic_auth or "").partition(":")
        if not self.flower_basic_auth:
            raise ConfigError("FLOWER_BASIC_AUTH is not set: Flower needs credentials, as user:password")
        if not sep or not user or len(password) < MIN_FLOWER_PASSWORD_CHARS or "," in self.flower_basic_auth:
            raise ConfigError(
                f"FLOWER_BASIC_AUTH must be user:password with a password of at least {MIN_FLOWER_PASSWORD_CHARS} "
                "characters (and no comma)"
            )
        return user, password

    def child_env(self) -> dict[str, str]:
        """The environment variables that make a child process see these settings."""
        env = {
            "ALPHAFORGE_DATA_DIR": str(self.data_dir),
            "ALPHAFORGE_API_HOST": self.api_host,
            "ALPHAFORGE_API_PORT": str(self.api_port),
            "ALPHAFORGE_WORKER_CONCURRENCY": str(self.worker_concurrency),
            "ALPHAFORGE_SHARD_SIZE": str(self.shard_size),
            "ALPHAFORGE_MAX_SYMBOLS": str(self.max_symbols_per_job),
            "ALPHAFORGE_MAX_SCRIPT_CHARS": str(self.max_script_chars),
            "ALPHAFORGE_MAX_REQUEST_BYTES": str(self.max_request_bytes),
            "ALPHAFORGE_ENQUEUE_TIMEOUT": str(self.enqueue_timeout_s),
            "ALPHAFORGE_SHARD_MAX_RETRIES": str(self.shard_max_retries),
            "ALPHAFORGE_MAX_VALIDATION_BACKTESTS": str(self.max_validation_backtests),
            "ALPHAFORGE_MAX_VALIDATION_TASK_BACKTESTS": str(self.max_validation_task_backtests),
            "ALPHAFORGE_MAX_SCRIPT_VALIDATION_BACKTESTS": str(self.max_script_validation_backtests),
            "ALPHAFORGE_MAX_GRID_COMBOS": str(self.max_grid_combos),
            "ALPHAFORGE_MAX_OPTIMIZATION_BACKTESTS": str(self.max_optimization_backtests),
            "ALPHAFORGE_OPTIMIZATION_SLICE": str(self.optimization_slice_backtests),
            "ALPHAFORGE_MAX_SCRIPT_COMBOS": str(self.max_script_combos),
            "ALPHAFORGE_SCRIPT_OPTIMIZATION_SLICE": str(self.script_optimization_slice_combos),
            "ALPHAFORGE_SANDBOX_TIMEOUT": str(self.sandbox.symbol_timeout_s),
            "ALPHAFORGE_SANDBOX_MEMORY_MB": str(self.sandbox.memory_mb),
            "ALPHAFORGE_ACCESS_TOKEN_TTL": str(self.access_token_ttl_s),
            "ALPHAFORGE_REFRESH_TOKEN_TTL": str(self.refresh_token_ttl_s),
            "ALPHAFORGE_REGISTRATION_OPEN": "true" if self.registration_open else "false",
            "ALPHAFORGE_PROXY_HOPS": str(self.proxy_hops),
            "ALPHAFORGE_LOG_LEVEL": self.log_level,
            "ALPHAFORGE_RATE_LIMIT_SUBMIT": self.rate_limits.submit,
            "ALPHAFORGE_RATE_LIMIT_LOGIN": self.rate_limits.login,
            "ALPHAFORGE_RATE_LIMIT_FAILED_LOGIN_USER": self.rate_limits.failed_login_user,
            "ALPHAFORGE_RATE_LIMIT_FAILED_LOGIN_ADDRESS": self.rate_limits.failed_login_address,
            "ALPHAFORGE_RATE_LIMIT_FAILED_LOGIN_PAIR": self.rate_limits.failed_login_pair,
            "ALPHAFORGE_RATE_LIMIT_FAILED_LOGIN_USERNAMES": self.rate_limits.failed_login_usernames,
            "ALPHAFORGE_LOGIN_KNOWN_DAYS": str(self.rate_limits.login_known_days),
            "ALPHAFORGE_RATE_LIMIT_REGISTER": self.rate_limits.register,
            "ALPHAFORGE_MAX_ACTIVE_JOBS": str(self.rate_limits.max_active_jobs),
            "ALPHAFORGE_RECONCILE_INTERVAL": str(self.maintenance.reconcile_interval_s),
            "ALPHAFORGE_RECONCILE_GRACE": str(self.maintenance.reconcile_grace_s),
            "ALPHAFORGE_RECONCILE_MAX_REQUEUES": str(self.maintenance.reconcile_max_requeues),
            "ALPHAFORGE_SHARD_LEASE": str(self.maintenance.shard_lease_s),
            "ALPHAFORGE_SHARD_LEASE_RENEW": str(self.maintenance.shard_lease_renew_s),
            "ALPHAFORGE_RETENTION_INTERVAL": str(self.maintenance.retention_interval_s),
            "ALPHAFORGE_RETENTION_DAYS": str(self.maintenance.retention_days),
            "ALPHAFORGE_RETENTION_MAX_JOBS": str(self.maintenance.retention_max_jobs),
            "ALPHAFORGE_RUN_RETENTION_KEEP": str(self.maintenance.run_retention_keep),
            "ALPHAFORGE_OPTIMIZATION_RETENTION_KEEP": str(self.maintenance.optimization_retention_keep),
            "ALPHAFORGE_NIGHTLY_SCHEDULE": self.maintenance.nightly_schedule,
            "ALPHAFORGE_EXCHANGE_TIMEZONE": self.maintenance.exchange_timezone,
            "ALPHAFORGE_FLOWER_PORT": str(self.flower_port),
            "ALPHAFORGE_WEBHOOK_ALLOW_PRIVATE": "true" if self.webhooks.allow_private else "false",
            "ALPHAFORGE_WEBHOOK_MAX_ATTEMPTS": str(self.webhooks.max_attempts),
            "ALPHAFORGE_WEBHOOK_BACKOFF": str(self.webhooks.backoff_s),
            "ALPHAFORGE_WEBHOOK_TIMEOUT": str(self.webhooks.timeout_s),
            "ALPHAFORGE_WEBHOOK_POLL_INTERVAL": str(self.webhooks.poll_interval_s),
            "ALPHAFORGE_API_WORKERS": str(self.api.workers),
            "ALPHAFORGE_API_THREADS": str(self.api.threads),
            "ALPHAFORGE_SSE_MAX_STREAMS": str(self.api.sse_max_streams),
            "ALPHAFORGE_SSE_MAX_STREAMS_PER_USER": str(self.api.sse_max_streams_per_user),
            "ALPHAFORGE_SSE_HEARTBEAT_S": str(self.api.sse_heartbeat_s),
            "ALPHAFORGE_SSE_SLOT_LEASE_S": str(self.api.sse_slot_lease_s),
            "ALPHAFORGE_RESTART_BACKOFF": str(self.supervision.backoff_s),
            "ALPHAFORGE_RESTART_BACKOFF_MAX": str(self.supervision.backoff_max_s),
            "ALPHAFORGE_RESTART_STABLE_AFTER": str(self.supervision.stable_after_s),
            "ALPHAFORGE_RESTART_MAX": str(self.supervision.max_restarts),
            "ALPHAFORGE_RESTART_WINDOW": str(self.supervision.window_s),
            "ALPHAFORGE_DB_CONNECT_TIMEOUT": str(self.timeouts.db_connect_s),
            "ALPHAFORGE_DB_PING_TIMEOUT": str(self.timeouts.db_ping_s),
            "ALPHAFORGE_DB_STATEMENT_TIMEOUT": str(self.timeouts.db_statement_s),
            "ALPHAFORGE_DB_LOCK_TIMEOUT": str(self.timeouts.db_lock_s),
            "ALPHAFORGE_DB_POOL_TIMEOUT": str(self.timeouts.db_pool_checkout_s),
            "ALPHAFORGE_DB_WORKER_STATEMENT_TIMEOUT": str(self.timeouts.db_worker_statement_s),
            "ALPHAFORGE_DB_IDLE_IN_TRANSACTION_TIMEOUT": str(self.timeouts.db_idle_in_transaction_s),
            "ALPHAFORGE_REDIS_CONNECT_TIMEOUT": str(self.timeouts.redis_connect_s),
            "ALPHAFORGE_REDIS_TIMEOUT": str(self.timeouts.redis_socket_s),
            "ALPHAFORGE_REDIS_COOLDOWN": str(self.timeouts.redis_cooldown_s),
            "ALPHAFORGE_HEALTH_CACHE": str(self.timeouts.health_cache_s),
            "ALPHAFORGE_HEALTH_BUDGET": str(self.timeouts.health_budget_s),
        }  # JWT_SECRET_KEY is left out on purpose: only the API needs it (the launcher hands it to the API alone)
        store = self.artifacts  # the worker writes artifacts and the API serves them: both need the same store
        optional = {
            "ALPHAFORGE_ARTIFACTS_URL": store.url,
            "ALPHAFORGE_S3_ENDPOINT_URL": store.s3_endpoint_url,
            "ALPHAFORGE_S3_REGION": store.s3_region,
            "AWS_ACCESS_KEY_ID": store.s3_access_key_id,
            "AWS_SECRET_ACCESS_KEY": store.s3_secret_access_key,
            "AWS_SESSION_TOKEN": store.s3_session_token,
        }
        env.update({name: value for name, value in optional.items() if value})
        if self.database_url:
            env["DATABASE_URL"] = self.database_url
        if self.redis_url:
            env["REDIS_URL"] = self.redis_url
        return env
