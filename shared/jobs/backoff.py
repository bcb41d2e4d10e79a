"""Retry delays: capped exponential backoff with full jitter (AWS, "Exponential Backoff And Jitter").

``delay = uniform(0, min(cap, base * 2 ** attempt))``: many clients that failed together (a database outage ends,
a webhook receiver comes back) spread their retries over the whole window instead of all retrying at once.
"""

from __future__ import annotations

import random
from collections.abc import Callable

Uniform = Callable[[float, float], float]  # (low, high) -> a value in [low, high]; random.uniform by default


def ceiling_s(attempt: int, base_s: float, cap_s: float) -> float:
    """The longest wait before retry ``attempt`` (0-based): ``base_s * 2 ** attempt``, at most ``cap_s``."""
    if attempt < 0:
        raise ValueError(f"attempt must be >= 0, got {attempt}")
    # 2.0 ** attempt overflows past about 1024 doublings: any attempt that large is at the cap anyway
    return float(min(cap_s, base_s * 2.0 ** min(attempt, 1000)))


def full_jitter_s(attempt: int, base_s: float, cap_s: float, *, uniform: Uniform = random.uniform) -> float:
    """Seconds to wait before retry ``attempt`` (0-based): drawn uniformly from [0, :func:`ceiling_s`]."""
    high = ceiling_s(attempt, base_s, cap_s)
    return min(high, max(0.0, uniform(0.0, high)))
