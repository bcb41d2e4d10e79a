"""Adjusting bars for splits and dividends (pure): hand-computed examples, written out as numbers."""

from __future__ import annotations

import numpy as np
import pytest

from shared.marketdata.adjust import ADJUSTMENTS, Actions, adjust, adjustment_factors
from shared.marketdata.series import Columns

# Six daily bars (epoch days: Tue 2 Jan 2024 .. Wed 10 Jan 2024, a weekend between) as traded: a 4-for-1 split
# effective on bar 4 (8 Jan) shows in the raw prices, which drop from about 100 to about 25.
DAYS = np.array([19724, 19725, 19726, 19729, 19730, 19731], dtype=np.int64)
OPEN = [95.0, 97.0, 100.0, 24.5, 25.0, 25.5]
HIGH = [97.0, 101.0, 101.0, 25.5, 26.0, 26.5]
LOW = [94.0, 96.0, 98.0, 24.0, 24.5, 25.0]
CLOSE = [96.0, 100.0, 99.0, 25.0, 25.5, 26.0]
VOLUME = [1000.0, 1200.0, 1100.0, 4000.0, 4400.0, 4800.0]


def _bars() -> Columns:
    return Columns(DAYS * 86_400, *(np.array(v) for v in (OPEN, HIGH, LOW, CLOSE, VOLUME)))


def _actions(splits: dict[int, float] | None = None, dividends: dict[int, float] | None = None) -> Actions:
    splits, dividends = splits or {}, dividends or {}
    return Actions(
        np.array(list(splits), dtype=np.int64),
        np.array(list(splits.values()), dtype=np.float64),
        np.array(list(dividends), dtype=np.int64),
        np.array(list(dividends.values()), dtype=np.float64),
    )


# A 4-for-1 split on day 4 (19729) and a $0.50 dividend going ex on day 3 (19726).
SPLIT_AND_DIVIDEND = _actions(splits={19729: 4.0}, dividends={19726: 0.5})


def test_none_is_the_input_itself() -> None:
    bars = _bars()
    assert adjust(bars, DAYS, SPLIT_AND_DIVIDEND, "none") is bars


def test_splits_hand_computed() -> None:
    # Bars 1-3 (before 19729) trade on the old basis: prices / 4, volume * 4; bars 4-6 unchanged.
    got = adjust(_bars(), DAYS, SPLIT_AND_DIVIDEND, "splits")
    assert got.close.tolist() == [24.0, 25.0, 24.75, 25.0, 25.5, 26.0]
    assert got.open.tolist() == [23.75, 24.25, 25.0, 24.5, 25.0, 25.5]
    assert got.high.tolist() == [24.25, 25.25, 25.25, 25.5, 26.0, 26.5]
    assert got.low.tolist() == [23.5, 24.0, 24.5, 24.0, 24.5, 25.0]
    assert got.volume.tolist() == [4000.0, 4800.0, 4400.0, 4000.0, 4400.0, 4800.0]
    assert np.array_equal(got.ts, DAYS * 86_400)


def test_total_return_hand_computed() -> None:
    # The dividend's C is the raw close of the last bar before 19726: bar 2's 100.0, so its factor is
    # 1 - 0.50 / 100 = 0.995. Bars 1-2 (before both ex-dates): 0.995 / 4 = 0.24875; bar 3 (before the split only):
    # 1 / 4 = 0.25; bars 4-6: 1.  Closes: 96 * 0.24875 = 23.88, 100 * 0.24875 = 24.875, 99 * 0.25 = 24.75.
    got = adjust(_bars(), DAYS, SPLIT_AND_DIVIDEND, "total_return")
    assert got.close.tolist() == pytest.approx([23.88, 24.875, 24.75, 25.0, 25.5, 26.0], rel=1e-14)
    assert got.open.tolist() == pytest.approx([23.63125, 24.12875, 25.0, 24.5, 25.0, 25.5], rel=1e-14)
    assert got.high.tolist() == pytest.approx([24.12875, 25.12375, 25.25, 25.5, 26.0, 26.5], rel=1e-14)
    assert got.low.tolist() == pytest.approx([23.3825, 23.88, 24.5, 24.0, 24.5, 25.0], rel=1e-14)
    assert got.volume.tolist() == [4000.0, 4800.0, 4400.0, 4000.0, 4400.0, 4800.0]  # dividends leave volume alone
    price, volume = adjustment_factors(DAYS, SPLIT_AND_DIVIDEND, _bars().close, "total_return")
    assert price.tolist() == pytest.approx([0.24875, 0.24875, 0.25, 1.0, 1.0, 1.0], rel=1e-14)
    assert volume.tolist() == [4.0, 4.0, 4.0, 1.0, 1.0, 1.0]


def test_reverse_split() -> None:
    # 1-for-10 on 19730: bars 1-4 prices * 10, volume / 10.
    got = adjust(_bars(), DAYS, _actions(splits={19730: 0.1}), "splits")
    assert got.close.tolist() == pytest.approx([960.0, 1000.0, 990.0, 250.0, 25.5, 26.0], rel=1e-14)
    assert got.volume.tolist() == pytest.approx([100.0, 120.0, 110.0, 400.0, 4400.0, 4800.0], rel=1e-14)


def test_two_splits_compound() -> None:
    # 2-for-1 on 19726 and 3-for-1 on 19730: bars 1-2 / 6, bars 3-4 / 3, bars 5-6 unchanged (in either order).
    for actions in (_actions(splits={19726: 2.0, 19730: 3.0}), _actions(splits={19730: 3.0, 19726: 2.0})):
        got = adjust(_bars(), DAYS, actions, "total_return")
        assert got.close.tolist() == pytest.approx([16.0, 100 / 6, 33.0, 25 / 3, 25.5, 26.0], rel=1e-14)
        assert got.volume.tolist() == [6000.0, 7200.0, 3300.0, 12000.0, 4400.0, 4800.0]


def test_dividend_before_the_first_bar_is_ignored_and_after_the_last_applies_to_all() -> None:
    bars = _bars()
    assert adjust(bars, DAYS, _actions(dividends={19700: 1.0, 19724: 1.0}), "total_return") is bars
    # Ex-date after the last bar: C is the last close, 26.0; factor 1 - 0.26 / 26 = 0.99 on every bar.
    got = adjust(bars, DAYS, _actions(dividends={19800: 0.26}), "total_return")
    assert got.close.tolist() == pytest.approx([95.04, 99.0, 98.01, 24.75, 25.245, 25.74], rel=1e-14)
    assert adjust(bars, DAYS, _actions(dividends={19800: 0.26}), "splits") is bars


def test_invalid_dividends_are_skipped() -> None:
    # 100.0 on 19726 equals C (100.0, factor 0) and 150.0 on 19729 exceeds C (99.0): both skipped, as is a negative
    # amount; the valid $1.00 on 19731 (C = 25.5, factor 1 - 1 / 25.5 = 24.5 / 25.5) still applies to bars 1-5.
    actions = _actions(dividends={19726: 100.0, 19729: 150.0, 19730: -1.0, 19731: 1.0})
    got = adjust(_bars(), DAYS, actions, "total_return")
    factor = 24.5 / 25.5
    assert got.close.tolist() == pytest.approx([96 * factor, 100 * factor, 99 * factor, 25 * factor, 24.5, 26.0])
    assert np.all(got.low > 0)


def test_split_on_the_dividend_ex_date_puts_the_close_on_the_new_basis() -> None:
    # 4-for-1 and $0.25 (per new share) both on 19729: C = 99.0 old = 24.75 new, factor 1 - 0.25 / 24.75 = 98 / 99.
    got = adjust(_bars(), DAYS, _actions(splits={19729: 4.0}, dividends={19729: 0.25}), "total_return")
    assert got.close.tolist() == pytest.approx([96 / 4 * 98 / 99, 25 * 98 / 99, 24.5, 25.0, 25.5, 26.0], rel=1e-14)


def test_intraday_bars_use_the_previous_days_last_close() -> None:
    # Three bars a day for two days; a $1 dividend ex on day 2: C = 50.0 (day 1's last bar), factor 0.98.
    days = np.array([19724, 19724, 19724, 19725, 19725, 19725], dtype=np.int64)
    close = np.array([48.0, 49.0, 50.0, 49.0, 49.5, 50.5])
    ts = 19724 * 86_400 + np.arange(6, dtype=np.int64) * 3600
    bars = Columns(ts, close, close, close, close, np.full(6, 10.0))
    got = adjust(bars, days, _actions(dividends={19725: 1.0}), "total_return")
    assert got.close.tolist() == pytest.approx([47.04, 48.02, 49.0, 49.0, 49.5, 50.5], rel=1e-14)


def test_inputs_are_not_mutated_and_may_be_read_only() -> None:
    bars, days = _bars(), DAYS.copy()
    actions = _actions(splits={19729: 4.0}, dividends={19726: 0.5})
    for array in (bars.ts, bars.open, bars.high, bars.low, bars.close, bars.volume, days, *vars(actions).values()):
        array.flags.writeable = False
    before = [a.copy() for a in (bars.open, bars.high, bars.low, bars.close, bars.volume)]
    for adjustment in ADJUSTMENTS:
        got = adjust(bars, days, actions, adjustment)
        assert all(np.array_equal(a, b) for a, b in zip(before, bars.values(), strict=True))
        if adjustment != "none":
            assert got.close.flags.writeable and not np.shares_memory(got.close, bars.close)


def test_errors() -> None:
    with pytest.raises(ValueError, match="unknown adjustment"):
        adjust(_bars(), DAYS, SPLIT_AND_DIVIDEND, "dividends")
    with pytest.raises(ValueError, match="5 days for 6 bars"):
        adjust(_bars(), DAYS[:5], SPLIT_AND_DIVIDEND, "splits")
