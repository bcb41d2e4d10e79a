"""Submitting an optimisation: pin a script strategy, check the spec against the bounds, plan its slices (and
walk-forward windows), and write the job with its optimisation through the pipeline's idempotent skeleton
(``pipeline.submit_once``): the owner's optimisation of the same spec hash is returned as it is."""

from __future__ import annotations

import datetime as dt
import uuid
from typing import Any

import numpy as np
from sqlalchemy.orm import Session, sessionmaker

from shared.domain.backtest import BacktestConfig
from shared.domain.backtest.config import ScriptStrategySpec
from shared.domain.search.plan import GRID_MIN_SLICE_COMBOS, WindowDates, plan, window_dates
from shared.domain.search.spec import OptimizationSpec
from shared.errors import ValidationFailed
from shared.infra.events import JobEvents
from shared.infra.models import Job, JobKind, Optimization, ScriptVersion
from shared.jobs import pipeline as jobs
from shared.jobs.backtests import submit as runs
from shared.jobs.calculations import symbols_sha256
from shared.jobs.optimizations import read
from shared.jobs.optimizations.spec import Limits, OptimizationRequest, check
from shared.library import strategy_scripts
from shared.marketdata.bars import DEFAULT_BATCH_BARS, batches, data_stamp, load_bars


def _calendar(session: Session, config: BacktestConfig) -> list[dt.date]:
    """Every date on which one of the config's symbols has a bar in its range (read a batch at a time)."""
    conn = session.connection()
    days = np.empty(0, "datetime64[D]")
    for group in batches(
        conn, config.symbols, config.timeframe, DEFAULT_BATCH_BARS, config.start_date, config.end_date
    ):
        bars = load_bars(conn, group, config.start_date, config.end_date, timeframe=config.timeframe)
        days = np.unique(np.concatenate([days, *(b.days for b in bars.values())]))
    return days.astype(dt.date).tolist()


def submit(
    factory: sessionmaker[Session],
    request: OptimizationRequest,
    limits: Limits,
    *,
    enqueue: jobs.Enqueue,
    max_active_per_owner: int | None = None,
    on_write: jobs.OnWrite | None = None,
    events: JobEvents | None = None,
) -> jobs.Submitted[Optimization]:
    """The owner's optimisation of this exact spec, or a new job: one shard per slice (and window). A script
    strategy is pinned first (version, complete params: ``strategy_scripts.pin_for_run``), so the hash names the
    exact code, and its code and declared parameters are kept with the optimisation."""
    spec = request.spec
    code: str | None = None
    declared: dict[str, Any] | None = None
    script_ref: tuple[uuid.UUID, int] | None = None
    if isinstance(spec.config.strategy, ScriptStrategySpec):
        with factory() as session:
            pinned, code = strategy_scripts.pin_for_run(session, request.owner_id, spec.config)
            assert isinstance(pinned.strategy, ScriptStrategySpec) and pinned.strategy.version is not None
            script_ref = (pinned.strategy.script_id, pinned.strategy.version)
            version = session.get(ScriptVersion, script_ref)
            declared = dict(version.parameters or {}) if version is not None else {}
        spec = spec.model_copy(update={"config": pinned})
        spec = OptimizationSpec.model_validate(spec.model_dump(mode="json"))
    spec_hash = spec.spec_hash
    tasks_first: list[dict[str, Any]] = []  # the slices, planned by ``build`` before ``submit_once`` writes them
    with factory() as session:
        stamp = data_stamp(session.connection(), spec.config.symbols, spec.config.timeframe)

    def build(session: Session) -> tuple[Job, Optimization]:
        session.commit()  # end the find's read transaction: the combos are CPU work, no connection waits on them
        c = check(spec, limits, declared)
        config = spec.config
        windows: list[WindowDates] | None = None
        runs.check_symbols(session, config)
        runs.check_portfolio_bars(session, config, limits.max_bars, "symbols", "an optimisation")
        if spec.walk_forward is not None:
            calendar = _calendar(session, config)
            windows = window_dates(calendar, spec.walk_forward)
            if not windows:
                need = spec.walk_forward.in_sample + 1
                raise ValidationFailed.for_field(
                    "walk_forward.in_sample",
                    f"the date range has {len(calendar):,} bar dates; one window needs more than {need - 1:,}",
                )
        backtests = len(c) * len(config.symbols) * (len(windows) if windows else 1)
        if backtests > limits.max_backtests:
            raise ValidationFailed.for_field(
                "parameters",
                f"{backtests:,} backtests (combos x symbols x windows); at most {limits.max_backtests:,} "
                "(ALPHAFORGE_MAX_OPTIMIZATION_BACKTESTS)",
            )
        n_symbols = len(config.symbols)
        if code is not None:
            tasks = plan(len(c), n_symbols, max(1, limits.script_slice_combos) * n_symbols, windows)
        else:
            grid = config.strategy.name == "dual_sma"
            tasks = plan(len(c), n_symbols, limits.slice_backtests, windows, GRID_MIN_SLICE_COMBOS if grid else 1)
        tasks_first.extend(t.as_dict() for t in tasks)
        job = Job(
            kind=JobKind.OPTIMIZATION.value,
            owner_id=request.owner_id,
            column_name=f"optimization:{config.strategy.name}",
            script=spec.canonical_json(),
            script_sha256=spec_hash,
            symbols=list(config.symbols),
            symbols_sha256=symbols_sha256(config.symbols),
            data_sha256=stamp.sha256,
            data_version=stamp.version,
            start_date=config.start_date,
            end_date=config.end_date,
            params={"parameters": list(c.names), "combos": len(c)},
            script_id=script_ref[0] if script_ref else None,
            script_version=script_ref[1] if script_ref else None,
            callback_url=request.callback_url,
            callback_state="pending" if request.callback_url else None,
        )
        opt = Optimization(
            strategy_code=code,
            script_parameters=declared,
            owner_id=request.owner_id,
            name=request.name,
            strategy=config.strategy.name,
            spec=spec.model_dump(mode="json"),
            spec_hash=spec_hash,
            data_sha256=stamp.sha256,
            combos=len(c),
        )
        return job, opt

    return jobs.submit_once(
        factory,
        lambda session: read.find(session, request.owner_id, spec_hash, stamp.sha256),
        build,
        max(1, len(spec.config.symbols)),
        enqueue,
        on_write=on_write,
        max_active_per_owner=max_active_per_owner,
        events=events,
        tasks_first=tasks_first,
        shard_symbols=False,
    )
