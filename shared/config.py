"""Configuration, read from the environment in exactly one place.

Every process (API, worker, beat, launcher, tests) builds a :class:`Settings` with
:meth:`Settings.from_env`; tests build their own with explicit values instead of patching.
The documented defaults are the embedded development setup.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from shared.errors import ConfigError

# Queue names: interactive jobs never wait behind bulk work on the same queue.
QUEUE_INTERACTIVE = "interactive"
QUEUE_BULK = "bulk"


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


@dataclass(frozen=True)
class SandboxLimits:
    """Resource limits of one sandbox process (see worker/sandbox_runner.py)."""

    symbol_timeout_s: float = 10.0  # wall clock per symbol, enforced by the parent with a kill
    startup_timeout_s: float = 15.0  # process start + reading its input
    memory_mb: int = 1024  # RLIMIT_AS of the sandbox process
    max_output_line_bytes: int = 65_536  # one result line from the child
    max_error_chars: int = 2_000  # exception message kept per symbol


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
    sandbox: SandboxLimits = field(default_factory=SandboxLimits)
    # ALPHAFORGE_SANDBOX_TIMEOUT (s per symbol), ALPHAFORGE_SANDBOX_MEMORY_MB

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> Settings:
        env = os.environ if env is None else env
        defaults = cls()
        sandbox = SandboxLimits(
            symbol_timeout_s=_float(env, "ALPHAFORGE_SANDBOX_TIMEOUT", defaults.sandbox.symbol_timeout_s),
            memory_mb=_int(env, "ALPHAFORGE_SANDBOX_MEMORY_MB", defaults.sandbox.memory_mb, minimum=64),
        )
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
            sandbox=sandbox,
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
            "ALPHAFORGE_SANDBOX_TIMEOUT": str(self.sandbox.symbol_timeout_s),
            "ALPHAFORGE_SANDBOX_MEMORY_MB": str(self.sandbox.memory_mb),
        }
        if self.database_url:
            env["DATABASE_URL"] = self.database_url
        if self.redis_url:
            env["REDIS_URL"] = self.redis_url
        return env
