"""The one place that compiles our kernels with numba, with its on-disk cache.

Every kernel is compiled with ``cache=True``: the first process that runs a kernel writes the machine code next
to the kernel's module (the ``__pycache__`` of ``shared/domain/backtest`` or ``shared/domain/indicators``), and
every later process (a Celery worker pool process, a benchmark's fresh interpreter) loads it in milliseconds
instead of compiling for seconds. When such a folder is not writable (a read-only image, a worker running as
another user) and ``NUMBA_CACHE_DIR`` is unset, the cache goes to a per-user folder in the system temp directory
instead of numba raising "no locator available". ``python -m shared.domain.backtest.warmup`` compiles everything
ahead of time (for an image build or a deploy step). The sandbox's ``ta`` never imports this (no numba there).
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar, cast

import numba

F = TypeVar("F", bound=Callable[..., Any])

_DOMAIN_DIR = Path(__file__).resolve().parent
_KERNEL_PACKAGES = ("backtest", "indicators")  # the packages whose modules define kernels


def _ensure_cache_location() -> None:
    """Point numba at a writable cache folder when an in-tree ``__pycache__`` cannot be written."""
    if getattr(numba.config, "CACHE_DIR", ""):  # NUMBA_CACHE_DIR given by the operator: respect it
        return
    try:
        for package in _KERNEL_PACKAGES:
            pycache = _DOMAIN_DIR / package / "__pycache__"
            pycache.mkdir(exist_ok=True)
            probe = pycache / f".write-probe-{os.getpid()}"
            probe.touch()
            probe.unlink()
    except OSError:
        fallback = Path(tempfile.gettempdir()) / f"alphaforge-numba-{os.getuid()}"
        fallback.mkdir(mode=0o700, exist_ok=True)
        setattr(numba.config, "CACHE_DIR", str(fallback))  # noqa: B010 - not in numba's type hints


_ensure_cache_location()


def kernel(func: F) -> F:
    """Compile ``func`` in nopython mode, cached on disk, without the GIL (safe for threaded callers)."""
    return cast(F, numba.njit(cache=True, nogil=True)(func))
