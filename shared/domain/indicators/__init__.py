"""The one indicator library: the sandbox's ``ta`` module and the backtest engine compute every indicator here.

* ``core``: the implementation of every indicator (NumPy, O(n) whatever the period, no numba: the sandbox
  process that runs ``ta`` cannot map executable memory once its seccomp filter is loaded);
* ``_windows``: the core's rolling-window machinery (block decomposition, re-anchored second moments);
* ``engine``: what the backtest engine uses (strategies, risk models, the parameter grid) under its names: the
  core's functions, plus the compiled pandas-exact SMA (``sma``, ``sma_matrix``, below).

This package imports nothing heavy on its own: ``import shared.domain.indicators.core`` never loads numba.

Definitions (n values in, n values out, aligned bar for bar; "p" the period; NaN during the warm-up):

=====================  =========================================================  ============  ==================
indicator              formula                                                    first valid   flat series
=====================  =========================================================  ============  ==================
sma                    mean of the last p values                                  p - 1         the value, exactly
wma                    weights 1..p, newest heaviest, / (p (p + 1) / 2)           p - 1         the value [1]
rolling_sum/max/min    sum / largest / smallest of the last p values              p - 1         p * value [1]; value
stdev (rolling_std)    sqrt(M2 / (p - ddof)); ddof 0 (population: ta's default,  p - 1         0, exactly
                       Bollinger) or 1 (sample: realized volatility)
zscore                 (value - sma) / stdev(ddof)                                p - 1         NaN (stdev 0)
bollinger              sma +/- k * stdev(ddof=0): (upper, middle, lower)          p - 1         the value, thrice
correlation            Pearson over the last p pairs, clipped to [-1, 1]          p - 1         NaN (no variance)
ema                    alpha 2 / (p + 1), seeded with the sma of the first p      p - 1         the value [1]
wilder                 Wilder's smoothing (RMA): alpha 1 / p, sma-seeded          p - 1         the value [1]
rsi                    Wilder-smoothed gains and losses of the changes, seeded    p             50
                       with their plain mean over the first p changes;
                       100 * gain / (gain + loss): 100 without losses, 0 without
                       gains
true_range             max(high - low, |high - prev close|, |low - prev close|)   1             0
atr                    Wilder's smoothing of true_range, seeded with the mean of  p             0
                       true ranges 1..p
macd                   line ema(fast) - ema(slow); signal: ema(signal) of the     slow - 1;     0 [1]
                       line; histogram: line - signal                             slow+signal-2
realized_volatility    stdev(ddof=1) of the last p log returns * sqrt(periods a   p             0
                       year; default shared.domain.stats.TRADING_DAYS = 252)
pct_change/log_returns value / value k bars earlier - 1; its log                  k             0
drawdown               value / running max - 1 (NaN where the running max <= 0)   0             0
crossover/crossunder   a > b now and a <= b on the previous bar (mirrored)        1 (bool)      False
=====================  =========================================================  ============  ==================

[1] to rounding (a few units in the last place), not exactly.

NaN rules: a window indicator (sma, wma, rolling sums/max/min, stdev, zscore, bollinger, correlation) is NaN for
every window holding a NaN and recovers once it has left the window (pandas' ``rolling(p)`` with the default
``min_periods``); a recursive indicator (ema, wilder, rsi, atr, macd, drawdown) skips leading NaNs (its warm-up
starts at the first value, so ``ema(rsi(x, 14), 5)`` works) and is NaN from the first later NaN on. Infinities
follow IEEE arithmetic inside their windows. A period longer than the series gives all NaN.

The one algorithmic exception is the engine's SMA: backtesting.py's reference strategies use pandas'
``rolling(p).mean()``, and the golden tests hold the engine's crossovers to it, so ``engine.sma`` is a compiled
sequential kernel that reproduces pandas bit for bit (its Kahan-compensated add and remove sums). A sequential
kernel cannot run in the sandbox (no numba there, and a pure-Python loop is ~100 times slower), so ``ta.sma`` is
the core's vectorised ``sma``: the same definition, the same NaN and flat-window rules, equal to within 1e-13
relative (tests/unit/test_indicator_definitions.py holds both to that).
"""
