"""The attack suite: every hostile script of tests/attacks.py, through the API and a real Celery worker.

Containment, checked for each: the job finishes; the attacking symbol's error names the reason; the symbol
after it in the same shard gets its correct value; the sandbox rejection is a security event the job view
explains; the worker process survives; no secret of the worker's environment appears in results, errors,
events or the worker's log; and the next job's values are correct.
"""

from __future__ import annotations

import json
import re
import subprocess
from typing import Any

import pytest
from flask.testing import FlaskClient
from sqlalchemy import Engine, func, select

from shared.infra.config import Settings
from shared.infra.models import Job, SecurityEvent
from tests.attacks import COMPILE_ATTACKS, RUNTIME_ATTACKS, Attack, CompileAttack
from tests.conftest import WORKER_LOG_NAME, WORKER_SECRET
from tests.helpers import all_results, seed_bars, wait_for_job

pytestmark = pytest.mark.usefixtures("celery_worker")

ADDRESS = re.compile(r"0x[0-9a-fA-F]{6,}")


def _submit(client: FlaskClient, script: str, symbols: list[str]) -> str:
    response = client.post(
        "/api/custom-calculations/execute", json={"script": script, "column_name": "attack", "stock_symbols": symbols}
    )
    assert response.status_code == 202, response.json
    return str(response.json["job_id"])  # type: ignore[index]


def _assert_no_secrets(settings: Settings, *texts: str) -> None:
    worker_log = (settings.data_dir / WORKER_LOG_NAME).read_text(errors="replace")
    for text in (*texts, worker_log):
        assert WORKER_SECRET not in text
        assert settings.require_database_url() not in text


@pytest.mark.parametrize("attack", RUNTIME_ATTACKS, ids=lambda a: a.name)
def test_runtime_attack_is_contained(
    attack: Attack,
    client: FlaskClient,
    engine: Engine,
    settings: Settings,
    celery_worker: subprocess.Popen[bytes],
) -> None:
    bars = seed_bars(engine, ["EVIL", "GOOD"], days=60)
    last_close = {symbol: rows[-1]["close"] for symbol, rows in bars.items()}

    job_id = _submit(client, attack.script, ["EVIL", "GOOD"])
    job = wait_for_job(client, job_id)
    results = {row["symbol"]: row for row in all_results(client, job_id)}
    evil, good = results["EVIL"], results["GOOD"]

    assert good == {"symbol": "GOOD", "value": last_close["GOOD"], "error": None}
    if attack.error is None:
        assert job["status"] == "succeeded"
        assert evil["error"] is None and evil["value"] == last_close["EVIL"]
    else:
        assert job["status"] == "partial"
        assert evil["value"] is None and evil["error"]["type"] == attack.error, evil
        message = evil["error"]["message"]
        assert len(message) <= settings.sandbox.max_error_chars and "\x00" not in message
        assert not ADDRESS.search(message)
        if attack.message:
            assert attack.message in message

    rejections = job["rejections"]
    if attack.incident is not None:
        layer, reason = attack.incident
        assert rejections["by_reason"].get(f"{layer}.{reason}", 0) >= 1, rejections
        event = next(e for e in rejections["events"] if (e["layer"], e["reason"]) == attack.incident)
        assert event["symbol"] == "EVIL" and event["explanation"]
    assert all(e["symbol"] == "EVIL" for e in rejections["events"])

    assert celery_worker.poll() is None, "the worker died"
    with engine.connect() as conn:
        details = [row.detail for row in conn.execute(select(SecurityEvent.detail))]
    _assert_no_secrets(settings, json.dumps(job), json.dumps(results), *details)

    canary = wait_for_job(client, _submit(client, "result = close[-1] + len(close)", ["EVIL", "GOOD"]))
    assert canary["status"] == "succeeded"
    values = {row["symbol"]: row["value"] for row in all_results(client, canary["job_id"])}
    assert values == {symbol: close + 60 for symbol, close in last_close.items()}


@pytest.mark.parametrize("attack", COMPILE_ATTACKS, ids=lambda a: a.name)
def test_compile_time_attack_is_refused_before_anything_is_written(
    attack: CompileAttack, client: FlaskClient, engine: Engine
) -> None:
    seed_bars(engine, ["EVIL"], days=5)
    response = client.post(
        "/api/custom-calculations/execute",
        json={"script": attack.script, "column_name": "attack", "stock_symbols": ["EVIL"]},
    )
    assert response.status_code == 422, response.json
    error: dict[str, Any] = response.json["error"]  # type: ignore[index]
    assert error["code"] == "script_compile_error"
    assert error["details"]["errors"][0]["field"] == "script" and error["details"]["errors"][0]["line"] >= 1
    with engine.connect() as conn:
        assert conn.scalar(select(func.count()).select_from(Job)) == 0
        events = conn.execute(select(SecurityEvent.layer, SecurityEvent.reason, SecurityEvent.job_id)).all()
    assert [(e.layer, e.reason, e.job_id) for e in events] == [("language", "compile_policy", None)]
