"""``GET /api/health``: database, broker and worker reachability."""

from __future__ import annotations

import json
import time
from typing import Any

from flask import Response, jsonify
from flask_openapi3 import APIBlueprint, Tag
from sqlalchemy import text

from api import services
from api.schemas import HealthView
from shared.security import SANDBOX_LAYERS_KEY

bp = APIBlueprint("health", __name__, url_prefix="/api", abp_tags=[Tag(name="health")])

WORKER_PING_TIMEOUT_S = 1.0


def _timed(check: Any) -> dict[str, Any]:
    started = time.perf_counter()
    try:
        info = check() or {}
        return {"ok": True, "latency_ms": round(1000 * (time.perf_counter() - started), 1), **info}
    except Exception as exc:
        return {"ok": False, "error": f"{type(exc).__name__}: {exc}"[:300]}


@bp.get("/health", responses={200: HealthView, 503: HealthView})
def health() -> Response:
    """200 when the database and broker answer ("degraded" if no worker does, or a worker runs user code
    without every sandbox layer); 503 otherwise."""
    svc = services()

    def database() -> None:
        with svc.engine.connect() as conn:
            conn.execute(text("SELECT 1"))

    def broker() -> None:
        svc.redis.ping()

    def workers() -> dict[str, Any]:
        replies = svc.celery.control.ping(timeout=WORKER_PING_TIMEOUT_S) or []
        names = sorted(name for reply in replies for name in reply)
        return {"count": len(names), "names": names}

    def sandbox() -> dict[str, Any]:
        names = view["workers"].get("names") or []
        raw = svc.redis.hmget(SANDBOX_LAYERS_KEY, names) if names else []
        per_worker = {name: json.loads(value) if value else None for name, value in zip(names, raw, strict=True)}
        inactive = []
        for name, rec in per_worker.items():
            if not rec:
                inactive.append(f"{name}: not probed")
            else:
                inactive.extend(f"{name}: {layer}" for layer, on in sorted(rec["layers"].items()) if not on)
        return {"workers": per_worker, "inactive": inactive}

    view = {"database": _timed(database), "broker": _timed(broker)}
    view["workers"] = _timed(workers) if view["broker"]["ok"] else {"ok": False, "error": "broker unreachable"}
    if view["workers"].get("ok") and not view["workers"].get("count"):
        view["workers"]["ok"] = False
    view["sandbox"] = _timed(sandbox) if view["workers"]["ok"] else {"ok": False, "error": "no worker answered"}
    if view["sandbox"].get("inactive"):
        view["sandbox"]["ok"] = False
    core_ok = view["database"]["ok"] and view["broker"]["ok"]
    all_ok = core_ok and view["workers"]["ok"] and view["sandbox"]["ok"]
    status = "ok" if all_ok else ("degraded" if core_ok else "unavailable")
    response = jsonify(HealthView(status=status, **view).model_dump(mode="json"))
    response.status_code = 200 if core_ok else 503
    return response
