"""What ``alphaforge up`` prints once the API answers: the banner with every address, and the readiness probe that
decides when (at most once a second, each probe with a short timeout, never again once announced: a probe of ours
must not add to the load on the health check)."""

from __future__ import annotations

import logging
import time
import urllib.request
from urllib.parse import urlsplit, urlunsplit

from shared.infra.config import Settings

log = logging.getLogger("alphaforge.up")

API_READY_TIMEOUT_S = 90.0
# What `up` polls before it prints the banner: at most once a second, each with a short timeout, and never again
# once announced (a probe of ours must not add to the load on the health check).
READY_PATH = "/api/health"
READY_PROBE_INTERVAL_S = 1.0
# One probe at a time, so it holds at most one request thread. Today's /api/health waits out its worker ping (1 s):
# the timeout is above that.
READY_PROBE_TIMEOUT_S = 3.0


def mask_url(url: str) -> str:
    """The URL with its password (if any) replaced by ``***``."""
    parts = urlsplit(url)
    if not parts.password:
        return url
    host = parts.netloc.rpartition("@")[2]
    return urlunsplit(parts._replace(netloc=f"{parts.username or ''}:***@{host}"))


_NO_PROXY = urllib.request.build_opener(urllib.request.ProxyHandler({}))  # never send localhost to a proxy


def _http_ok(url: str, timeout_s: float = READY_PROBE_TIMEOUT_S) -> bool:
    try:
        with _NO_PROXY.open(url, timeout=timeout_s) as resp:
            return int(resp.status) == 200
    except (OSError, ValueError):
        return False


def banner(
    settings: Settings,
    database_url: str,
    redis_url: str,
    demo: tuple[str, str] | None = None,
    flower: tuple[str, str] | None = None,
) -> str:
    base = f"http://{settings.api_host}:{settings.api_port}"
    flower_url = f"http://{settings.api_host}:{settings.flower_port}"
    flower_login = f" (username {flower[0]!r}, password {flower[1]!r})" if flower else " (FLOWER_BASIC_AUTH)"
    login = [f"  demo login  username {demo[0]!r}, password {demo[1]!r} (POST {base}/api/auth/login)"] if demo else []
    return "\n".join(
        [
            "",
            "AlphaForge is running (Ctrl-C to stop)",
            f"  API       {base}/api",
            f"  API docs  {base}/api/docs",
            f"  health    {base}{READY_PATH}",
            f"  Flower    {flower_url}{flower_login}",
            f"  database  {mask_url(database_url)}",
            f"  redis     {mask_url(redis_url)}",
            f"  data dir  {settings.data_dir}",
            *login,
            "",
        ]
    )


class ReadyAnnouncer:
    """Prints the banner once the API's health check answers 200, or after ``API_READY_TIMEOUT_S`` with a warning;
    :meth:`tick` is called from the supervisor's loop and probes at most every ``READY_PROBE_INTERVAL_S``."""

    def __init__(self, ready_url: str, text: str) -> None:
        self.ready_url = ready_url
        self.text = text
        self.started = time.monotonic()
        self.next_probe = self.started
        self.announced = False

    def tick(self) -> None:
        now = time.monotonic()
        if self.announced or now < self.next_probe:
            return
        self.next_probe = now + READY_PROBE_INTERVAL_S
        if _http_ok(self.ready_url):
            print(self.text, flush=True)
            self.announced = True
        elif now - self.started > API_READY_TIMEOUT_S:
            log.warning("%s has not answered 200 within %.0f s; still running", self.ready_url, API_READY_TIMEOUT_S)
            print(self.text, flush=True)
            self.announced = True
