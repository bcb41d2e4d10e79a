"""Walk-forward of the dual SMA strategy: re-choose its windows in sample, trade them out of sample."""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from shared.domain.backtest import BacktestConfig, Bars, run_backtest
from shared.domain.backtest.bars import format_bar_dates
from shared.domain.backtest.grid import run_dual_sma_grid
from shared.domain.robustness.portfolio import Sleeves, _clean
from shared.domain.robustness.specs import SELECTION_COLUMNS, Task, WalkForwardSpec

# --- walk-forward --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Window:
    in_start: int
    in_end: int  # exclusive
    out_end: int  # exclusive; the out-of-sample window is [in_end, out_end)


def windows(n: int, spec: WalkForwardSpec) -> list[Window]:
    out = []
    in_end = spec.in_sample
    while in_end < n:
        in_start = 0 if spec.anchored else in_end - spec.in_sample
        out.append(Window(in_start, in_end, min(in_end + spec.out_of_sample, n)))
        in_end += spec.out_of_sample
    return out


def _slice(bars: Bars, lo: int, hi: int) -> Bars:
    return bars.sliced(lo, hi)


def walk_forward(bars: Bars, config: BacktestConfig, spec: WalkForwardSpec) -> dict[str, Any]:
    """Re-choose (fast, slow) on each in-sample window by ``spec.metric``, then trade it out of sample. The
    out-of-sample run starts ``slow`` bars early so its averages are warm on the window's first bar (those bars
    come from the in-sample past: no look-ahead)."""
    if config.strategy.name != "dual_sma":
        raise ValueError("walk-forward re-optimises the dual_sma strategy's windows")
    cut = bars.between(config.start_date, config.end_date)
    pairs = [(f, s) for f in spec.fast for s in spec.slow if f < s]
    fast = np.array([p[0] for p in pairs], dtype=np.int64)
    slow = np.array([p[1] for p in pairs], dtype=np.int64)
    rows: list[dict[str, Any]] = []
    for w in windows(len(cut), spec):
        grid = run_dual_sma_grid(_slice(cut, w.in_start, w.in_end), fast, slow, config)
        sharpe = np.nan_to_num(grid.column("Sharpe Ratio"), nan=-np.inf)
        score = np.nan_to_num(grid.column(SELECTION_COLUMNS[spec.metric]), nan=-np.inf)
        best = int(np.argmax(score))
        chosen = {"fast": int(fast[best]), "slow": int(slow[best])}
        warm = max(0, w.in_end - chosen["slow"])
        params = config.strategy.params.model_copy(update=chosen)
        oos_config = config.model_copy(update={"strategy": config.strategy.model_copy(update={"params": params}),
                                               "start_date": None, "end_date": None})  # fmt: skip
        equity = run_backtest(_slice(cut, warm, w.out_end), oos_config).equity[w.in_end - warm :]
        rows.append({
            "in_sample": format_bar_dates(cut.dates[[w.in_start, w.in_end - 1]]),
            "out_of_sample": format_bar_dates(cut.dates[[w.in_end, w.out_end - 1]]),
            "chosen": chosen,
            "in_sample_sharpe": float(sharpe[best]) if math.isfinite(sharpe[best]) else None,
            "in_sample_score": float(score[best]) if math.isfinite(score[best]) else None,
            "out_of_sample_return_pct": (float(equity[-1]) / float(equity[0]) - 1) * 100 if len(equity) else None,
        })  # fmt: skip
    oos: list[float] = [r["out_of_sample_return_pct"] for r in rows if r["out_of_sample_return_pct"] is not None]
    compounded = (math.prod(1 + r / 100 for r in oos) - 1) * 100 if oos else None
    return {
        "method": ("anchored" if spec.anchored else "rolling")
        + f" walk-forward, parameters chosen by in-sample {spec.metric}",
        "params": spec.model_dump(),
        "windows": rows,
        "out_of_sample_return_pct": compounded,
    }


def walk_forward_draws(s: Sleeves, spec: WalkForwardSpec, task: Task, chunk: int) -> Iterator[list[Any] | None]:
    """For each config position in the task's range: ``[position, symbol, result]``, or None for a symbol that
    is not a sleeve (no bars in the range)."""
    index = {p: i for i, p in enumerate(s.positions)}
    lo = task.task_index * chunk
    for position in range(lo, lo + task.draws):
        i = index.get(position)
        yield None if i is None else [position, s.symbols[i], _clean(walk_forward(s.bars[i], s.config, spec))]


def walk_forward_result(per_symbol: Sequence[Sequence[Any]], spec: WalkForwardSpec) -> dict[str, Any]:
    """Per symbol, and the stitched out-of-sample return of equal-cash sleeves (never rebalanced, so the
    portfolio's return is the mean of the sleeves' compounded out-of-sample returns)."""
    ordered = sorted(per_symbol, key=lambda row: row[0])
    returns = [r["out_of_sample_return_pct"] for _, _, r in ordered if r["out_of_sample_return_pct"] is not None]
    return {
        "method": ("anchored" if spec.anchored else "rolling") + " walk-forward per symbol, parameters chosen by "
        f"in-sample {spec.metric}; portfolio: equal-cash sleeves of the stitched out-of-sample returns",
        "params": spec.model_dump(),
        "symbols": {symbol: result for _, symbol, result in ordered},
        "portfolio_out_of_sample_return_pct": float(np.mean(returns)) if returns else None,
        "symbols_with_windows": len(returns),
    }
