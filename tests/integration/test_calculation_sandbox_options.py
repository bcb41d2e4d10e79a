"""A calculation job's own sandbox options through the API and a real worker: print capture (bounded per symbol and
per job), and its timeout and memory within the operator's bounds."""

from __future__ import annotations

from typing import Any

import pytest
from flask.testing import FlaskClient
from sqlalchemy import Engine, func, select

from shared.infra.models import Job
from tests.helpers import all_results, seed_bars, wait_for_job
from tests.integration.test_calculation_jobs import submit

pytestmark = pytest.mark.usefixtures("celery_worker")


def test_print_output_is_kept_per_symbol_when_asked(client: FlaskClient, engine: Engine) -> None:
    symbols = ["PA", "PB", "PC"]
    seed_bars(engine, symbols, days=30)
    script = "print('last', close[-1], 'of', symbol)\nif symbol == 'PC':\n    print('x' * 20000)\nresult = 1"
    job = wait_for_job(client, submit(client, script=script, column_name="p", stock_symbols=symbols,
                                      capture_output=True)["job_id"])  # fmt: skip
    assert job["status"] == "succeeded"
    rows = {r["symbol"]: r for r in all_results(client, job["job_id"])}
    assert rows["PA"]["output"].startswith("last ") and rows["PA"]["output"].endswith(" of PA\n")
    assert rows["PA"]["output_dropped"] == 0
    assert len(rows["PC"]["output"]) == 10_000 and rows["PC"]["output_dropped"] > 10_000  # bounded, marked
    plain = wait_for_job(client, submit(client, script=script, column_name="q", stock_symbols=symbols)["job_id"])
    assert all("output" not in r for r in all_results(client, plain["job_id"]))  # not asked: not kept


def test_a_job_s_timeout_and_memory_apply_to_its_symbols(client: FlaskClient, engine: Engine) -> None:
    seed_bars(engine, ["TA", "TB"], days=30)
    script = "if symbol == 'TA':\n    while True:\n        pass\nx = 'a' * (200 * 2**20)\nresult = len(x)"
    job = wait_for_job(client, submit(client, script=script, column_name="t", stock_symbols=["TA", "TB"],
                                      timeout=1, memory_mb=64)["job_id"])  # fmt: skip
    rows = {r["symbol"]: r for r in all_results(client, job["job_id"])}
    assert rows["TA"]["error"]["type"] == "TimeoutError" and "1 s time limit" in rows["TA"]["error"]["message"]
    assert rows["TB"]["error"]["type"] == "MemoryError"  # 200 MB is past the job's 64 MB
    roomy = wait_for_job(client, submit(client, script=script.replace("'TA'", "'none'"), column_name="u",
                                        stock_symbols=["TB"], memory_mb=512)["job_id"])  # fmt: skip
    assert all_results(client, roomy["job_id"])[0]["value"] == 200 * 2**20


@pytest.mark.parametrize(
    ("field", "value", "message"),
    [
        ("timeout", 0.5, "timeout must be between 1 and 300 seconds"),
        ("timeout", 301, "timeout must be between 1 and 300 seconds"),
        ("memory_mb", 32, "memory_mb must be between 64 and 2048"),
        ("memory_mb", 4096, "memory_mb must be between 64 and 2048"),
        ("capture_output", "yes", "bool"),
    ],
)
def test_options_outside_the_operator_s_bounds_are_a_422_naming_the_field(
    client: FlaskClient, engine: Engine, field: str, value: Any, message: str
) -> None:
    body = {"script": "result = 1", "column_name": "c", "stock_symbols": ["AA"], field: value}
    response = client.post("/api/custom-calculations/execute", json=body)
    assert response.status_code == 422, response.json
    error = response.json["error"]  # type: ignore[index]
    assert field in str(error) and message in str(error)
    with engine.connect() as conn:
        assert conn.scalar(select(func.count()).select_from(Job)) == 0  # nothing written
