"""Performance metrics: backtesting.py 0.6.6's whole set, computed its way, plus PSR, risk-free rate, turnover.

Each formula follows ``backtesting/_stats.py`` of 0.6.6 (the golden tests hold every value to rtol 1e-9, on daily
GOOG and on hourly EURUSD), including its conventions: daily returns from the equity's last value per calendar day
(per week / month / year for such data); 252 periods a year, or 365 when over 60 % of a 7-day week's share of bars
fall on weekends; annual return from the geometric mean daily return; volatility from the compounded variance;
Sortino on downside deviation; Calmar on the annual return; Beta on per-bar log returns against the close;
Alpha as Jensen's; drawdown durations between consecutive new equity highs (or the last bar); trade
statistics on closed trades only; "Buy & Hold" from the first bar every indicator is defined. Durations are
in days. Additions: the risk-free rate (annual) in Sharpe, Sortino and Alpha as backtesting.py's
``compute_stats(risk_free_rate=)`` does; LEAN's Probabilistic Sharpe Ratio (``Statistics.cs``: per-period
Sharpe of the excess daily returns against an annual benchmark Sharpe de-annualised by the square root of the
periods per year, sample skewness and LEAN's kurtosis term, normal CDF); turnover (filled value over mean
equity, and per year).

Dates: ``datetime64[D]`` day dates, or ``datetime64[s]`` UTC instants of intraday bars. What is annualised by what,
for every timeframe:

* Return (Ann.), Volatility (Ann.), Sharpe, Sortino, Calmar and the PSR use the *period returns*: the last equity
  of each calendar day (intraday bars: each UTC day, as backtesting.py resamples any data whose period is under a
  day to ``'D'``; weekly / monthly / yearly data: per week, month, year), annualised by "Periods per Year": 252
  or 365 (weekend share, as above) for daily and intraday data, 52, 12 or 1 for coarser data. Nothing here is
  annualised per bar: an hourly run's Sharpe is a daily Sharpe times ``sqrt(252)``, as backtesting.py's.
* CAGR and Turnover (Ann.) divide by the elapsed calendar time, ``Duration`` in years of 365.25 days.
* Alpha and Beta are not annualised: Beta is a ratio of per-bar log-return covariances, Alpha uses total returns.
* Exposure Time is a share of bars. Durations (Duration, drawdown and trade durations) are in days, fractional
  intraday (an hour is 1/24); as backtesting.py's ``_round_timedelta``, the maximum and mean drawdown and trade
  durations are rounded up to the resolution of the data period (the median spacing of the last 100 bars: whole
  days for daily data, whole hours for hourly, whole minutes for 5-minute bars), the mean after truncation to the
  microsecond (pandas' ``Timedelta`` mean).
* Per-bar annualisation happens outside this module only: the volatility-target risk model scales its per-bar
  volatility by ``sqrt(periods_per_year * Bars.bars_per_day)`` (``risk.py``); the validation portfolio takes each
  curve's last value per UTC day and annualises daily returns by 252 (``shared.domain.robustness.portfolio``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np
from numpy.typing import NDArray

from shared.domain.backtest.bars import format_bar_dates
from shared.domain.stats import TRADING_DAYS, sharpe_ratio

FloatArray = NDArray[np.float64]
MetricValue = float | int | str

_US = 1_000_000  # intraday times are handled in microseconds (pandas' unit of backtesting.py's sample data)
_DAY_US = 86_400 * _US
_UNITS_US = (_DAY_US, 3_600 * _US, 60 * _US, _US, 1_000, 1)  # D, h, min, s, ms, us


@dataclass(frozen=True)
class TradeColumns:
    """Closed trades, one entry per trade (the shape metrics need)."""

    size: FloatArray
    entry_bar: NDArray[np.int64]
    exit_bar: NDArray[np.int64]
    pnl: FloatArray
    return_pct: FloatArray
    commission: FloatArray


def _nan_mean(x: FloatArray) -> float:
    x = x[~np.isnan(x)]
    return float(x.mean()) if len(x) else math.nan


def _nan_max(x: FloatArray) -> float:
    x = x[~np.isnan(x)]
    return float(x.max()) if len(x) else math.nan


def _nan_min(x: FloatArray) -> float:
    x = x[~np.isnan(x)]
    return float(x.min()) if len(x) else math.nan


def _or_nan(x: float) -> float:
    """Python's ``x or nan``: zero becomes NaN (a NaN stays NaN)."""
    return x if x != 0 else math.nan


def geometric_mean(returns: FloatArray) -> float:
    """backtesting.py's geometric mean: 0 when any return is <= -100 %, NaN when empty."""
    growth = np.where(np.isnan(returns), 0.0, returns) + 1
    if np.any(growth <= 0):
        return 0.0
    if not len(growth):
        return math.nan
    return float(np.exp(np.log(growth).sum() / len(growth)) - 1)


def _ceil_days(total_days: float, count: int) -> float:
    """Mean of whole-day durations rounded up to a whole day (pandas ``Timedelta.mean().ceil('D')``)."""
    if count == 0:
        return math.nan
    return float(-(-int(total_days) // count))


def is_day_dates(dates: NDArray[np.datetime64]) -> bool:
    """Whether ``dates`` are day dates (``datetime64[D]``) rather than intraday instants."""
    return np.datetime_data(dates.dtype)[0] == "D"


def _ticks(dates: NDArray[np.datetime64]) -> tuple[NDArray[np.int64], int]:
    """(times as integers, ticks per day): days for day dates, microseconds for instants."""
    if is_day_dates(dates):
        return dates.astype(np.int64), 1
    return dates.astype("datetime64[us]").astype(np.int64), _DAY_US


def _median_spacing(ticks: NDArray[np.int64]) -> float:
    """backtesting.py's ``_data_period``: the median spacing of the last 100 bars (NaN for one bar)."""
    diffs = np.diff(ticks[-100:])
    return float(np.median(diffs)) if len(diffs) else math.nan


def _resolution(spacing_us: float) -> int:
    """pandas' ``Timedelta.resolution_string`` of the data period, in microseconds: the largest of D, h, min, s, ms,
    us that divides it (backtesting.py rounds durations up to it)."""
    if math.isnan(spacing_us):
        return _DAY_US
    period = int(spacing_us)  # pandas truncates the median to its unit
    return next((unit for unit in _UNITS_US if period % unit == 0), 1)


def _ceil_to(value_us: int, resolution_us: int) -> float:
    """``value_us`` rounded up to a multiple of ``resolution_us``, in days."""
    return -(-value_us // resolution_us) * resolution_us / _DAY_US


def _max_and_mean_duration(durations: FloatArray, per_day: int, resolution_us: int) -> tuple[float, float]:
    """backtesting.py's max and mean of durations, in days. Day dates: whole days, the mean rounded up to a day.
    Instants (``durations`` in microseconds): pandas' mean (truncated to the microsecond), both rounded up to the
    data period's resolution."""
    if per_day == 1:
        return _nan_max(durations), _ceil_days(float(durations.sum()), len(durations))
    if not len(durations):
        return math.nan, math.nan
    whole = durations.astype(np.int64)
    return _ceil_to(int(whole.max()), resolution_us), _ceil_to(int(whole.sum()) // len(whole), resolution_us)


def periods_per_year(dates: NDArray[np.datetime64]) -> tuple[int, int]:
    """(annual periods, bar period in whole days: 0 for intraday bars) detected the way backtesting.py does."""
    ticks, per_day = _ticks(dates)
    spacing = _median_spacing(ticks)
    period_days = 0 if math.isnan(spacing) else math.floor(spacing / per_day)
    days = ticks if per_day == 1 else dates.astype("datetime64[D]").astype(np.int64)
    weekday = (days + 3) % 7  # 1970-01-01 was a Thursday; Monday = 0
    have_weekends = float(np.mean(weekday >= 5)) > 2 / 7 * 0.6
    annual = (
        52
        if period_days == 7
        else 12
        if period_days == 31
        else 1
        if period_days == 365
        else (365 if have_weekends else TRADING_DAYS)
    )
    return annual, period_days


def period_bins(dates: NDArray[np.datetime64], period_days: int) -> NDArray[np.int64]:
    """Index of the last bar of each calendar day (week, month, year for such data): pandas' resample bins.
    Intraday instants fall in their UTC calendar day."""
    days = dates.astype("datetime64[D]").astype(np.int64)
    if period_days == 7:
        keys = (days + 3) // 7  # Monday..Sunday weeks (pandas 'W' = W-SUN bins)
    elif period_days == 31:
        keys = dates.astype("datetime64[M]").astype(np.int64)
    elif period_days == 365:
        keys = dates.astype("datetime64[Y]").astype(np.int64)
    else:
        keys = days
    return np.flatnonzero(np.r_[keys[1:] != keys[:-1], True]).astype(np.int64)


def period_returns(equity: FloatArray, dates: NDArray[np.datetime64], period_days: int) -> FloatArray:
    """Simple returns of the last equity value per day (week, month, year), NaNs dropped."""
    values = equity[period_bins(dates, period_days)]
    values = values[~np.isnan(values)]
    with np.errstate(divide="ignore", invalid="ignore"):
        returns = values[1:] / values[:-1] - 1
    return returns[~np.isnan(returns)]


def drawdown_durations_and_peaks(dd: FloatArray, days: NDArray[np.int64]) -> tuple[FloatArray, FloatArray]:
    """Duration (in the unit of ``days``: days, or microseconds for instants) and depth of each drawdown: from a new
    high to the next new high (or the last bar)."""
    n = len(dd)
    iloc = np.unique(np.r_[np.flatnonzero(dd == 0), n - 1])
    prev = iloc[:-1]
    cur = iloc[1:]
    keep = cur > prev + 1
    prev = prev[keep]
    cur = cur[keep]
    if not len(cur):
        # backtesting.py returns the non-zero drawdowns themselves here (not durations); we keep its
        # depth figure and report no duration
        quirk = np.where(dd == 0, np.nan, dd)
        return np.full(0, np.nan), quirk
    durations = (days[cur] - days[prev]).astype(np.float64)
    # max over each [prev, cur] (inclusive): reduceat over the boundaries, every other segment
    bounds = np.column_stack((prev, cur + 1)).ravel()
    peaks = np.maximum.reduceat(np.r_[dd, 0.0], bounds)[::2]
    return durations, peaks


def compute_metrics(
    *,
    equity: FloatArray,
    close: FloatArray,
    dates: NDArray[np.datetime64],
    trades: TradeColumns,
    first_trading_bar: int,
    risk_free_rate: float = 0.0,
    psr_benchmark_sharpe: float = 1.0,
    filled_value: float = 0.0,
    fees_paid: float = 0.0,
) -> dict[str, MetricValue]:
    """All metrics of one run (keys as backtesting.py names them, durations in days) on day dates or instants."""
    n = len(equity)
    ticks, per_day = _ticks(dates)
    resolution = _resolution(_median_spacing(ticks)) if per_day != 1 else 1
    with np.errstate(divide="ignore", invalid="ignore"):
        dd = 1 - equity / np.maximum.accumulate(equity)
    dd_durations, dd_peaks = drawdown_durations_and_peaks(dd, ticks)

    pl = trades.pnl
    returns = trades.return_pct
    n_trades = len(pl)
    trade_durations = (ticks[trades.exit_bar] - ticks[trades.entry_bar]).astype(np.float64)

    s: dict[str, MetricValue] = {}
    s["Start"] = format_bar_dates(dates[0])
    s["End"] = format_bar_dates(dates[-1])
    elapsed = int(ticks[-1] - ticks[0])
    duration_days, rest = divmod(elapsed, per_day)
    s["Duration"] = float(duration_days) if per_day == 1 else elapsed / _DAY_US

    have_position = np.zeros(n + 1, dtype=np.int64)
    np.add.at(have_position, trades.entry_bar, 1)
    np.add.at(have_position, trades.exit_bar + 1, -1)
    s["Exposure Time [%]"] = float(np.mean(np.cumsum(have_position[:n]) > 0) * 100)
    s["Equity Final [$]"] = float(equity[-1])
    s["Equity Peak [$]"] = float(equity.max())
    commissions = 0.0
    for c in trades.commission.tolist():  # backtesting.py: sum() in trade order
        commissions += c
    s["Commissions [$]"] = commissions
    total_return = (equity[-1] - equity[0]) / equity[0] * 100
    s["Return [%]"] = float(total_return)
    c0 = close[first_trading_bar]
    buy_hold = (close[-1] - c0) / c0 * 100
    s["Buy & Hold Return [%]"] = float(buy_hold)

    annual, period_days = periods_per_year(dates)
    day_returns = period_returns(equity, dates, period_days)
    gmean_day = geometric_mean(day_returns)
    annualized = (1 + gmean_day) ** annual - 1
    s["Return (Ann.) [%]"] = annualized * 100
    var = float(day_returns.var(ddof=1)) if len(day_returns) > 1 else math.nan
    with np.errstate(invalid="ignore"):
        volatility = float(np.sqrt((var + (1 + gmean_day) ** 2) ** annual - (1 + gmean_day) ** (2 * annual)) * 100)
    s["Volatility (Ann.) [%]"] = volatility
    years = (duration_days + rest // _US / 86400) / 365.25  # Timedelta's .days + .seconds / 86400
    s["CAGR [%]"] = ((equity[-1] / equity[0]) ** (1 / years) - 1) * 100 if years else math.nan
    # backtesting.py's Sharpe: annual geometric return over the compounded volatility (the golden tests hold it);
    # every other Sharpe of the product is shared.domain.stats.sharpe_ratio (the PSR's observed one below).
    s["Sharpe Ratio"] = (annualized * 100 - risk_free_rate * 100) / _or_nan(volatility)
    downside = np.sqrt(np.mean(np.clip(day_returns, -np.inf, 0) ** 2)) if len(day_returns) else math.nan
    with np.errstate(divide="ignore", invalid="ignore"):
        s["Sortino Ratio"] = float(np.float64(annualized - risk_free_rate) / (downside * np.sqrt(annual)))
    max_dd = -float(np.nan_to_num(_nan_max(dd)))
    s["Calmar Ratio"] = annualized / _or_nan(-max_dd)
    with np.errstate(divide="ignore", invalid="ignore"):
        equity_log_returns = np.log(equity[1:] / equity[:-1])
        market_log_returns = np.log(close[1:] / close[:-1])
        beta = math.nan
        if len(equity_log_returns) > 1:
            # np.cov's two entries (the ddof cancels in the ratio)
            x = equity_log_returns - equity_log_returns.mean()
            y = market_log_returns - market_log_returns.mean()
            beta = float(np.dot(x, y) / np.dot(y, y))
    s["Alpha [%]"] = float(total_return - risk_free_rate * 100 - beta * (buy_hold - risk_free_rate * 100))
    s["Beta"] = beta
    s["Max. Drawdown [%]"] = max_dd * 100
    s["Avg. Drawdown [%]"] = -_nan_mean(dd_peaks) * 100
    s["Max. Drawdown Duration"], s["Avg. Drawdown Duration"] = _max_and_mean_duration(dd_durations, per_day, resolution)
    s["# Trades"] = n_trades
    win_rate = math.nan if not n_trades else float(np.mean(pl > 0))
    s["Win Rate [%]"] = win_rate * 100
    s["Best Trade [%]"] = _nan_max(returns) * 100
    s["Worst Trade [%]"] = _nan_min(returns) * 100
    s["Avg. Trade [%]"] = geometric_mean(returns) * 100
    s["Max. Trade Duration"], s["Avg. Trade Duration"] = _max_and_mean_duration(trade_durations, per_day, resolution)
    s["Profit Factor"] = float(returns[returns > 0].sum()) / _or_nan(abs(float(returns[returns < 0].sum())))
    s["Expectancy [%]"] = _nan_mean(returns) * 100
    pl_std = float(pl.std(ddof=1)) if n_trades > 1 else math.nan
    s["SQN"] = math.sqrt(n_trades) * _nan_mean(pl) / _or_nan(pl_std)
    s["Kelly Criterion"] = win_rate - (1 - win_rate) / (_nan_mean(pl[pl > 0]) / -_nan_mean(pl[pl < 0]))

    # additions
    s["Risk-Free Rate [%]"] = risk_free_rate * 100
    s["Probabilistic Sharpe Ratio"] = probabilistic_sharpe_ratio(
        day_returns - risk_free_rate / annual, psr_benchmark_sharpe / math.sqrt(annual)
    )
    mean_equity = float(np.mean(equity))
    turnover = filled_value / mean_equity if mean_equity > 0 else math.nan
    s["Turnover [x]"] = turnover
    s["Turnover (Ann.) [x]"] = turnover / years if years else math.nan
    s["Fees Paid [$]"] = fees_paid
    s["Periods per Year"] = annual
    return {k: _plain(v) for k, v in s.items()}


def _plain(value: Any) -> MetricValue:
    if isinstance(value, str | int) and not isinstance(value, bool):
        return value
    return float(value)


def _normal_cdf(x: float) -> float:
    return 0.5 * math.erfc(-x / math.sqrt(2))


def probabilistic_sharpe_ratio(returns: FloatArray, benchmark_sharpe: float) -> float:
    """LEAN's PSR of per-period (excess) returns against a per-period benchmark Sharpe.

    Observed Sharpe = mean / sample std (not annualised); skewness and kurtosis are MathNet's bias-corrected
    sample estimators (LEAN passes the *excess* kurtosis into ``(kurtosis - 1) / 4``: kept as LEAN has it,
    so the figure matches LEAN's reports). ``sqrt((1 - skew*SR + (kurt-1)/4*SR^2) / (n-1))`` is the standard
    error; the PSR is the normal CDF of ``(SR - benchmark) / error`` (0 when undefined, as in LEAN).
    """
    n = len(returns)
    if n < 4:  # MathNet's kurtosis needs four samples; LEAN then reports 0
        return 0.0
    mean = float(returns.mean())
    sd = float(returns.std(ddof=1))
    if not sd > 0:
        return 0.0
    sharpe = sharpe_ratio(returns, periods_per_year=1)  # per period: mean / sample std
    z = (returns - mean) / sd
    z2 = z * z
    skew = n / ((n - 1) * (n - 2)) * float(np.dot(z2, z))
    kurt = (n + 1) * n / ((n - 1) * (n - 2) * (n - 3)) * float(np.dot(z2, z2)) - 3 * (n - 1) ** 2 / ((n - 2) * (n - 3))
    variance = (1 - skew * sharpe + (kurt - 1) / 4 * sharpe**2) / (n - 1)
    if not variance >= 0:  # NaN standard error: LEAN reports 0
        return 0.0
    if variance == 0:
        return 0.5
    return _normal_cdf((sharpe - benchmark_sharpe) / math.sqrt(variance))
