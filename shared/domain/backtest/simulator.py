"""Execution simulator: events + risk fractions -> fills, cash, positions, trades, equity. One numba kernel.

Timeline of bar ``t`` (native convention):

1. An order decided on an earlier bar fills at ``open[t]`` (``fill = next_open``) or ``close[t]``
   (``next_close``). On a zero-volume bar it does not fill: it waits for the next bar with volume, or is
   cancelled (``on_zero_volume``); ``ignore`` fills anyway.
2. Equity is marked at ``close[t]``. If it is <= 0 the position is liquidated at the close and the account
   stops (equity 0 from then on), as in backtesting.py.
3. The strategy's event of bar ``t`` (computed from bars <= t) becomes the pending order, replacing any
   waiting one; with ``fill = this_close`` it fills at ``close[t]`` at once (market-on-close; on a zero-volume
   bar such an order cannot wait and is cancelled unless ``on_zero_volume = ignore``).
4. On the last bar, ``flatten_at_end`` closes the position at ``close[t]``; unfilled orders lapse.

An order to go long/short first closes an opposite position (its own fill: fees and slippage apply to
each), then opens the new one with ``fraction * equity`` (whole units unless fractional) where the unit cost
includes slippage and the bps fee, and the fixed fee comes off the budget first, so cash never goes negative.
An order in the direction already held (or pending) is ignored: positions are sized at entry, not rebalanced.
Each fill pays ``fixed_fee + fee_bps * value``; its price moves against the trade by ``slippage_bps`` plus the
slippage model: half the quoted spread (``spread_pct``) or ``impact_bps * (units / bar volume) ** exponent``
capped at ``max_impact_bps`` (``participation_rate``).

The ``backtesting_py`` convention replaces steps 1, 3 and 4 with backtesting.py 0.6.6's broker arithmetic,
operation for operation (so the floats agree to the last bit): sizing ``int(margin * size // (price +
commission / size))``, exclusive orders (every LONG/SHORT closes the trade and opens a new one, even in the
same direction), commission recomputed per trade on entry and exit, and ``finalize_trades`` closing at the
last bar's open (then filling an order placed on the last bar, which stays open).
"""

from __future__ import annotations

import numpy as np
from numpy.typing import NDArray

from shared.domain._jit import kernel

# integer parameters
I_COMPAT = 0
I_FILL = 1  # 0 next_open, 1 next_close, 2 this_close
I_ALLOW_SHORT = 2
I_FRACTIONAL = 3
I_FLATTEN = 4
I_ZERO_VOLUME = 5  # 0 wait, 1 cancel, 2 ignore (fill)
I_RISK = 6  # 0 fixed_fraction, 1 volatility_target, 2 kelly_fraction
I_SLIPPAGE = 7  # 0 none, 1 spread_pct, 2 participation_rate
I_KELLY_MIN_TRADES = 8
N_IPARAMS = 9

# float parameters
F_CASH = 0
F_FEE_RATE = 1
F_FIXED_FEE = 2
F_SLIP_RATE = 3
F_HALF_SPREAD = 4
F_IMPACT = 5  # impact at 100 % participation, as a rate
F_IMPACT_EXPONENT = 6
F_IMPACT_CAP = 7  # as a rate
F_KELLY_FRACTION = 8
F_KELLY_WARMUP = 9
F_KELLY_MAX = 10
N_FPARAMS = 11

FILL_NEXT_OPEN = 0
FILL_NEXT_CLOSE = 1
FILL_THIS_CLOSE = 2
ZERO_VOLUME_WAIT = 0
ZERO_VOLUME_CANCEL = 1
ZERO_VOLUME_IGNORE = 2
SLIPPAGE_NONE = 0
SLIPPAGE_SPREAD = 1
SLIPPAGE_PARTICIPATION = 2
RISK_KELLY = 2

# account state (one float64 array, so helpers can update it in place)
S_CASH = 0
S_POS = 1
S_ENTRY_PRICE = 2
S_ENTRY_FEE = 3
S_ENTRY_BAR = 4
S_N_CLOSED = 5
S_WINS = 6
S_LOSSES = 7
S_SUM_WIN = 8
S_SUM_LOSS = 9
S_NOTIONAL = 10  # value of all fills
S_FEES = 11  # every fee paid, open trade included
S_SLIPPAGE = 12  # cost of slippage against the reference prices
S_FILLS = 13
S_CANCELLED = 14  # orders dropped on a zero-volume bar
S_UNFILLED = 15  # orders too small for one unit (or no budget)
S_BUST = 16  # bar where equity hit zero, or -1
N_STATE = 17

# trade table columns
T_SIZE = 0
T_ENTRY_BAR = 1
T_EXIT_BAR = 2
T_ENTRY_PRICE = 3
T_EXIT_PRICE = 4
T_PNL = 5
T_RETURN = 6
T_COMMISSION = 7
N_TRADE_COLS = 8

# event codes (same as strategies.*)
_LONG = 1
_SHORT = -1
_FLAT = 2

# backtesting.py's default `size`: 1 - machine epsilon ("all available cash")
FULL_EQUITY = 1.0 - np.finfo(np.float64).eps


@kernel
def slipped_price(
    price: float, side: float, units: float, volume: float, ip: NDArray[np.int64], fp: NDArray[np.float64]
) -> float:
    """Reference price moved against a fill of ``units`` on ``side`` (+1 buy, -1 sell)."""
    slip = fp[F_SLIP_RATE]
    model = ip[I_SLIPPAGE]
    if model == SLIPPAGE_SPREAD:
        slip += fp[F_HALF_SPREAD]
    elif model == SLIPPAGE_PARTICIPATION and units > 0:
        if volume > 0:
            impact = fp[F_IMPACT] * (units / volume) ** fp[F_IMPACT_EXPONENT]
            slip += min(impact, fp[F_IMPACT_CAP])
        else:
            slip += fp[F_IMPACT_CAP]
    return price * (1.0 + side * slip)


@kernel
def _record_close(
    st: NDArray[np.float64], trades: NDArray[np.float64], exit_price: float, commission: float, t: int
) -> None:
    pos = st[S_POS]
    entry = st[S_ENTRY_PRICE]
    k = int(st[S_N_CLOSED])
    sign = 1.0 if pos > 0 else -1.0
    pnl = (pos * (exit_price - entry)) - commission
    ret = sign * (exit_price / entry - 1) - commission / (abs(pos) * entry)
    trades[k, T_SIZE] = pos
    trades[k, T_ENTRY_BAR] = st[S_ENTRY_BAR]
    trades[k, T_EXIT_BAR] = t
    trades[k, T_ENTRY_PRICE] = entry
    trades[k, T_EXIT_PRICE] = exit_price
    trades[k, T_PNL] = pnl
    trades[k, T_RETURN] = ret
    trades[k, T_COMMISSION] = commission
    st[S_N_CLOSED] = k + 1
    if ret > 0:
        st[S_WINS] += 1
        st[S_SUM_WIN] += ret
    elif ret < 0:
        st[S_LOSSES] += 1
        st[S_SUM_LOSS] += ret
    st[S_POS] = 0.0
    st[S_ENTRY_PRICE] = 0.0
    st[S_ENTRY_FEE] = 0.0


@kernel
def close_position(
    st: NDArray[np.float64],
    trades: NDArray[np.float64],
    price: float,
    volume: float,
    t: int,
    ip: NDArray[np.int64],
    fp: NDArray[np.float64],
) -> None:
    """Close the whole position at ``price`` (the reference price: slippage applies in native mode)."""
    pos = st[S_POS]
    if pos == 0:
        return
    units = abs(pos)
    fixed = fp[F_FIXED_FEE]
    rate = fp[F_FEE_RATE]
    if ip[I_COMPAT] == 1:
        # backtesting.py _close_trade: cash += trade.pl - commission; commissions recomputed from entry
        exit_fee = fixed + abs(pos) * price * rate
        st[S_CASH] = st[S_CASH] + ((pos * (price - st[S_ENTRY_PRICE])) - exit_fee)
        commission = exit_fee + (fixed + abs(pos) * st[S_ENTRY_PRICE] * rate)
        fill = price
    else:
        side = -1.0 if pos > 0 else 1.0
        fill = slipped_price(price, side, units, volume, ip, fp)
        exit_fee = fixed + rate * units * fill
        st[S_CASH] = st[S_CASH] + pos * fill - exit_fee
        commission = st[S_ENTRY_FEE] + exit_fee
        st[S_SLIPPAGE] += units * abs(fill - price)
    st[S_NOTIONAL] += units * fill
    st[S_FEES] += exit_fee
    st[S_FILLS] += 1
    _record_close(st, trades, fill, commission, t)


@kernel
def open_position(
    st: NDArray[np.float64],
    direction: int,
    fraction: float,
    price: float,
    volume: float,
    close_price: float,
    t: int,
    ip: NDArray[np.int64],
    fp: NDArray[np.float64],
) -> None:
    """Open ``direction`` (+1/-1) with ``fraction`` of equity; the position must be flat."""
    fixed = fp[F_FIXED_FEE]
    rate = fp[F_FEE_RATE]
    side = float(direction)
    if ip[I_COMPAT] == 1:
        # backtesting.py _Broker._process_orders for a relative-size market order, operation for operation
        size_abs = fraction
        adjusted_plus_commission = price + (fixed + size_abs * price * rate) / size_abs
        equity = st[S_CASH] + (close_price * 0.0 - 0.0)
        margin_available = max(0.0, equity)
        units = float(int((margin_available * 1.0 * size_abs) // adjusted_plus_commission))
        if units == 0 or units * adjusted_plus_commission > margin_available * 1.0:
            st[S_UNFILLED] += 1
            return
        fee = fixed + units * price * rate
        st[S_CASH] = st[S_CASH] - fee
        fill = price
    else:
        equity = st[S_CASH]
        budget = fraction * equity - fixed
        if not budget > 0:
            st[S_UNFILLED] += 1
            return
        fractional = ip[I_FRACTIONAL] == 1
        fill = slipped_price(price, side, 0.0, volume, ip, fp)
        units = budget / (fill * (1.0 + rate))
        if not fractional:
            units = np.floor(units)
        if ip[I_SLIPPAGE] == SLIPPAGE_PARTICIPATION and units > 0:
            # impact grows with size: size at the impact of the first estimate (an upper bound), then price
            # the smaller order at its own (smaller) impact; it stays affordable
            fill = slipped_price(price, side, units, volume, ip, fp)
            units = budget / (fill * (1.0 + rate))
            if not fractional:
                units = np.floor(units)
            fill = slipped_price(price, side, units, volume, ip, fp)
        if not units > 0:
            st[S_UNFILLED] += 1
            return
        fee = fixed + rate * units * fill
        st[S_CASH] = st[S_CASH] - side * units * fill - fee
        if st[S_CASH] < 0:  # only rounding residue can get here (budget <= cash); never report negative cash
            st[S_CASH] = 0.0
        st[S_SLIPPAGE] += units * abs(fill - price)
    st[S_POS] = side * units
    st[S_ENTRY_PRICE] = fill
    st[S_ENTRY_FEE] = fee
    st[S_ENTRY_BAR] = t
    st[S_NOTIONAL] += units * fill
    st[S_FEES] += fee
    st[S_FILLS] += 1


@kernel
def kelly_decision(st: NDArray[np.float64], ip: NDArray[np.int64], fp: NDArray[np.float64]) -> float:
    """Dampened Kelly fraction from the trades closed so far (see risk.kelly_fraction: same rule)."""
    n = st[S_N_CLOSED]
    if n < ip[I_KELLY_MIN_TRADES]:
        return fp[F_KELLY_WARMUP]
    wins = st[S_WINS]
    losses = st[S_LOSSES]
    p = wins / n
    if wins == 0:
        f = 0.0
    elif losses == 0 or st[S_SUM_LOSS] == 0:
        f = p
    else:
        ratio = (st[S_SUM_WIN] / wins) / (-st[S_SUM_LOSS] / losses)
        f = p - (1 - p) / ratio
    return min(max(f * fp[F_KELLY_FRACTION], 0.0), fp[F_KELLY_MAX])


@kernel
def _execute(
    st: NDArray[np.float64],
    trades: NDArray[np.float64],
    direction: int,
    fraction: float,
    price: float,
    volume: float,
    close_price: float,
    t: int,
    ip: NDArray[np.int64],
    fp: NDArray[np.float64],
) -> None:
    """Fill an order: ``direction`` 0 = flat, +1 long, -1 short (compat: always close, then reopen)."""
    pos = st[S_POS]
    held = 0 if pos == 0 else (1 if pos > 0 else -1)
    if held != 0 and (held != direction or ip[I_COMPAT] == 1):
        close_position(st, trades, price, volume, t, ip, fp)
    if direction != 0 and st[S_POS] == 0:
        open_position(st, direction, fraction, price, volume, close_price, t, ip, fp)


@kernel
def _mark(st: NDArray[np.float64], close_price: float, compat: bool) -> float:
    pos = st[S_POS]
    if compat:
        return st[S_CASH] + (close_price * pos - pos * st[S_ENTRY_PRICE])
    return st[S_CASH] + pos * close_price


@kernel
def simulate(
    open_: NDArray[np.float64],
    close: NDArray[np.float64],
    volume: NDArray[np.float64],
    events: NDArray[np.int8],
    fractions: NDArray[np.float64],
    ip: NDArray[np.int64],
    fp: NDArray[np.float64],
    equity: NDArray[np.float64],
    position: NDArray[np.float64],
    trades: NDArray[np.float64],
    st: NDArray[np.float64],
) -> None:
    """Run the account over all bars. Writes ``equity``/``position`` per bar, closed trades, final state.

    ``trades`` needs ``len(close) + 2`` rows. On return the open position (if any) is in ``st``.
    """
    n = len(close)
    compat = ip[I_COMPAT] == 1
    fill_mode = ip[I_FILL]
    zero_volume = ip[I_ZERO_VOLUME]
    allow_short = ip[I_ALLOW_SHORT] == 1
    st[:] = 0.0
    st[S_CASH] = fp[F_CASH]
    st[S_BUST] = -1.0
    has_pending = False
    pending_dir = 0
    pending_fraction = 0.0
    for t in range(n):
        # 1. fill the order decided on an earlier bar
        if has_pending and fill_mode != FILL_THIS_CLOSE:
            price = open_[t] if fill_mode == FILL_NEXT_OPEN else close[t]
            if volume[t] <= 0 and zero_volume != ZERO_VOLUME_IGNORE:
                if zero_volume == ZERO_VOLUME_CANCEL:
                    has_pending = False
                    st[S_CANCELLED] += 1
            else:
                has_pending = False
                _execute(st, trades, pending_dir, pending_fraction, price, volume[t], close[t], t, ip, fp)
        # 2. mark to market; an account at or below zero is liquidated and stops
        eq = _mark(st, close[t], compat)
        if eq <= 0:
            if st[S_POS] != 0:
                close_position(st, trades, close[t], volume[t], t, ip, fp)
            st[S_CASH] = 0.0
            st[S_BUST] = t
            equity[t:] = 0.0
            position[t:] = 0.0
            return
        equity[t] = eq
        position[t] = st[S_POS]
        # 3. the strategy's decision on this bar's close
        event = events[t]
        if event != 0:
            direction = 0 if event == _FLAT else int(event)
            if direction == -1 and not allow_short:
                direction = 0
            if compat:
                held = 0 if st[S_POS] == 0 else 1
                act = direction != 0 or held != 0
            else:
                held_dir = pending_dir if has_pending else (0 if st[S_POS] == 0 else (1 if st[S_POS] > 0 else -1))
                act = direction != held_dir
            if act:
                fraction = kelly_decision(st, ip, fp) if ip[I_RISK] == RISK_KELLY else fractions[t]
                if fill_mode == FILL_THIS_CLOSE:
                    if volume[t] <= 0 and zero_volume != ZERO_VOLUME_IGNORE:
                        st[S_CANCELLED] += 1
                    else:
                        _execute(st, trades, direction, fraction, close[t], volume[t], close[t], t, ip, fp)
                        equity[t] = _mark(st, close[t], compat)
                        position[t] = st[S_POS]
                else:
                    has_pending = True
                    pending_dir = direction
                    pending_fraction = fraction
    # 4. end of data
    last = n - 1
    if ip[I_FLATTEN] == 1 and n > 0:
        if compat:
            # backtesting.py finalize_trades: close at the last bar's open, then fill what the last bar ordered
            if st[S_POS] != 0:
                close_position(st, trades, open_[last], volume[last], last, ip, fp)
            if has_pending:
                _execute(
                    st, trades, pending_dir, pending_fraction, open_[last], volume[last], close[last], last, ip, fp
                )
            eq = _mark(st, close[last], compat)
            if eq <= 0:
                if st[S_POS] != 0:
                    close_position(st, trades, close[last], volume[last], last, ip, fp)
                st[S_CASH] = 0.0
                st[S_BUST] = last
                eq = 0.0
            equity[last] = eq
        elif st[S_POS] != 0:
            close_position(st, trades, close[last], volume[last], last, ip, fp)
            equity[last] = _mark(st, close[last], compat)
        position[last] = st[S_POS]
