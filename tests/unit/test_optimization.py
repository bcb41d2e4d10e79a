"""Optimisation's pure parts: combos, constraints, ranking, aggregation, slices, walk-forward windows and the
out-of-sample run's causality."""

from __future__ import annotations

import datetime as dt
import math
from typing import Any

import numpy as np
import pytest

from shared.domain.backtest import BacktestConfig, Bars, run_backtest
from shared.domain.search import grid, plan, scoring
from shared.domain.search import spec as search_spec
from shared.errors import ValidationFailed
from shared.jobs.optimizations import finalize


def spec(**changes: Any) -> search_spec.OptimizationSpec:
    doc: dict[str, Any] = {
        "config": {"symbols": ["X"], "strategy": {"name": "dual_sma"}},
        "parameters": {"fast": {"start": 2, "stop": 10, "step": 2}, "slow": [5, 10, 20]},
    }
    doc.update(changes)
    return search_spec.OptimizationSpec.model_validate(doc)


def bars(n: int = 400, seed: int = 3) -> Bars:
    rng = np.random.default_rng(seed)
    close = 100 * np.exp(np.cumsum(rng.normal(0.0004, 0.015, n)))
    open_ = close * (1 + rng.normal(0, 0.003, n))
    dates = np.arange(np.datetime64("2020-01-01"), np.datetime64("2020-01-01") + n).astype("datetime64[D]")
    return Bars.from_arrays(
        open=open_,
        high=np.maximum(open_, close) * 1.01,
        low=np.minimum(open_, close) * 0.99,
        close=close,
        volume=np.full(n, 1e6),
        dates=dates,
    )


def error_field(exc: pytest.ExceptionInfo[ValidationFailed]) -> str:
    return str(exc.value.details["errors"][0]["field"])


def test_grid_is_the_valid_cartesian_product_with_inclusive_stops() -> None:
    c = grid.combos(spec())
    assert c.names == ("fast", "slow")
    assert c.values == [(f, s) for f in (2, 4, 6, 8, 10) for s in (5, 10, 20) if f < s]
    assert c.grid_size == len(c) and c.params(0) == {"fast": 2, "slow": 5}


def test_float_ranges_and_cross_field_rules_of_other_strategies() -> None:
    s = spec(
        config={"symbols": ["X"], "strategy": {"name": "rsi_reversion"}},
        parameters={"lower": {"start": 20, "stop": 40, "step": 10}, "upper": [35, 70]},
    )
    assert grid.combos(s).values == [(20.0, 35.0), (20.0, 70.0), (30.0, 35.0), (30.0, 70.0), (40.0, 70.0)]
    assert grid.parameter_values("bollinger_reversion", "k", search_spec.Range(start=0.5, stop=1.0, step=0.1)) == [
        0.5,
        0.6,
        0.7,
        0.8,
        0.9,
        1.0,
    ]


@pytest.mark.parametrize(
    ("parameters", "field"),
    [
        ({"speed": [1]}, "parameters.speed"),
        ({"fast": {"start": 5, "stop": 4, "step": 1}}, "parameters.fast"),
        ({"fast": [2.5]}, "parameters.fast"),
        ({"fast": [0]}, "parameters.fast"),
        ({"fast": [30], "slow": [10]}, "parameters"),
    ],
)
def test_bad_parameters_name_the_field(parameters: dict[str, Any], field: str) -> None:
    with pytest.raises(ValidationFailed) as exc:
        grid.combos(spec(parameters=parameters))
    assert error_field(exc) == field


def test_random_search_is_a_seeded_sample_of_the_grid() -> None:
    whole = grid.combos(spec(parameters={"fast": {"start": 2, "stop": 40, "step": 1}, "slow": [50, 60]}))
    pick = {"method": "random", "budget": 10}
    a = grid.combos(
        spec(parameters={"fast": {"start": 2, "stop": 40, "step": 1}, "slow": [50, 60]}, search={**pick, "seed": 7})
    )
    b = grid.combos(
        spec(parameters={"fast": {"start": 2, "stop": 40, "step": 1}, "slow": [50, 60]}, search={**pick, "seed": 7})
    )
    c = grid.combos(
        spec(parameters={"fast": {"start": 2, "stop": 40, "step": 1}, "slow": [50, 60]}, search={**pick, "seed": 8})
    )
    assert a.values == b.values and a.values != c.values and len(a) == 10
    assert set(a.values) <= set(whole.values) and len(set(a.values)) == 10
    assert a.values == sorted(a.values, key=whole.values.index)  # grid order
    everything = grid.combos(spec(parameters={"fast": [2, 3], "slow": [5]}, search={**pick, "seed": 1}))
    assert everything.values == [(2, 5), (3, 5)]  # a budget above the grid takes the grid


def test_impossible_constraints_are_named() -> None:
    c = search_spec.Constraint
    grid.check_constraints([c(metric="max_drawdown_pct", op=">=", value=-15), c(metric="trades", op=">=", value=20)])
    for constraints, index in (
        ([c(metric="max_drawdown_pct", op=">", value=0)], 0),
        ([c(metric="win_rate_pct", op=">", value=100)], 0),
        ([c(metric="trades", op="<", value=0)], 0),
        ([c(metric="trades", op=">=", value=20), c(metric="trades", op="<=", value=19)], 1),
        ([c(metric="sharpe", op=">", value=1), c(metric="sharpe", op="<", value=1)], 1),
    ):
        with pytest.raises(ValidationFailed) as exc:
            grid.check_constraints(constraints)
        assert error_field(exc) == f"constraints[{index}]"


def test_rank_filters_orders_and_breaks_ties_by_index() -> None:
    names = search_spec.METRIC_NAMES
    summary = np.full((5, len(names)), 1.0)
    sharpe, trades = names.index("sharpe"), names.index("trades")
    summary[:, sharpe] = [0.5, np.nan, 0.9, 0.9, 2.0]
    summary[:, trades] = [30, 30, 30, 30, 5]
    objective = search_spec.Objective(metric="sharpe", direction="max")
    at_least_20 = [search_spec.Constraint(metric="trades", op=">=", value=20)]
    assert scoring.rank(summary, objective, at_least_20).tolist() == [2, 3, 0, 1]
    assert scoring.best_index(summary, objective, at_least_20) == 2
    assert scoring.rank(summary, search_spec.Objective(metric="sharpe", direction="min"), []).tolist() == [
        0,
        2,
        3,
        4,
        1,
    ]
    assert scoring.best_index(summary[[1]], objective, []) is None  # an undefined objective is never best
    reasons = scoring.failed_reasons(
        {"trades": 5.0, "sharpe": None}, [*at_least_20, search_spec.Constraint(metric="sharpe", op=">", value=0)]
    )
    assert len(reasons) == 2 and "undefined" in reasons[1]


def test_aggregate_means_metrics_and_sums_trades() -> None:
    a = np.arange(16, dtype=float).reshape(2, 8)
    b = a + 2
    b[0, 4] = np.nan
    out, n = scoring.aggregate([a, b])
    assert n == 2
    t = search_spec.TRADES
    assert out[0, t] == a[0, t] + b[0, t] and out[1, 0] == (a[1, 0] + b[1, 0]) / 2
    assert out[0, 4] == a[0, 4]  # NaN left out of the mean


def test_scores_equal_run_backtest_per_combo_on_both_paths() -> None:
    b = bars()
    for s in (
        spec(),
        spec(config={"symbols": ["X"], "strategy": {"name": "donchian_breakout"}}, parameters={"period": [10, 20, 55]}),
    ):
        c = grid.combos(s)
        scored = scoring.score_symbol(b, s.config, c, 0, len(c))
        assert scored is not None
        for i in range(len(c)):
            config = scoring.config_for(s.config, c.params(i))
            metrics = run_backtest(b, config).metrics
            for j, name in enumerate(search_spec.METRICS.values()):
                want = float(metrics[name])
                assert (math.isnan(want) and math.isnan(scored[i, j])) or math.isclose(scored[i, j], want, rel_tol=1e-9)


def test_plan_slices_every_combo_once_per_window() -> None:
    tasks = plan.plan(10, 3, 9, None)  # 3 combos per slice
    assert [(t.lo, t.hi) for t in tasks] == [(0, 3), (3, 6), (6, 9), (9, 10)]
    assert sum(t.work for t in tasks) == 30
    calendar = [dt.date(2020, 1, 1) + dt.timedelta(days=i) for i in range(100)]
    windows = plan.window_dates(calendar, search_spec.WalkForward(in_sample=40, out_of_sample=20))
    assert [(w.in_sample[0].day, w.out_of_sample[0]) for w in windows][:1] == [(1, calendar[40])]
    assert len(windows) == 3 and windows[-1].out_of_sample[1] == calendar[-1]
    wf_tasks = plan.plan(10, 1, 5, windows)
    assert len(wf_tasks) == 6 and {t.window for t in wf_tasks} == {0, 1, 2}
    assert plan.Task.from_dict(wf_tasks[3].as_dict()) == wf_tasks[3]
    anchored = plan.window_dates(calendar, search_spec.WalkForward(in_sample=40, out_of_sample=20, anchored=True))
    assert all(w.in_sample[0] == calendar[0] for w in anchored)


def test_out_of_sample_run_starts_flat_and_never_reads_later_bars() -> None:
    b = bars(300)
    s = spec()
    task = plan.Task(1, 0, 1, str(b.dates[50]), str(b.dates[199]), str(b.dates[200]), str(b.dates[249]))
    curve = finalize.oos_curve(b, s.config, {"fast": 5, "slow": 20}, task)
    assert curve is not None
    days, equity = curve
    assert str(days[0]) == task.oos_start and str(days[-1]) == task.oos_end
    assert equity[0] == s.config.initial_cash  # flat on the window's first bar (fills come the next bar)
    later = Bars.from_arrays(
        open=np.r_[b.open[:250], b.open[250:] * 3],
        high=np.r_[b.high[:250], b.high[250:] * 3],
        low=np.r_[b.low[:250], b.low[250:] * 3],
        close=np.r_[b.close[:250], b.close[250:] * 3],
        volume=b.volume,
        dates=b.dates,
    )
    again = finalize.oos_curve(later, s.config, {"fast": 5, "slow": 20}, task)
    assert again is not None and np.array_equal(again[1], equity)


def test_spec_hash_ignores_parameter_order_but_not_values() -> None:
    a = spec(parameters={"slow": [5, 10], "fast": [2]})
    b = spec(parameters={"fast": [2], "slow": [5, 10]})
    assert a.spec_hash == b.spec_hash
    assert a.spec_hash != spec(parameters={"fast": [3], "slow": [5, 10]}).spec_hash
    assert BacktestConfig.model_validate(a.config.model_dump()) == a.config
