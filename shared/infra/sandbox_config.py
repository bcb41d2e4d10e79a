"""The sandbox's settings: the limits of one sandbox child and of its zygote (shared/sandbox/)."""

from __future__ import annotations

from dataclasses import dataclass

from shared.infra import settings_schema as schema
from shared.infra.settings_schema import setting


@dataclass(frozen=True)
class SandboxLimits:
    """Resource limits of one sandbox child (see shared/sandbox/runner.py and shared/sandbox/child.py)."""

    symbol_timeout_s: float = setting(  # enforced by the parent with a kill
        "ALPHAFORGE_SANDBOX_TIMEOUT", 10.0, "seconds of wall clock per symbol"
    )
    startup_timeout_s: float = 15.0  # a fork and the child's set-up (a new zygote's start-up included)
    memory_mb: int = setting(  # RLIMIT_AS of the child, on top of what the zygote had mapped
        "ALPHAFORGE_SANDBOX_MEMORY_MB",
        1024,
        "memory a sandbox child may allocate, MB (its address-space limit, on top of the interpreter, numpy and the "
        "shard's bars it starts with)",
        ge=64,
    )
    max_output_line_bytes: int = 65_536  # one result line from the child
    max_error_chars: int = 2_000  # exception message kept per symbol
    max_output_chars: int = setting(
        "ALPHAFORGE_SANDBOX_OUTPUT_CHARS",
        10_000,
        "characters of `print` output kept per symbol (interactive runs, and jobs with `capture_output`); the rest is "
        "counted and marked as dropped (`0`: none kept)",
        ge=0,
        check=schema.at_most(1_000_000),
    )
    zygote_forks: int = setting(
        "ALPHAFORGE_SANDBOX_ZYGOTE_FORKS",
        500,
        "shards a worker process's sandbox zygote forks before it is replaced (a new zygote re-randomizes the "
        "address layout its children share)",
        ge=1,
    )


@dataclass(frozen=True)
class SandboxBounds:
    """What a submitter may ask of the sandbox (a calculation job's ``timeout`` and ``memory_mb``), and the bound on
    the print output one job keeps."""

    max_timeout_s: float = setting(
        "ALPHAFORGE_SANDBOX_MAX_TIMEOUT", 300.0, "largest `timeout` (seconds per symbol) a job may ask for"
    )
    max_memory_mb: int = setting(
        "ALPHAFORGE_SANDBOX_MAX_MEMORY_MB", 2048, "largest `memory_mb` a job may ask for", ge=64
    )
    job_output_chars: int = setting(
        "ALPHAFORGE_SANDBOX_JOB_OUTPUT_CHARS",
        1_000_000,
        "characters of `print` output one job with `capture_output` keeps in all: each symbol gets an equal share "
        "(at most ALPHAFORGE_SANDBOX_OUTPUT_CHARS)",
    )

    execute_timeout_s: float = setting(
        "ALPHAFORGE_INTERACTIVE_TIMEOUT", 30.0, "an interactive run's `timeout` when it gives none, seconds"
    )
    execute_memory_mb: int = setting(
        "ALPHAFORGE_INTERACTIVE_MEMORY_MB", 512, "an interactive run's `max_memory_mb` when it gives none", ge=64
    )
    interactive_wait_s: float = setting(
        "ALPHAFORGE_INTERACTIVE_WAIT",
        10.0,
        "how long an interactive run's request waits for its answer before it answers 202 with the job to poll",
    )

    min_timeout_s = 1.0
    min_memory_mb = 64


@dataclass(frozen=True)
class ComputeQuotas:
    """Sandbox CPU seconds each user may use a day (UTC), as the supervisor measures them (shared/accounts/quotas.py).

    Two budgets: ``interactive`` (jobs and interactive runs submitted through the API) and ``nightly`` (the nightly
    recalculation), so that a day of screening never leaves the night's run without CPU, nor the other way round."""

    interactive_cpu_s: float = setting(
        "ALPHAFORGE_QUOTA_CPU_SECONDS",
        36_000.0,
        "sandbox CPU seconds a user's jobs and interactive runs may use a day, UTC (`0`: no limit)",
        ge=0,
    )
    nightly_cpu_s: float = setting(
        "ALPHAFORGE_QUOTA_NIGHTLY_CPU_SECONDS",
        36_000.0,
        "sandbox CPU seconds a user's nightly recalculations may use a day, UTC (`0`: no limit)",
        ge=0,
    )
