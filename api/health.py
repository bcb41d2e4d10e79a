"""Health: ``GET /api/health/live`` (liveness), ``GET /api/health`` (the operator's view) and ``GET /api/health/ready``
(readiness, for load balancers and rolling deploys).

Liveness answers from the process itself: no database, broker or worker is asked, so it cannot hang.

The other two come from one :class:`HealthChecker` per API process, which owns connections of its own (a PostgreSQL
engine of at most two connections, a Redis client and a Celery app with its own broker pool): a probe never borrows
a connection that requests need. Celery's ``control`` broadcasts take a connection from a broker pool and then a
second one for the producer, so concurrent broadcasts on the requests' pool could hold every connection and wait
for ever; here at most one check runs at a time (single-flight), every step of it has a hard timeout, and its
answer serves every probe for ``ALPHAFORGE_HEALTH_CACHE`` seconds. A probe waits at most
``ALPHAFORGE_HEALTH_BUDGET`` for a check in flight, then answers 503 with what is known. A storm of probes costs
one check.
"""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Callable
from functools import cache
from typing import Any

import redis
from alembic.script import ScriptDirectory
from celery import Celery
from flask import Response, current_app, jsonify
from flask_openapi3 import APIBlueprint, Tag
from redis.backoff import NoBackoff
from redis.retry import Retry
from sqlalchemy import Engine, text

from api import services
from api.schemas import HealthView
from shared.contract import create_celery
from shared.infra.config import Settings
from shared.infra.db import Bounds, make_engine
from shared.infra.migrate import alembic_config
from shared.infra.security import SANDBOX_LAYERS_KEY

bp = APIBlueprint("health", __name__, url_prefix="/api", abp_tags=[Tag(name="health")])

QUEUE_NAMES = ("sandbox", "interactive", "bulk", "maintenance")
PRIORITY_SEP = "\x06\x16"  # kombu's Redis transport: "<queue>\x06\x16<priority>" for priorities above 0
WORKER_REPLY_S = 1.0  # how long the check waits for workers to answer its broadcast
STEP_TIMEOUT_S = 1.0  # each database and Redis call of a check
_CHECKER_KEY = "alphaforge_health_checker"
_checker_lock = threading.Lock()


@cache
def _migration_heads(database_url: str) -> frozenset[str]:
    return frozenset(ScriptDirectory.from_config(alembic_config(database_url)).get_heads())


def _timed(check: Callable[[], dict[str, Any] | None]) -> dict[str, Any]:
    started = time.perf_counter()
    try:
        info = check() or {}
        ok = info.pop("ok", True)
        return {"ok": ok, "latency_ms": round(1000 * (time.perf_counter() - started), 1), **info}
    except Exception as exc:
        return {"ok": False, "error": f"{type(exc).__name__}: {exc}"[:300]}


class HealthChecker:
    """One per API process: runs the checks on its own connections, one at a time, and caches the answer."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.cache_s = settings.timeouts.health_cache_s
        self.budget_s = settings.timeouts.health_budget_s
        step = STEP_TIMEOUT_S
        self.engine: Engine = make_engine(
            settings.require_database_url(), pool_size=1, bounds=Bounds(step, step, step, step, 10.0, step)
        )
        self.redis = redis.Redis.from_url(settings.require_redis_url(), socket_connect_timeout=step,
                                          socket_timeout=step, retry=Retry(NoBackoff(), 0))  # fmt: skip
        self.celery: Celery = create_celery(settings, set_as_current=False)
        self.celery.conf.broker_connection_timeout = step
        transport = dict(self.celery.conf.broker_transport_options)
        self.celery.conf.broker_transport_options = transport | {"socket_timeout": step, "socket_connect_timeout": step}
        self._cond = threading.Condition()
        self._result: dict[str, Any] | None = None
        self._checked_at = 0.0
        self._generation = 0  # completed checks
        self._running = False

    def report(self) -> dict[str, Any]:
        """The latest check if fresh; else the one in flight (or a new one), waited for at most the budget."""
        with self._cond:
            if self._result is not None and time.monotonic() - self._checked_at < self.cache_s:
                return self._result
            wanted = self._generation + 1  # the check in flight, or the one started now
            if not self._running:
                self._running = True
                threading.Thread(target=self._check_in_background, name="health-check", daemon=True).start()
            if self._cond.wait_for(lambda: self._generation >= wanted, timeout=self.budget_s):
                assert self._result is not None
                return self._result
        unknown = {"ok": False, "error": f"no answer within {self.budget_s:g} s (ALPHAFORGE_HEALTH_BUDGET)"}
        return {"database": unknown, "broker": unknown, "workers": unknown, "sandbox": unknown, "queues": unknown}

    def _check_in_background(self) -> None:
        try:
            result = self.check()
        except Exception as exc:  # a bug must not leave every later probe waiting
            failed = {"ok": False, "error": f"{type(exc).__name__}: {exc}"[:300]}
            result = {"database": failed, "broker": failed, "workers": failed, "sandbox": failed, "queues": failed}
        with self._cond:
            self._result, self._checked_at = result, time.monotonic()
            self._generation += 1
            self._running = False
            self._cond.notify_all()

    def check(self) -> dict[str, Any]:
        """Database (and its migrations), broker, workers (with the queues they consume), sandbox layers, queues."""
        consumers: dict[str, list[dict[str, Any]]] = {}

        def database() -> dict[str, Any]:
            with self.engine.connect() as conn:
                current = set(conn.scalars(text("SELECT version_num FROM alembic_version")))
            expected = _migration_heads(self.settings.require_database_url())
            return {"at_head": current == expected, "revision": sorted(current), "expected": sorted(expected)}

        def broker() -> None:
            self.redis.ping()

        def workers() -> dict[str, Any]:
            consumers.update(self.celery.control.inspect(timeout=WORKER_REPLY_S).active_queues() or {})
            return {"ok": bool(consumers), "count": len(consumers), "names": sorted(consumers)}

        def sandbox() -> dict[str, Any]:
            names = sorted(consumers)
            raw = self.redis.hmget(SANDBOX_LAYERS_KEY, names) if names else []
            per_worker = {name: json.loads(value) if value else None for name, value in zip(names, raw, strict=True)}
            inactive = []
            for name, rec in per_worker.items():
                if not rec:
                    inactive.append(f"{name}: not probed")
                else:
                    inactive.extend(f"{name}: {layer}" for layer, on in sorted(rec["layers"].items()) if not on)
            return {"ok": not inactive, "workers": per_worker, "inactive": inactive}

        def queues() -> dict[str, Any]:
            pipe = self.redis.pipeline(transaction=False)
            for queue in QUEUE_NAMES:
                for priority in range(10):
                    pipe.llen(queue if priority == 0 else f"{queue}{PRIORITY_SEP}{priority}")
            lengths = pipe.execute()
            per_queue = {
                queue: {
                    "depth": sum(lengths[i * 10 : (i + 1) * 10]),
                    "workers": sum(1 for qs in consumers.values() if any(q.get("name") == queue for q in qs or [])),
                }
                for i, queue in enumerate(QUEUE_NAMES)
            }
            return {"ok": per_queue["interactive"]["workers"] > 0, **per_queue}

        result = {"database": _timed(database), "broker": _timed(broker)}
        down = {"ok": False, "error": "broker unreachable"}
        result["workers"] = _timed(workers) if result["broker"]["ok"] else down
        result["sandbox"] = _timed(sandbox) if result["workers"]["ok"] else {"ok": False, "error": "no worker answered"}
        result["queues"] = _timed(queues) if result["broker"]["ok"] else down
        return result

    def close(self) -> None:
        self.engine.dispose()
        self.redis.close()
        self.celery.close()


def checker() -> HealthChecker:
    found: HealthChecker | None = current_app.extensions.get(_CHECKER_KEY)
    if found is None:
        with _checker_lock:
            found = current_app.extensions.get(_CHECKER_KEY)
            if found is None:
                found = current_app.extensions[_CHECKER_KEY] = HealthChecker(services().settings)
    return found


@bp.get("/health/live")
def live() -> Response:
    """Liveness: this process serves requests. Asks nothing of any other service."""
    return jsonify({"status": "alive"})


@bp.get("/health", responses={200: HealthView, 503: HealthView})
def health() -> Response:
    """200 when the database and broker answer ("degraded" if no worker does, or a worker runs user code
    without every sandbox layer); 503 otherwise. Cached for ALPHAFORGE_HEALTH_CACHE seconds."""
    report = checker().report()
    view = {name: {k: v for k, v in report[name].items() if k not in ("at_head", "revision", "expected")}
            for name in ("database", "broker", "workers", "sandbox")}  # fmt: skip
    core_ok = view["database"]["ok"] and view["broker"]["ok"]
    all_ok = core_ok and view["workers"]["ok"] and view["sandbox"]["ok"]
    status = "ok" if all_ok else ("degraded" if core_ok else "unavailable")
    response = jsonify(HealthView(status=status, **view).model_dump(mode="json"))
    response.status_code = 200 if core_ok else 503
    return response


@bp.get("/health/ready")
def ready() -> Response:
    """Readiness: the database answers with the migrations at the code's head, the broker answers, and at least
    one worker answers, one of them consuming ``interactive``; with each queue's depth and consumers (``queues``).
    200 when all hold, 503 otherwise."""
    report = checker().report()
    database = dict(report["database"])
    database["ok"] = bool(database.pop("at_head", False)) and database["ok"]
    workers = {k: v for k, v in report["workers"].items() if k != "names"}
    checks = {"database": database, "broker": report["broker"], "workers": workers, "queues": report["queues"]}
    ok = all(c["ok"] for c in checks.values())
    response = jsonify({"status": "ready" if ok else "not_ready", **checks})
    response.status_code = 200 if ok else 503
    return response
