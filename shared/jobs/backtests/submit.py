"""Submitting a backtest run: the request, what makes two runs the same, the checks made before anything is written,
and the write itself through the pipeline's idempotent skeleton (``shared.jobs.pipeline.submit_once``).

A run is a job of kind ``backtest`` (the same shards, counters, cancel and finalization as any job) plus its run
record (``BacktestRun``), written in the job's own transaction. Validation (``shared.domain.robustness``) adds task
shards that come first (``JobShard.task``): see :mod:`.shard`.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass

from sqlalchemy import select
from sqlalchemy.orm import Session, sessionmaker

from shared.domain import robustness as val
from shared.domain.backtest import BacktestConfig
from shared.errors import ValidationFailed
from shared.infra.events import JobEvents
from shared.infra.models import BacktestRun, Job, JobKind, Symbol
from shared.jobs import pipeline as jobs
from shared.jobs.backtests.read import find_run
from shared.jobs.calculations import symbols_sha256
from shared.marketdata.bars import data_stamp, has_bars, series_sizes


@dataclass(frozen=True)
class RunRequest:
    config: BacktestConfig
    owner_id: str
    name: str | None = None
    callback_url: str | None = None  # checked by shared/jobs/webhooks.validate_callback_url before it gets here
    validation: val.ValidationSpec | None = None  # None (or no method enabled): no validation
    strategy_code: str | None = None  # a script strategy's pinned code (shared.library.strategy_scripts.pin_for_run)

    @property
    def definition(self) -> tuple[str, str]:
        return run_definition(self.config, self.validation)


def run_definition(config: BacktestConfig, validation: val.ValidationSpec | None) -> tuple[str, str]:
    """(canonical JSON, SHA-256) of what a run computes: the config's own when there is no validation (so a
    run without validation keeps the config's hash), else the config and the validation spec together. The hash
    makes creation idempotent: same config and same validation, same run; another validation, another run."""
    if validation is None or not validation.methods():
        return config.canonical_json(), config.config_hash
    doc = {"config": json.loads(config.canonical_json()), "validation": validation.model_dump(mode="json")}
    text_ = json.dumps(doc, sort_keys=True, separators=(",", ":"), ensure_ascii=False, allow_nan=False)
    return text_, hashlib.sha256(text_.encode()).hexdigest()


@dataclass(frozen=True)
class ValidationLimits:
    max_backtests: int  # the whole validation, in backtests (Task.work summed)
    max_task_backtests: int  # one task (keeps a task well inside the Celery time limit)
    max_script_backtests: int = 20_000  # a script strategy's permutation test: draws x symbols through the sandbox
    max_bars: int = 20_000_000  # what a task over the whole portfolio holds: every symbol's bars (~50 bytes each)


def check_portfolio_bars(session: Session, config: BacktestConfig, max_bars: int, field: str, what: str) -> None:
    """A task that needs every symbol of a job holds all their bars at once: series of more than ``max_bars`` bars
    together (``ALPHAFORGE_MAX_PORTFOLIO_BARS``; counted by chunk over the date range, an upper bound) are a 422 on
    ``field``, not a worker out of memory."""
    held = sum(series_sizes(session.connection(), config.symbols, config.timeframe, config.start_date,
                            config.end_date).values())  # fmt: skip
    if held > max_bars:
        raise ValidationFailed.for_field(
            field,
            f"{what} holds its symbols' {held:,} bars at once, more than {max_bars:,} "
            "(ALPHAFORGE_MAX_PORTFOLIO_BARS): take fewer symbols, a shorter range or a coarser timeframe",
        )


def check_validation(config: BacktestConfig, spec: val.ValidationSpec, limits: ValidationLimits) -> list[val.Task]:
    """The tasks of a run's validation, or a 422 naming the field: walk-forward re-optimises dual SMA only; the
    total work (draws x symbols, plus each task's own baseline) and one task's work are bounded by config."""
    if spec.walk_forward is not None and config.strategy.name != "dual_sma":
        raise ValidationFailed.for_field(
            "validation.walk_forward", f"walk-forward re-optimises the dual_sma strategy, not {config.strategy.name}"
        )
    if spec.permutation is not None and config.strategy.name == "script":
        sandboxed = spec.permutation.n * len(config.symbols)
        if sandboxed > limits.max_script_backtests:
            raise ValidationFailed.for_field(
                "validation.permutation.n",
                f"{sandboxed:,} permuted backtests of a script strategy (n x {len(config.symbols)} symbols), each "
                f"through the sandbox; at most {limits.max_script_backtests:,} per run "
                "(ALPHAFORGE_MAX_SCRIPT_VALIDATION_BACKTESTS): use fewer permutations or symbols",
            )
    tasks = val.plan(spec, len(config.symbols))
    total = sum(t.work for t in tasks)
    if total > limits.max_backtests:
        raise ValidationFailed.for_field(
            "validation",
            f"{total:,} backtests (draws x {len(config.symbols)} symbols, plus each task's baseline); at most "
            f"{limits.max_backtests:,} per run (ALPHAFORGE_MAX_VALIDATION_BACKTESTS): use fewer draws or symbols",
        )
    heaviest = max((t.work for t in tasks), default=0)
    if heaviest > limits.max_task_backtests:
        raise ValidationFailed.for_field(
            "validation.chunk",
            f"a task of {spec.chunk} draws is {heaviest:,} backtests; at most {limits.max_task_backtests:,} per task "
            "(ALPHAFORGE_MAX_VALIDATION_TASK_BACKTESTS): use a smaller chunk",
        )
    return tasks


def check_symbols(session: Session, config: BacktestConfig) -> None:
    """Unknown symbols are a 422 naming each one (``symbols[i]``); a date range in which none of the symbols
    has a bar is a 422 on ``start_date``. A symbol without bars in the range while others have some is that
    symbol's ``NoData`` error in the results (a universe often holds a symbol listed later)."""
    known = set(session.scalars(select(Symbol.symbol).where(Symbol.symbol.in_(config.symbols))))
    unknown = [(i, s) for i, s in enumerate(config.symbols) if s not in known]
    if unknown:
        errors = [{"field": f"symbols[{i}]", "message": f"unknown symbol {s}"} for i, s in unknown]
        shown = ", ".join(s for _, s in unknown[:5]) + (f" (and {len(unknown) - 5} more)" if len(unknown) > 5 else "")
        raise ValidationFailed(f"symbols: unknown symbol(s) {shown}", details={"errors": errors})
    if not has_bars(session.connection(), config.symbols, config.start_date, config.end_date, config.timeframe):
        start = config.start_date.isoformat() if config.start_date else "the first bar"
        end = config.end_date.isoformat() if config.end_date else "the last bar"
        message = f"no bars between {start} and {end} for any of the {len(config.symbols)} symbols"
        raise ValidationFailed(
            f"start_date: {message}", details={"errors": [{"field": "start_date", "message": message}]}
        )


def submit_run(
    factory: sessionmaker[Session],
    request: RunRequest,
    *,
    shard_size: int,
    enqueue: jobs.Enqueue,
    max_active_per_owner: int | None = None,
    on_write: jobs.OnWrite | None = None,
    events: JobEvents | None = None,
    validation_limits: ValidationLimits | None = None,
) -> jobs.Submitted[BacktestRun]:
    """The owner's existing run of this definition (``created`` False), or a new one written and enqueued.

    The run row is written in the job's own transaction; two concurrent submissions of one definition meet at the
    unique ``(owner_id, config_hash)`` constraint, and the loser returns the winner's run (``pipeline.submit_once``).
    """
    config = request.config
    definition, run_hash = request.definition
    spec = request.validation if request.validation is not None and request.validation.methods() else None
    tasks: list[val.Task] = []
    if spec is not None:
        tasks = check_validation(config, spec, validation_limits or ValidationLimits(10**12, 10**12))

    with factory() as session:
        stamp = data_stamp(session.connection(), config.symbols, config.timeframe)
        if spec is not None and validation_limits and any(val.task_positions(t, spec) is None for t in tasks):
            check_portfolio_bars(session, config, validation_limits.max_bars, "validation", "validating this portfolio")

    def build(session: Session) -> tuple[Job, BacktestRun]:
        check_symbols(session, config)
        if (config.strategy.name == "script") != (request.strategy_code is not None):
            raise ValueError("a script strategy's run needs its pinned code (and only such a run has one)")
        job = Job(
            kind=JobKind.BACKTEST.value,
            owner_id=request.owner_id,
            column_name=f"backtest:{config.strategy.name}",
            script=definition,  # the exact thing that runs (config, and validation if any), as a calculation's script
            script_sha256=run_hash,
            symbols=list(config.symbols),
            symbols_sha256=symbols_sha256(config.symbols),
            data_sha256=stamp.sha256,
            data_version=stamp.version,
            start_date=config.start_date,
            end_date=config.end_date,
            params=config.strategy.params.model_dump(mode="json"),
            callback_url=request.callback_url,
            callback_state="pending" if request.callback_url else None,
        )
        run = BacktestRun(
            owner_id=request.owner_id,
            name=request.name,
            strategy=config.strategy.name,
            config=config.model_dump(mode="json"),
            config_hash=run_hash,
            data_sha256=stamp.sha256,
            validation=spec.model_dump(mode="json") if spec is not None else None,
            strategy_code=request.strategy_code,
        )
        return job, run

    return jobs.submit_once(
        factory, lambda session: find_run(session, request.owner_id, run_hash, stamp.sha256), build, shard_size,
        enqueue, on_write=on_write, max_active_per_owner=max_active_per_owner, events=events,
        tasks_first=[t.as_dict() for t in tasks],
    )  # fmt: skip
