"""PortfolioSum (a run's curves summed a batch at a time) is portfolio_curve, bit for bit, however it is batched."""

from __future__ import annotations

import numpy as np
import pytest

from shared.domain.robustness.portfolio import PortfolioSum, portfolio_curve


def ragged_curves(seed: int, n: int) -> list[tuple[np.ndarray, np.ndarray]]:
    """Curves on different, overlapping and gapped date sets (late listings, early ends, holes)."""
    rng = np.random.default_rng(seed)
    days = np.arange(np.datetime64("2015-01-01"), np.datetime64("2016-06-01"))
    curves = []
    for _ in range(n):
        lo, hi = sorted(rng.integers(0, len(days), 2))
        own = days[lo : hi + 1][rng.random(hi + 1 - lo) > 0.2]
        if not len(own):
            own = days[lo : lo + 1]
        curves.append((own, 10_000 * np.cumprod(1 + rng.normal(0, 0.01, len(own)))))
    return curves


@pytest.mark.parametrize("batch", [1, 2, 7, 50])
@pytest.mark.parametrize("cash", [10_000.0, 0.1])
def test_batched_sums_are_portfolio_curve(batch: int, cash: float) -> None:
    curves = ragged_curves(batch, 40)
    dates, total = portfolio_curve(curves, cash)
    summed = PortfolioSum(cash)
    for lo in range(0, len(curves), batch):
        summed.add(curves[lo : lo + batch])
    assert summed.sleeves == len(curves)
    assert np.array_equal(summed.dates, dates)
    assert summed.total.tobytes() == total.tobytes()


def test_nothing_added_is_an_empty_sum() -> None:
    summed = PortfolioSum(1.0)
    summed.add([])
    assert summed.sleeves == 0 and len(summed.dates) == 0 and len(summed.total) == 0
