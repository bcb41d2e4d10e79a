"""At worker start: check which sandbox layers this host can apply, say so once, and publish it; and start each pool
process's sandbox zygote, so that its first shard does not wait for one.

The API's ``/api/health`` reads what each live worker published, so an operator sees a host where (say)
seccomp or the network namespace is unavailable, instead of a sandbox that silently pretends.
"""

from __future__ import annotations

import datetime as dt
import json
import logging
from typing import Any

import redis
from celery.signals import worker_process_init, worker_ready

from shared.infra.config import Settings
from shared.infra.security import SANDBOX_LAYERS_KEY
from shared.sandbox import forkserver
from shared.sandbox.runner import probe_layers

log = logging.getLogger(__name__)


def publish_layers(settings: Settings, hostname: str, layers: dict[str, bool]) -> None:
    client = redis.Redis.from_url(settings.require_redis_url())
    try:
        record = {"layers": layers, "checked_at": dt.datetime.now(dt.UTC).isoformat()}
        client.hset(SANDBOX_LAYERS_KEY, hostname, json.dumps(record))
    finally:
        client.close()


@worker_ready.connect
def _probe_at_start(sender: Any = None, **_: Any) -> None:
    settings: Settings = sender.app.conf.alphaforge_settings
    try:
        layers = probe_layers(settings.sandbox)
    except Exception:
        log.exception("sandbox probe failed: user scripts cannot run on this worker")
        layers = {}
    inactive = sorted(name for name, active in layers.items() if not active)
    log.info("sandbox layers active: %s%s", sorted(n for n, a in layers.items() if a),
             f"; NOT active: {inactive}" if inactive else "")  # fmt: skip
    try:
        publish_layers(settings, sender.hostname, layers)
    except redis.RedisError:
        log.warning("could not publish the sandbox layers to Redis", exc_info=True)


@worker_process_init.connect
def _start_zygote(sender: Any = None, **_: Any) -> None:
    """A pool process's zygote starts with it (its import of numpy overlaps the pool's start-up); a failure here is
    only logged: the first shard starts one, or retries."""
    from celery import current_app

    settings: Settings = current_app.conf.alphaforge_settings
    try:
        forkserver.for_this_process(settings.sandbox.zygote_forks).start()
    except forkserver.SandboxUnavailable:
        log.warning("could not start the sandbox zygote of this pool process", exc_info=True)
