"""Validation methods: seeds derive from (seed, method, task[, symbol position]), so the numbers do not depend on
the process count; the run is validated as one portfolio of equal-cash sleeves."""

from __future__ import annotations

import itertools
import multiprocessing
from concurrent.futures import ProcessPoolExecutor
from typing import Any

import numpy as np
import pytest

from shared.domain import robustness as v
from shared.domain.backtest import BacktestConfig, Bars, run_backtest
from shared.domain.backtest.grid import run_dual_sma_grid


def make_bars(n: int = 900, seed: int = 3) -> Bars:
    rng = np.random.default_rng(seed)
    close = 50 * np.exp(np.cumsum(rng.normal(0.0004, 0.015, n)))
    open_ = close * (1 + rng.normal(0, 0.003, n))
    return Bars.from_arrays(
        open=open_, high=np.maximum(open_, close) * 1.004, low=np.minimum(open_, close) * 0.996, close=close,
        volume=rng.integers(1_000, 100_000, n).astype(float),
        dates=np.datetime64("2020-01-01") + np.arange(n),
    )  # fmt: skip


BARS = make_bars()
SYMBOLS = {"AAA": make_bars(700, 4), "BBB": make_bars(900, 5), "CCC": make_bars(500, 6)}


def config_for(symbols: list[str], **changes: Any) -> BacktestConfig:
    body: dict[str, Any] = {
        "symbols": symbols,
        "strategy": {"name": "dual_sma", "params": {"fast": 10, "slow": 40}},
        "execution": {"fee_bps": 2},
        "seed": 11,
    }
    return BacktestConfig.model_validate(body | changes)


CONFIG = config_for(["X"])
PORTFOLIO = config_for(["AAA", "NONE", "BBB", "CCC"])  # NONE has no bars: it is no sleeve, CCC keeps position 3
SPEC = v.ValidationSpec.model_validate(
    {"permutation": {"n": 12}, "bootstrap": {"n": 40, "block": 10, "chunk": 5},
     "monte_carlo": {"n": 10, "fee_bps_sigma": 10},
     "walk_forward": {"in_sample": 200, "out_of_sample": 100, "fast": [5, 10], "slow": [30, 60], "chunk": 3},
     "chunk": 5}
)  # fmt: skip


def one_task(args: tuple[dict[str, Any], int]) -> v.Part:
    raw, seed = args
    task = v.Task.from_dict(raw)
    return v.run_task(v.sleeves(SYMBOLS, PORTFOLIO), SPEC, seed, task)


def all_parts(seed: int, processes: int | None) -> list[v.Part]:
    plan = [(t.as_dict(), seed) for t in v.plan(SPEC, len(PORTFOLIO.symbols))]
    if processes is None:
        return [one_task(p) for p in plan]
    # spawn, not fork: a fork of a process with threads (a test session's clients) can inherit a held lock
    with ProcessPoolExecutor(max_workers=processes, mp_context=multiprocessing.get_context("spawn")) as pool:
        return list(pool.map(one_task, plan))


def test_task_plan_covers_every_draw() -> None:
    assert v.task_plan(23, 5) == [(0, 5), (1, 5), (2, 5), (3, 5), (4, 3)]
    assert sum(d for _, d in v.task_plan(1000, 7)) == 1000
    tasks = v.plan(SPEC, 4)
    assert [(t.method, t.task_index, t.draws) for t in tasks] == [
        ("permutation", 0, 5), ("permutation", 1, 5), ("permutation", 2, 2),
        ("monte_carlo", 0, 5), ("monte_carlo", 1, 5),
        *(("bootstrap", k, 5) for k in range(8)),
        ("walk_forward", 0, 3), ("walk_forward", 1, 1),
    ]  # fmt: skip
    assert tasks[0].work == 4 + 5 * 4 and tasks[-2].work == 3 * (1 + 4)
    assert v.plan(v.ValidationSpec(), 10) == []


def test_parts_are_the_same_in_one_or_two_processes_and_combine_in_task_order() -> None:
    inline = all_parts(11, None)
    one = all_parts(11, 1)
    two = all_parts(11, 2)
    for a, b, c in zip(inline, one, two, strict=True):
        assert a.values.tobytes() == b.values.tobytes() == c.values.tobytes()  # bit for bit
        assert a.detail == b.detail == c.detail
    planned = v.plan(SPEC, 4)
    result = v.combine(SPEC, 11, planned, inline)
    assert v.combine(SPEC, 11, planned, list(reversed(two))) == result  # the order parts arrive in is irrelevant
    assert result == v.validate_in_process(SYMBOLS, PORTFOLIO, SPEC)
    perm = result["methods"]["permutation"]
    assert perm["complete"] and perm["draws"] == 12 and perm["tasks_done"] == 3 and perm["seed"] == 11
    assert len(set(np.concatenate([p.values for p in inline if p.method == "permutation"]).tolist())) > 8
    assert all_parts(12, None)[0].values.tobytes() != inline[0].values.tobytes()  # the draws depend on the seed
    # A permutation task's stream depends on its index, not on the tasks before it.
    s = v.sleeves(SYMBOLS, PORTFOLIO)
    assert list(v.permutation_draws(s, 11, 1, 5)) == inline[1].values.tolist()
    mc = result["methods"]["monte_carlo"]
    assert mc["baseline_final_equity"] == pytest.approx(sum(float(run_backtest(b, PORTFOLIO).equity[-1])
                                                            for b in SYMBOLS.values()), rel=1e-12)  # fmt: skip
    wf = result["methods"]["walk_forward"]
    assert list(wf["symbols"]) == ["AAA", "BBB", "CCC"] and wf["complete"]
    own = [wf["symbols"][s]["out_of_sample_return_pct"] for s in ("AAA", "BBB", "CCC")]
    assert wf["portfolio_out_of_sample_return_pct"] == pytest.approx(np.mean(own), rel=1e-12)
    boot = result["methods"]["bootstrap"]["intervals"]
    for interval in boot.values():
        assert interval["low"] <= interval["high"]


def test_a_missing_part_is_reported_not_hidden() -> None:
    parts = all_parts(11, None)
    planned = v.plan(SPEC, 4)
    cut = [p for p in parts if not (p.method == "permutation" and p.task_index == 1)]
    perm = v.combine(SPEC, 11, planned, cut)["methods"]["permutation"]
    assert perm["draws"] == 7 and perm["draws_planned"] == 12 and perm["tasks_done"] == 2 and not perm["complete"]
    assert perm["p_value"] > 0
    none = v.combine(SPEC, 11, planned, [])["methods"]["monte_carlo"]
    assert none["draws"] == 0 and not none["complete"] and none["params"]["n"] == 10


def test_no_sleeves_is_no_draws_not_an_error() -> None:
    empty = v.sleeves({}, PORTFOLIO)
    planned = v.plan(SPEC, 4)
    result = v.combine(SPEC, 11, planned, [v.run_task(empty, SPEC, 11, t) for t in planned])
    assert all(block["draws"] == (4 if m == "walk_forward" else 0) for m, block in result["methods"].items())
    assert not result["methods"]["permutation"]["complete"]


def test_sleeve_streams_follow_the_symbol_position() -> None:
    """Each symbol's permutation comes from (seed, method, task, its position in the config): the same symbol at
    the same position permutes the same way whatever the other symbols are."""
    s = v.sleeves(SYMBOLS, PORTFOLIO)
    assert s.symbols == ("AAA", "BBB", "CCC") and s.positions == (0, 2, 3)
    alone = v.sleeves(SYMBOLS, config_for(["AAA"]))
    first = v.permuted_bars(s.bars[0], v.sleeve_rng(11, "permutation", 0, 0))
    again = v.permuted_bars(alone.bars[0], v.sleeve_rng(11, "permutation", 0, 0))
    np.testing.assert_array_equal(first.close, again.close)


def test_one_symbol_is_that_symbol() -> None:
    s = v.sleeves({"X": BARS}, CONFIG)
    result = run_backtest(BARS, CONFIG)
    np.testing.assert_array_equal(s.total(), result.equity)
    returns = v.portfolio_returns(s.total(), CONFIG.initial_cash)
    np.testing.assert_array_equal(returns[1:], v.daily_returns(result.equity))


def test_permuted_bars_keep_the_returns_and_the_end_price() -> None:
    permuted = v.permuted_bars(BARS, v.task_rng(1, "permutation", 0))
    original = np.sort(np.diff(np.log(BARS.close)))
    np.testing.assert_allclose(np.sort(np.diff(np.log(permuted.close))), original, rtol=0, atol=1e-12)
    assert permuted.close[-1] == pytest.approx(BARS.close[-1], rel=1e-12)
    assert not np.array_equal(permuted.close, BARS.close)
    assert (permuted.high >= permuted.low).all()


def test_permutation_p_value() -> None:
    result = v.permutation_result(1.0, [0.5, 1.5, 2.0, -1.0], v.PermutationSpec(n=10), seed=4)
    assert result["p_value"] == (1 + 2) / (1 + 4) and result["seed"] == 4 and result["params"] == {"n": 10}
    nan = v.permutation_result(float("nan"), [0.5, -np.inf], v.PermutationSpec(n=10), seed=4)
    assert nan["p_value"] == 1.0 and nan["observed_sharpe"] is None


def test_bootstrap_is_deterministic_and_a_whole_block_is_a_rotation() -> None:
    returns = v.daily_returns(run_backtest(BARS, CONFIG).equity)
    first = v.bootstrap_task(returns, 20, 5, 0, 30) + v.bootstrap_task(returns, 20, 5, 1, 30)
    assert first == v.bootstrap_task(returns, 20, 5, 0, 30) + v.bootstrap_task(returns, 20, 5, 1, 30)
    rotations = v.bootstrap_task(returns, len(returns), 5, 0, 10)
    observed = v._path_stats(returns)
    for sharpe, total, _ in rotations:
        assert total == pytest.approx(observed[1], rel=1e-9) and sharpe == pytest.approx(observed[0], rel=1e-9)
    result = v.bootstrap_result(observed, first, v.BootstrapSpec(n=60), seed=5)
    for interval in result["intervals"].values():
        assert interval["low"] <= interval["high"]


def test_cost_shocks() -> None:
    s = v.sleeves({"X": BARS}, CONFIG)
    baseline = float(run_backtest(BARS, CONFIG).metrics["Equity Final [$]"])
    none = v.MonteCarloSpec(n=10, fee_bps_sigma=0, slippage_bps_sigma=0)
    assert list(v.cost_shock_draws(s, none, 1, 0, 5)) == [baseline] * 5
    spec = v.MonteCarloSpec(n=10, fee_bps_sigma=20)
    shocked = list(v.cost_shock_draws(s, spec, 1, 0, 10))
    assert shocked == list(v.cost_shock_draws(s, spec, 1, 0, 10))
    assert len(set(shocked)) == 10 and np.mean(shocked) < baseline


def test_walk_forward_windows_and_choices() -> None:
    spec = v.WalkForwardSpec(in_sample=300, out_of_sample=100, fast=[5, 10], slow=[30, 60])
    rolling = v.walk_forward(BARS, CONFIG, spec)
    windows = rolling["windows"]
    assert len(windows) == 6  # out-of-sample windows start at bars 300, 400, ..., 800
    for before, after in itertools.pairwise(windows):
        assert before["out_of_sample"][1] < after["out_of_sample"][0]
    assert all(w["chosen"]["fast"] in (5, 10) and w["chosen"]["slow"] in (30, 60) for w in windows)
    assert rolling["out_of_sample_return_pct"] is not None
    anchored = v.walk_forward(BARS, CONFIG, spec.model_copy(update={"anchored": True}))
    assert all(w["in_sample"][0] == str(BARS.dates[0]) for w in anchored["windows"])
    single = v.walk_forward(BARS, CONFIG, spec.model_copy(update={"fast": [7], "slow": [21]}))
    assert {(w["chosen"]["fast"], w["chosen"]["slow"]) for w in single["windows"]} == {(7, 21)}


@pytest.mark.parametrize("metric", ["sharpe", "return_pct", "max_drawdown_pct", "win_rate_pct"])
def test_walk_forward_chooses_by_the_named_metric(metric: v.SelectionMetric) -> None:
    """Each window's choice is the grid's best pair by the metric (checked against the grid run directly)."""
    spec = v.WalkForwardSpec(in_sample=300, out_of_sample=100, fast=[3, 5, 10, 20], slow=[25, 30, 60, 90],
                             metric=metric)  # fmt: skip
    result = v.walk_forward(BARS, CONFIG, spec)
    assert result["method"].endswith(f"chosen by in-sample {metric}")
    pairs = [(f, s) for f in spec.fast for s in spec.slow if f < s]
    fast, slow = (np.array(column, dtype=np.int64) for column in zip(*pairs, strict=True))
    for window, row in zip(v.windows(len(BARS), spec), result["windows"], strict=True):
        in_sample = v._slice(BARS.between(CONFIG.start_date, CONFIG.end_date), window.in_start, window.in_end)
        column = run_dual_sma_grid(in_sample, fast, slow, CONFIG).column(v.SELECTION_COLUMNS[metric])
        scores = np.nan_to_num(column, nan=-np.inf)
        assert row["in_sample_score"] == pytest.approx(float(scores.max()))
        best = {(int(f), int(s)) for f, s, score in zip(fast, slow, scores, strict=True) if score == scores.max()}
        assert (row["chosen"]["fast"], row["chosen"]["slow"]) in best


def _scrambled_after(bars: Bars, cut: int, seed: int) -> Bars:
    """The same bars up to ``cut`` (exclusive); after it, a different future."""
    other = make_bars(len(bars), seed)
    scale = bars.close[cut - 1] / other.close[cut - 1]
    pick = lambda a, b: np.concatenate([a[:cut], b[cut:] * scale])  # noqa: E731
    return Bars.from_arrays(
        open=pick(bars.open, other.open), high=pick(bars.high, other.high), low=pick(bars.low, other.low),
        close=pick(bars.close, other.close), volume=np.concatenate([bars.volume[:cut], other.volume[cut:]]),
        dates=bars.dates,
    )  # fmt: skip


@pytest.mark.parametrize("anchored", [False, True])
def test_walk_forward_never_picks_parameters_from_out_of_sample_bars(anchored: bool) -> None:
    """Change every bar from one window's out-of-sample start on: the choices (and in-sample Sharpes) of that
    window and of all windows before it stay the same; only later windows, whose in-sample now includes the
    changed bars, may choose differently."""
    spec = v.WalkForwardSpec(in_sample=300, out_of_sample=100, anchored=anchored, fast=[3, 5, 10, 20],
                             slow=[25, 30, 60, 90])  # fmt: skip
    base = v.walk_forward(BARS, CONFIG, spec)["windows"]
    changed_later = 0
    for w, window in enumerate(v.windows(len(BARS), spec)[:-1]):
        future = v.walk_forward(_scrambled_after(BARS, window.in_end, seed=100 + w), CONFIG, spec)["windows"]
        for before, after in zip(base[: w + 1], future[: w + 1], strict=True):
            assert (after["chosen"], after["in_sample_sharpe"]) == (before["chosen"], before["in_sample_sharpe"])
        assert future[w]["out_of_sample_return_pct"] != base[w]["out_of_sample_return_pct"]  # it did see new bars
        changed_later += any(a["in_sample_sharpe"] != b["in_sample_sharpe"]
                             for a, b in zip(base[w + 1 :], future[w + 1 :], strict=True))  # fmt: skip
    assert changed_later > 0  # the test can tell: later in-sample windows did see the changed bars


@pytest.mark.parametrize(
    ("spec", "loc"),
    [
        ({"permutation": {"n": 5}}, ("permutation", "n")),
        ({"walk_forward": {"fast": [50], "slow": [10]}}, ("walk_forward",)),
        ({"bogus": {}}, ("bogus",)),
        ({"walk_forward": {"metric": "profit_factor"}}, ("walk_forward", "metric")),
    ],
)
def test_spec_validation(spec: dict[str, Any], loc: tuple[str, ...]) -> None:
    with pytest.raises(Exception) as caught:
        v.ValidationSpec.model_validate(spec)
    assert tuple(caught.value.errors()[0]["loc"][: len(loc)]) == loc  # type: ignore[attr-defined]
