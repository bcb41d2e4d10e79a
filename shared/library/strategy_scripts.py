"""User strategies written as sandboxed scripts: declared parameters, signals to engine events, and
backtests of a script strategy over many symbols.

A saved script of kind ``strategy`` declares its parameters (name -> type, default, bounds) and computes, inside
the same sandbox as calculations (shared/sandbox/runner.run_strategy), from the bars, ``params`` and ``ta``:

* ``entries`` and ``exits``: one bool per bar. Long-only: flat -> long on an entry, long -> flat on an exit
  (an entry wins on a bar with both while flat, an exit while long); or
* ``position``: one target in [-1, 1] per bar ([0, 1] unless ``execution.allow_short``). Its sign is the wanted
  side (> 0 long, < 0 short, 0 flat): an order is decided on each bar where the sign changes, and the target's
  magnitude on that bar scales the risk model's fraction for the entry (0.5: half of what the risk model would
  commit; Kelly sizing ignores it). The engine holds one position at a time and never rebalances, so a change
  of magnitude without a change of sign changes nothing.
* optionally ``warmup``: the first bar its signals mean anything (metrics' "Buy & Hold" starts there, as with a
  built-in strategy's indicator warm-up); signals before ``max(warmup, the risk model's first sizable bar)``
  (one bar later in the backtesting.py convention) are ignored.

A decision on bar ``t`` is filled by the engine's fill rule (``next_open`` by default: bar ``t + 1``), whatever
the script does. A script sees every bar of the range at once, so it *can* compute a signal at ``t`` from later
bars (``close[t + 1]``): the engine still fills it no earlier than its fill rule, but such a script profits from
the future all the same. Walk-forward evaluation and honest scripts are the defence; nothing here can tell.
"""

from __future__ import annotations

import re
import uuid
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
from numpy.typing import NDArray
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator
from sqlalchemy.orm import Session

from shared.domain.backtest import BacktestConfig, Bars
from shared.domain.backtest import risk as risk_models
from shared.domain.backtest.config import MAX_SCRIPT_PARAMETERS, PARAMETER_NAME, ScriptStrategySpec
from shared.domain.backtest.engine import BacktestResult, run_events
from shared.domain.backtest.strategies import FLAT, LONG, SHORT, state_events
from shared.errors import ValidationFailed
from shared.infra.config import SandboxLimits
from shared.infra.models import Script, ScriptVersion
from shared.infra.security import Incident
from shared.marketdata.bars import SymbolBars
from shared.sandbox.signals import ScriptSignals, StrategyOutcome

KIND_CALCULATION = "calculation"
KIND_STRATEGY = "strategy"
KINDS = (KIND_CALCULATION, KIND_STRATEGY)

# --- declared parameters ---------------------------------------------------------------------------------------


class ParameterDecl(BaseModel):
    """One declared parameter of a strategy script: its type, default and (for numbers) bounds."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    type: Literal["int", "float", "bool"]
    default: bool | int | float
    min: float | None = Field(default=None, allow_inf_nan=False)
    max: float | None = Field(default=None, allow_inf_nan=False)
    description: str = Field(default="", max_length=500)

    @model_validator(mode="after")
    def _consistent(self) -> ParameterDecl:
        if self.type == "bool":
            if self.min is not None or self.max is not None:
                raise ValueError("a bool parameter has no min or max")
        elif self.min is not None and self.max is not None and self.min > self.max:
            raise ValueError(f"min ({self.min}) is above max ({self.max})")
        problem = check_value(self, self.default)
        if problem:
            raise ValueError(f"default: {problem}")
        return self


class _Declarations(BaseModel):
    model_config = ConfigDict(extra="forbid")

    parameters: dict[str, ParameterDecl] = Field(default_factory=dict, max_length=MAX_SCRIPT_PARAMETERS)


def check_value(decl: ParameterDecl, value: object) -> str | None:
    """Why ``value`` does not fit ``decl`` (exact JSON types: no bool for a number, no float for an int)."""
    if decl.type == "bool":
        return None if type(value) is bool else f"must be true or false, not {_json_type(value)}"
    if decl.type == "int" and type(value) is not int:
        return f"must be an integer, not {_json_type(value)}"
    if decl.type == "float" and type(value) not in (int, float):
        return f"must be a number, not {_json_type(value)}"
    number = float(value)  # type: ignore[arg-type]
    if number != number or number in (float("inf"), float("-inf")):
        return "must be finite"
    if decl.min is not None and number < decl.min:
        return f"{value} is below the minimum {decl.min:g}"
    if decl.max is not None and number > decl.max:
        return f"{value} is above the maximum {decl.max:g}"
    return None


def _json_type(value: object) -> str:
    return {bool: "a boolean", int: "an integer", float: "a number", str: "a string", type(None): "null"}.get(
        type(value), type(value).__name__
    )


def check_declarations(raw: object, *, field: str = "parameters") -> dict[str, dict[str, Any]]:
    """A script's declared parameters, validated (422 naming ``parameters.<name>.<key>``), as stored JSON."""
    if raw is None:
        return {}
    if not isinstance(raw, dict):
        raise ValidationFailed.for_field(field, "must be an object of parameter name -> declaration")
    for name in raw:
        if not isinstance(name, str) or re.fullmatch(PARAMETER_NAME, name) is None:
            raise ValidationFailed.for_field(
                f"{field}.{str(name)[:40]}",
                "a parameter name is lower-case letters, digits and _, starting with a letter",
            )
    try:
        parsed = _Declarations.model_validate({"parameters": raw})
    except ValidationError as exc:
        first = exc.errors()[0]
        loc = ".".join(str(p) for p in first["loc"][1:] if p not in ("bool", "int", "float"))
        raise ValidationFailed.for_field(f"{field}.{loc}" if loc else field, first["msg"]) from None
    return {name: decl.model_dump(mode="json", exclude_none=True) for name, decl in parsed.parameters.items()}


def resolve_params(
    declared: Mapping[str, Any], given: Mapping[str, Any], *, field: str = "strategy.params"
) -> dict[str, Any]:
    """The parameter values a run uses: ``given`` checked against the declarations, defaults filled in; a 422
    naming ``strategy.params.<name>`` for an unknown name or a value of the wrong type or out of bounds."""
    decls = {name: ParameterDecl.model_validate(raw) for name, raw in declared.items()}
    for name in given:
        if name not in decls:
            known = ", ".join(sorted(decls)) or "none"
            raise ValidationFailed.for_field(f"{field}.{name}", f"unknown parameter (the script declares: {known})")
    values: dict[str, Any] = {}
    for name, decl in sorted(decls.items()):
        value = given.get(name, decl.default)
        problem = check_value(decl, value)
        if problem:
            raise ValidationFailed.for_field(f"{field}.{name}", problem)
        values[name] = float(value) if decl.type == "float" else value
    return values


# --- resolution at submission ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ResolvedScript:
    spec: ScriptStrategySpec  # version pinned, params complete
    code: str  # the exact text of that version


def resolve_strategy(session: Session, owner_id: str, spec: ScriptStrategySpec) -> ResolvedScript:
    """The owner's strategy script at the pinned version (the latest when none is given), its parameters
    validated. Someone else's script, or none, is a 422 naming ``strategy.script_id`` (no hint whether it
    exists); a calculation script too; an unknown version names ``strategy.version``."""
    script = session.get(Script, spec.script_id)
    if script is None or script.owner_id != owner_id:
        raise ValidationFailed.for_field("strategy.script_id", f"you have no script {spec.script_id}")
    if script.kind != KIND_STRATEGY:
        raise ValidationFailed.for_field(
            "strategy.script_id", f"script {script.name!r} is a calculation script, not a strategy (kind 'strategy')"
        )
    version = spec.version if spec.version is not None else script.version
    row = session.get(ScriptVersion, (script.id, version))
    if row is None:
        raise ValidationFailed.for_field(
            "strategy.version", f"script {script.name!r} has no version {version} (latest is {script.version})"
        )
    params = resolve_params(row.parameters or {}, spec.params.root)
    pinned = ScriptStrategySpec.model_validate(
        {"name": "script", "script_id": str(script.id), "version": version, "params": params}
    )
    return ResolvedScript(pinned, row.code)


def pin_for_run(session: Session, owner_id: str, config: BacktestConfig) -> tuple[BacktestConfig, str | None]:
    """A submitted config with its script strategy pinned (version, complete params) and that version's code;
    any other config unchanged, with no code."""
    if not isinstance(config.strategy, ScriptStrategySpec):
        return config, None
    resolved = resolve_strategy(session, owner_id, config.strategy)
    pinned = BacktestConfig.model_validate(
        {**config.model_dump(mode="json"), "strategy": resolved.spec.model_dump(mode="json")}
    )
    return pinned, resolved.code


# --- signals to engine events ----------------------------------------------------------------------------------


class SignalMappingError(ValueError):
    """The script's signals cannot run under the config (a short target without ``allow_short``)."""


@dataclass(frozen=True)
class ScriptEvents:
    """What the engine runs for one symbol: events, the metrics' warm-up, and the entries' size scale."""

    events: NDArray[np.int8]
    warmup: int
    entry_scale: NDArray[np.float64] | None


def decision_start(warmup: int, config: BacktestConfig) -> int:
    """First bar a decision counts: the script's warm-up (one later in the backtesting.py convention), no
    earlier than the risk model's first sizable bar, as for a built-in strategy."""
    offset = 1 if config.execution.convention == "backtesting_py" else 0
    return max(warmup + offset, risk_models.first_sizable_bar(config.risk.params))


def position_events(position: NDArray[np.float64], start: int) -> NDArray[np.int8]:
    """An event on each bar from ``start`` on where the target's sign differs from the previous bar's (flat
    before ``start``): LONG, SHORT or FLAT."""
    n = len(position)
    side = np.sign(position).astype(np.int8)
    side[: min(start, n)] = 0
    previous = np.concatenate([[0], side[:-1]]).astype(np.int8) if n else side
    changed = (side != previous) & (np.arange(n) >= start)
    events = np.zeros(n, dtype=np.int8)
    events[changed & (side > 0)] = LONG
    events[changed & (side < 0)] = SHORT
    events[changed & (side == 0)] = FLAT
    return events


def script_events(signals: ScriptSignals, config: BacktestConfig) -> ScriptEvents:
    start = decision_start(signals.warmup, config)
    first_trading_bar = max(signals.warmup, risk_models.first_sizable_bar(config.risk.params))
    if signals.position is not None:
        negative = np.flatnonzero(signals.position < 0)
        if len(negative) and not config.execution.allow_short:
            t = int(negative[0])
            raise SignalMappingError(
                f"position[{t}] is {signals.position[t]:g}: a short target needs execution.allow_short "
                "(without it a target position is between 0 and 1)"
            )
        events = position_events(signals.position, start)
        return ScriptEvents(events, first_trading_bar, np.abs(signals.position))
    assert signals.entries is not None and signals.exits is not None
    never = np.zeros(signals.n, dtype=np.bool_)
    events = state_events(signals.entries, never, signals.exits, never, start)
    return ScriptEvents(events, first_trading_bar, None)


def backtest_signals(bars: Bars, signals: ScriptSignals, config: BacktestConfig) -> BacktestResult:
    """The engine over ``bars`` (already cut to the config's range) with a script's signals."""
    ev = script_events(signals, config)
    return run_events(bars, ev.events, config, warmup=ev.warmup, entry_scale=ev.entry_scale)


# --- the sandbox ------------------------------------------------------------------------------------------------

StrategyRunner = Callable[[str, dict[str, Any], Sequence[SymbolBars], SandboxLimits], Sequence[StrategyOutcome]]
"""Runs a strategy script over bars in the sandbox (shared/sandbox/runner.run_strategy)."""


def default_runner() -> StrategyRunner:
    from shared.sandbox.runner import run_strategy  # the process layer lives with the worker

    return run_strategy


def sandbox_bars(symbol: str, bars: Bars) -> SymbolBars:
    """Engine bars as the sandbox takes them (the same series a calculation script sees)."""
    return SymbolBars.from_dates(
        symbol, bars.dates, bars.open, bars.high, bars.low, bars.close, bars.volume, timeframe=bars.timeframe
    )


def script_signals(
    code: str,
    params: Mapping[str, Any],
    bars_by_symbol: Mapping[str, Bars],
    limits: SandboxLimits,
    *,
    runner: StrategyRunner | None = None,
) -> dict[str, StrategyOutcome]:
    """The script's signals for each symbol: ONE sandbox process for all of them (a fresh one after a symbol
    that killed it), fresh globals per symbol. Keyed by symbol, in the given order."""
    outcomes = signals_in_order(code, params, list(bars_by_symbol.items()), limits, runner=runner)
    return {symbol: o for symbol, o in zip(bars_by_symbol, outcomes, strict=True)}


def signals_in_order(
    code: str,
    params: Mapping[str, Any],
    items: Sequence[tuple[str, Bars]],
    limits: SandboxLimits,
    *,
    runner: StrategyRunner | None = None,
) -> list[StrategyOutcome]:
    """:func:`script_signals` over (symbol, bars) pairs that may repeat a symbol; one outcome per pair."""
    run = runner or default_runner()
    outcomes = list(run(code, dict(params), [sandbox_bars(symbol, bars) for symbol, bars in items], limits))
    if len(outcomes) != len(items):
        raise RuntimeError(f"the sandbox answered {len(outcomes)} of {len(items)} symbols")
    return outcomes


@dataclass(frozen=True)
class SymbolError:
    """Why a symbol has no events: ``{type, message, line}`` and what the sandbox rejected on the way."""

    error: dict[str, Any]
    incidents: tuple[Incident, ...] = ()


def strategy_events(
    code: str,
    params: Mapping[str, Any],
    bars_by_symbol: Mapping[str, Bars],
    limits: SandboxLimits,
    config: BacktestConfig,
    *,
    runner: StrategyRunner | None = None,
) -> dict[str, ScriptEvents | SymbolError]:
    """A script strategy's engine events for one parameter set over each symbol's bars (cut to the range the
    caller backtests), or that symbol's error. What optimisation calls per parameter set:
    ``run_events(bars, e.events, config, warmup=e.warmup, entry_scale=e.entry_scale)`` backtests it."""
    out: dict[str, ScriptEvents | SymbolError] = {}
    for symbol, outcome in script_signals(code, params, bars_by_symbol, limits, runner=runner).items():
        out[symbol] = signal_events_or_error(outcome, config)
    return out


def signal_events_or_error(outcome: StrategyOutcome, config: BacktestConfig) -> ScriptEvents | SymbolError:
    if outcome.signals is None:
        assert outcome.error is not None
        return SymbolError(outcome.error, outcome.incidents)
    try:
        return script_events(outcome.signals, config)
    except SignalMappingError as exc:
        return SymbolError({"type": "SignalError", "message": str(exc), "line": None}, outcome.incidents)


@dataclass(frozen=True)
class SymbolBacktest:
    """One symbol of a script strategy: its result, or its error; plus the sandbox's incidents."""

    symbol: str
    result: BacktestResult | None
    error: dict[str, Any] | None
    incidents: tuple[Incident, ...] = ()


def backtest_script(
    code: str,
    params: Mapping[str, Any],
    bars_by_symbol: Mapping[str, Bars],
    config: BacktestConfig,
    limits: SandboxLimits,
    *,
    runner: StrategyRunner | None = None,
) -> list[SymbolBacktest]:
    """Backtest a script strategy over symbols whose bars are already cut to the config's range: the sandbox
    once for all of them, then the engine per symbol."""
    out = []
    for symbol, outcome in script_signals(code, params, bars_by_symbol, limits, runner=runner).items():
        mapped = signal_events_or_error(outcome, config)
        if isinstance(mapped, SymbolError):
            out.append(SymbolBacktest(symbol, None, mapped.error, mapped.incidents))
            continue
        result = run_events(
            bars_by_symbol[symbol], mapped.events, config, warmup=mapped.warmup, entry_scale=mapped.entry_scale
        )
        out.append(SymbolBacktest(symbol, result, None, outcome.incidents))
    return out


class ScriptBacktester:
    """Backtests several symbols' bars with a script strategy, for validation (``shared.domain.robustness``): the
    sandbox once per call for all the bars given. Signals of bars passed with ``keep=True`` (a run's baseline
    sleeves) are kept, so re-running those bars under other costs (Monte Carlo) needs no sandbox: a script's
    signals depend on bars and params only."""

    def __init__(
        self, code: str, params: Mapping[str, Any], limits: SandboxLimits, runner: StrategyRunner | None = None
    ) -> None:
        self.code = code
        self.params = dict(params)
        self.limits = limits
        self.runner = runner
        self._kept: dict[int, tuple[Bars, ScriptSignals]] = {}

    def __call__(
        self, symbols: Sequence[str], bars: Sequence[Bars], config: BacktestConfig, keep: bool = False
    ) -> list[BacktestResult | None]:
        """One result per bars (None: the script failed on them or its signals cannot run under ``config``)."""
        missing = [i for i, b in enumerate(bars) if id(b) not in self._kept or self._kept[id(b)][0] is not b]
        found: dict[int, ScriptSignals | None] = {}
        if missing:
            items = [(symbols[i], bars[i]) for i in missing]
            outcomes = signals_in_order(self.code, self.params, items, self.limits, runner=self.runner)
            for i, outcome in zip(missing, outcomes, strict=True):
                signals = outcome.signals
                found[i] = signals
                if keep and signals is not None:
                    self._kept[id(bars[i])] = (bars[i], signals)
        results: list[BacktestResult | None] = []
        for i, b in enumerate(bars):
            signals = found[i] if i in found else self._kept[id(b)][1]
            if signals is None:
                results.append(None)
                continue
            try:
                results.append(backtest_signals(b, signals, config))
            except SignalMappingError:
                results.append(None)
        return results


def script_id_of(config: BacktestConfig) -> uuid.UUID | None:
    return config.strategy.script_id if isinstance(config.strategy, ScriptStrategySpec) else None
