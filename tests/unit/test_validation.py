"""Validation methods: seeds derive from (seed, method, task), so the numbers do not depend on the process count."""

from __future__ import annotations

import itertools
import multiprocessing
from concurrent.futures import ProcessPoolExecutor
from typing import Any

import numpy as np
import pytest

from shared import validation as v
from shared.backtest import BacktestConfig, Bars, run_backtest


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
CONFIG = BacktestConfig.model_validate(
    {
        "symbols": ["X"],
        "strategy": {"name": "dual_sma", "params": {"fast": 10, "slow": 40}},
        "execution": {"fee_bps": 2},
    }
)


def permutation_chunk(args: tuple[int, int, int]) -> list[float]:
    seed, task, draws = args
    return v.permutation_task(BARS, CONFIG, seed, task, draws)


def all_permutations(seed: int, n: int, chunk: int, processes: int | None) -> list[float]:
    plan = [(seed, task, draws) for task, draws in v.task_plan(n, chunk)]
    if processes is None:
        parts = [permutation_chunk(p) for p in plan]
    else:
        # spawn, not fork: a fork of a process with threads (a test session's clients) can inherit a held lock
        with ProcessPoolExecutor(max_workers=processes, mp_context=multiprocessing.get_context("spawn")) as pool:
            parts = list(pool.map(permutation_chunk, plan))
    return [x for part in parts for x in part]


def test_task_plan_covers_every_draw() -> None:
    assert v.task_plan(23, 5) == [(0, 5), (1, 5), (2, 5), (3, 5), (4, 3)]
    assert sum(d for _, d in v.task_plan(1000, 7)) == 1000


def test_permutations_are_the_same_in_one_or_two_processes() -> None:
    inline = all_permutations(11, 24, 5, None)
    one = all_permutations(11, 24, 5, 1)
    two = all_permutations(11, 24, 5, 2)
    assert inline == one == two  # bit for bit
    assert len(set(inline)) > 10  # the draws differ from each other
    assert all_permutations(12, 24, 5, None) != inline  # and depend on the seed
    # A task's stream depends on its index, not on the tasks before it.
    assert v.permutation_task(BARS, CONFIG, 11, 3, 5) == inline[15:20]


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


def test_bootstrap_is_deterministic_and_a_whole_block_is_a_rotation() -> None:
    returns = v.daily_returns(run_backtest(BARS, CONFIG).equity)
    first = v.bootstrap_task(returns, 20, 5, 0, 30) + v.bootstrap_task(returns, 20, 5, 1, 30)
    assert first == v.bootstrap_task(returns, 20, 5, 0, 30) + v.bootstrap_task(returns, 20, 5, 1, 30)
    rotations = v.bootstrap_task(returns, len(returns), 5, 0, 10)
    observed = v._path_stats(returns)
    for sharpe, total, _ in rotations:
        assert total == pytest.approx(observed[1], rel=1e-9) and sharpe == pytest.approx(observed[0], rel=1e-9)
    result = v.bootstrap_result(returns, first, v.BootstrapSpec(n=60), seed=5)
    for interval in result["intervals"].values():
        assert interval["low"] <= interval["high"]


def test_cost_shocks() -> None:
    baseline = float(run_backtest(BARS, CONFIG).metrics["Equity Final [$]"])
    none = v.MonteCarloSpec(n=10, fee_bps_sigma=0, slippage_bps_sigma=0)
    assert v.cost_shock_task(BARS, CONFIG, none, 1, 0, 5) == [baseline] * 5
    shocked = v.cost_shock_task(BARS, CONFIG, v.MonteCarloSpec(n=10, fee_bps_sigma=20), 1, 0, 10)
    assert shocked == v.cost_shock_task(BARS, CONFIG, v.MonteCarloSpec(n=10, fee_bps_sigma=20), 1, 0, 10)
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


@pytest.mark.parametrize(
    ("spec", "loc"),
    [
        ({"permutation": {"n": 5}}, ("permutation", "n")),
        ({"walk_forward": {"fast": [50], "slow": [10]}}, ("walk_forward",)),
        ({"bogus": {}}, ("bogus",)),
    ],
)
def test_spec_validation(spec: dict[str, Any], loc: tuple[str, ...]) -> None:
    with pytest.raises(Exception) as caught:
        v.ValidationSpec.model_validate(spec)
    assert tuple(caught.value.errors()[0]["loc"][: len(loc)]) == loc  # type: ignore[attr-defined]
