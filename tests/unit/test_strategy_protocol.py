"""Strategy scripts through a real sandbox process: the child's checks, the packed wire format, the parent's
re-checks of everything it receives, and the mapping of signals onto the engine's events."""

from __future__ import annotations

import base64
import datetime as dt
import json

import numpy as np
import pytest

from shared.domain.backtest import BacktestConfig, Bars, run_backtest
from shared.domain.backtest.strategies import FLAT, LONG, SHORT
from shared.errors import ValidationFailed
from shared.infra.config import SandboxLimits
from shared.library.strategy_scripts import (
    ScriptEvents,
    SymbolError,
    backtest_script,
    check_declarations,
    position_events,
    resolve_params,
    sandbox_bars,
    strategy_events,
)
from shared.sandbox.runner import _ChildFault, checked_signals, run_strategy, signals_line_cap
from shared.sandbox.signals import StrategyOutcome
from shared.sandbox.strategy_output import pack_bits

LIMITS = SandboxLimits(symbol_timeout_s=5.0, memory_mb=512)

DUAL_SMA = """
import ta
fast = ta.sma(close, params['fast'])
slow = ta.sma(close, params['slow'])
entries = ta.crossover(fast, slow)
exits = ta.crossunder(fast, slow)
warmup = params['slow'] - 1
"""


def make_bars(n: int, seed: int = 3) -> Bars:
    rng = np.random.default_rng(seed)
    close = 100 * np.exp(np.cumsum(rng.normal(0, 0.02, n)))
    open_ = close * (1 + rng.normal(0, 0.003, n))
    start = dt.date(2015, 1, 1)
    return Bars.from_arrays(
        open=open_, high=np.maximum(open_, close) * 1.01, low=np.minimum(open_, close) * 0.99, close=close,
        volume=np.full(n, 1e6), dates=[start + dt.timedelta(days=i) for i in range(n)],
    )  # fmt: skip


def config(**strategy: object) -> BacktestConfig:
    return BacktestConfig.model_validate({"symbols": ["AAA"], "strategy": strategy or {"name": "buy_and_hold"}})


def signals(script: str, n: int = 300, params: dict[str, object] | None = None) -> StrategyOutcome:
    (outcome,) = run_strategy(script, params or {}, [sandbox_bars("AAA", make_bars(n))], LIMITS)
    return outcome


def test_entries_and_exits_arrive_packed_and_equal_to_the_script_s_tuples() -> None:
    bars = make_bars(300)
    outcome = signals(DUAL_SMA, params={"fast": 5, "slow": 20})
    assert outcome.error is None and outcome.signals is not None
    s = outcome.signals
    assert s.n == 300 and s.warmup == 19 and s.position is None
    assert s.entries is not None and s.exits is not None and s.entries.dtype == np.bool_
    from shared.domain.indicators import engine as indicators

    fast, slow = indicators.sma(bars.close, 5), indicators.sma(bars.close, 20)
    with np.errstate(invalid="ignore"):
        up = np.concatenate([[False], (fast[:-1] < slow[:-1]) & (fast[1:] > slow[1:])])
    assert s.entries.tolist() == up.tolist() and s.entries.any() and s.exits.any()


def test_script_dual_sma_gives_the_built_in_trades_and_metrics() -> None:
    bars = make_bars(600)
    cfg = config(name="dual_sma", params={"fast": 7, "slow": 30})
    (got,) = backtest_script(DUAL_SMA, {"fast": 7, "slow": 30}, {"AAA": bars}, cfg, LIMITS)
    want = run_backtest(bars, cfg)
    assert got.error is None and got.result is not None
    assert got.result.trades.to_records() == want.trades.to_records() and len(want.trades) > 3
    assert json.dumps(got.result.metrics, default=str) == json.dumps(want.metrics, default=str)


def test_a_position_series_goes_long_and_short_like_the_built_in_with_shorting() -> None:
    script = DUAL_SMA + (
        "position = []\nside = 0.0\nfor up, down in zip(entries, exits):\n"
        "    side = 1.0 if up else (-1.0 if down else side)\n    position.append(side)\n"
        "del entries, exits\n"
    )
    bars = make_bars(600, seed=5)
    cfg = BacktestConfig.model_validate({"symbols": ["AAA"], "strategy": {"name": "dual_sma", "params": {"fast": 5,
                                         "slow": 25}}, "execution": {"allow_short": True}})  # fmt: skip
    (got,) = backtest_script(script, {"fast": 5, "slow": 25}, {"AAA": bars}, cfg, LIMITS)
    want = run_backtest(bars, cfg)
    assert got.error is None and got.result is not None
    assert got.result.trades.to_records() == want.trades.to_records()
    assert (want.trades.size < 0).any()


def test_a_short_target_without_allow_short_is_the_symbol_s_error() -> None:
    out = strategy_events("position = [-0.5] * len(close)", {}, {"AAA": make_bars(50)}, LIMITS, config())
    error = out["AAA"]
    assert isinstance(error, SymbolError) and "allow_short" in error.error["message"]


def test_a_target_s_magnitude_scales_the_entry() -> None:
    bars = make_bars(100)
    half = backtest_script("position = [0.5] * len(close)", {}, {"AAA": bars}, config(), LIMITS)[0].result
    full = backtest_script("position = [1] * len(close)", {}, {"AAA": bars}, config(), LIMITS)[0].result
    assert half is not None and full is not None
    assert half.trades.size.tolist() == [] and full.open_position is not None and half.open_position is not None
    assert half.open_position.size == pytest.approx(full.open_position.size / 2, abs=1.0)


def test_position_events_on_sign_changes_only() -> None:
    events = position_events(np.array([0.0, 0.5, 1.0, -1.0, -0.2, 0.0, 0.3]), start=1)
    assert events.tolist() == [0, LONG, 0, SHORT, 0, FLAT, LONG]
    assert position_events(np.array([1.0, 1.0, 1.0]), start=2).tolist() == [0, 0, LONG]


@pytest.mark.parametrize(
    ("script", "message"),
    [
        ("entries = (True,) * (len(close) - 1)\nexits = (False,) * len(close)",
         "entries has 2,519 values; expected 2,520 (one per bar)"),
        ("entries = [False] * len(close)\nexits = (0,) * len(close)", "exits[0] is int, not bool"),
        ("entries = tuple(c > 100 for c in close)\nexits = entries[:-1] + (1.0,)", "exits[2519] is float"),
        ("entries = 'yes'\nexits = ()", "entries must be a tuple (or list) of booleans, one per bar, not str"),
        ("entries = {True: 1}\nexits = ()", "not dict"),
        ("entries = [False] * len(close)", "assigned `entries` but not `exits`"),
        ("result = 1.0", "assigned neither `entries` and `exits` nor `position`"),
        ("position = [0.0] * len(close)\nentries = []", "not both"),
        ("position = [float('nan')] * len(close)", "position[0] is nan"),
        ("position = [2] * len(close)", "between -1 and 1"),
        ("position = [True] * len(close)", "position[0] is bool, not a number"),
        ("position = [10**400] * len(close)", "position[0] is too large"),
        ("position = [0.0] * len(close)\nwarmup = 2520", "warmup is 2,520"),
        ("position = [0.0] * len(close)\nwarmup = 1.0", "warmup must be an int"),
        ("import ta\nentries = ta.sma(close, 3)\nexits = entries", "booleans, one per bar, not Series"),
        ("entries = map(bool, close)\nexits = entries", "not map"),
    ],
)  # fmt: skip
def test_wrong_series_are_the_symbol_s_error_naming_the_problem(script: str, message: str) -> None:
    outcome = signals(script, n=2520)
    assert outcome.signals is None and outcome.error is not None
    assert outcome.error["type"] == "SignalError" and message in outcome.error["message"], outcome.error
    assert [(i.layer, i.reason) for i in outcome.incidents] == [("result", "invalid_signals")]


def test_thousands_of_bars_of_positions_fit_the_output_cap() -> None:
    n = 20_000
    outcome = signals("position = [((i % 7) - 3) / 3 for i in range(len(close))]", n=n)
    assert outcome.error is None and outcome.signals is not None and outcome.signals.position is not None
    assert outcome.signals.position.tolist() == [((i % 7) - 3) / 3 for i in range(n)]
    assert signals_line_cap(n, LIMITS) > LIMITS.max_output_line_bytes


def test_a_script_still_sees_its_bars_and_params_and_symbol() -> None:
    script = "ok = symbol == 'AAA' and len(dates) == len(close) and params['k'] is True\n" \
             "entries = [ok] * len(close)\nexits = [False] * len(close)"  # fmt: skip
    outcome = signals(script, n=10, params={"k": True})
    assert outcome.signals is not None and outcome.signals.entries is not None and outcome.signals.entries.all()


# --- the parent trusts nothing ------------------------------------------------------------------------------


def _b64(raw: bytes) -> str:
    return base64.b64encode(raw).decode()


def test_the_parent_decodes_the_child_s_packing() -> None:
    values = [i % 3 == 0 for i in range(21)]
    got = checked_signals({"n": 21, "warmup": 0, "entries": pack_bits(values), "exits": pack_bits([False] * 21)}, 21)
    assert got.entries is not None and got.entries.tolist() == values


@pytest.mark.parametrize(
    "raw",
    [
        None,
        [],
        {"n": 10, "warmup": 0},
        {"n": 9, "warmup": 0, "entries": pack_bits([True] * 9), "exits": pack_bits([True] * 9)},
        {"n": 10.0, "warmup": 0, "entries": pack_bits([True] * 10), "exits": pack_bits([True] * 10)},
        {"n": 10, "warmup": True, "entries": pack_bits([True] * 10), "exits": pack_bits([True] * 10)},
        {"n": 10, "warmup": 10, "entries": pack_bits([True] * 10), "exits": pack_bits([True] * 10)},
        {"n": 10, "warmup": 0, "entries": pack_bits([True] * 16), "exits": pack_bits([True] * 10)},  # padding set
        {"n": 10, "warmup": 0, "entries": pack_bits([True] * 24), "exits": pack_bits([True] * 10)},  # too long
        {"n": 10, "warmup": 0, "entries": "!!!!", "exits": pack_bits([True] * 10)},
        {"n": 10, "warmup": 0, "entries": [1] * 10, "exits": pack_bits([True] * 10)},
        {"n": 10, "warmup": 0, "entries": pack_bits([True] * 10), "exits": pack_bits([True] * 10), "x": 1},
        {"n": 10, "warmup": 0, "position": _b64(np.full(10, np.nan).astype("<f8").tobytes())},
        {"n": 10, "warmup": 0, "position": _b64(np.full(10, 1.5).astype("<f8").tobytes())},
        {"n": 10, "warmup": 0, "position": _b64(np.zeros(9).astype("<f8").tobytes())},
        {"n": 10, "warmup": 0, "position": _b64(np.zeros(10).astype("<f8").tobytes()), "entries": ""},
    ],
)
def test_the_parent_rejects_any_malformed_answer(raw: object) -> None:
    with pytest.raises(_ChildFault):
        checked_signals(raw, 10)


# --- declared parameters -----------------------------------------------------------------------------------


def test_declarations_and_resolution() -> None:
    declared = check_declarations(
        {"fast": {"type": "int", "default": 10, "min": 2, "max": 200}, "k": {"type": "float", "default": 1},
         "short": {"type": "bool", "default": False}}
    )  # fmt: skip
    assert resolve_params(declared, {"fast": 20}) == {"fast": 20, "k": 1.0, "short": False}
    cases: list[tuple[dict[str, object], str]] = [
        ({"slowest": 1}, "strategy.params.slowest"), ({"fast": 1}, "strategy.params.fast"),
                         ({"fast": 2.5}, "strategy.params.fast"), ({"fast": True}, "strategy.params.fast"),
                         ({"short": 1}, "strategy.params.short"), ({"k": "1"}, "strategy.params.k")]  # fmt: skip
    for given, field in cases:
        with pytest.raises(ValidationFailed) as info:
            resolve_params(declared, given)
        assert info.value.details["errors"][0]["field"] == field
    for raw, field in [({"Fast": {"type": "int", "default": 1}}, "parameters.Fast"),
                       ({"a": {"type": "int", "default": 1.5}}, "parameters.a"),
                       ({"a": {"type": "int", "default": 1, "min": 5}}, "parameters.a"),
                       ({"a": {"type": "str", "default": "x"}}, "parameters.a.type"),
                       ([], "parameters")]:  # fmt: skip
        with pytest.raises(ValidationFailed) as info:
            check_declarations(raw)
        assert info.value.details["errors"][0]["field"] == field, info.value.details


def test_strategy_events_for_one_parameter_set() -> None:
    bars = {"AAA": make_bars(200), "BBB": make_bars(200, seed=9)}
    out = strategy_events(DUAL_SMA, {"fast": 3, "slow": 12}, bars, LIMITS, config())
    assert set(out) == {"AAA", "BBB"}
    for events in out.values():
        assert isinstance(events, ScriptEvents) and events.warmup == 11 and events.events.shape == (200,)
