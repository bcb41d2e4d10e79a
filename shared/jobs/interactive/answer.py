"""An interactive run's result row as its endpoint's answer."""

from __future__ import annotations

from typing import Any

from shared.infra.models import Job, JobResult


def _data(row: JobResult | None) -> dict[str, Any]:
    return dict(row.data or {}) if row is not None else {}


def _error(job: Job, row: JobResult | None) -> dict[str, Any] | None:
    if row is None:  # the run's shard failed for good (its reason is the job's error)
        return {"type": "SandboxUnavailable", "message": job.error or "the run did not complete", "line": None}
    return row.error


def try_answer(job: Job, row: JobResult | None) -> dict[str, Any]:
    """``/try``: the value or the error (type, message, line), what the script printed, time and peak memory."""
    data = _data(row)
    return {
        "job_id": str(job.id),
        "status": job.status,
        "symbol": job.symbols[0],
        "value": row.value if row is not None else None,
        "error": _error(job, row),
        "output": data.get("output", ""),
        "output_truncated": bool(data.get("output_dropped")),
        "output_dropped": int(data.get("output_dropped", 0)),
        "execution_time": data.get("execution_time"),
        "memory_used_mb": data.get("memory_used_mb"),
    }


def execute_answer(job: Job, row: JobResult | None) -> dict[str, Any]:
    """``/api/security/execute``: the seed's fields (success, stdout, stderr, error_type, error_message,
    execution_time, memory_used_mb) and, when asked for and the snippet ran to its end, its locals."""
    data = _data(row)
    error = _error(job, row)
    answer: dict[str, Any] = {
        "job_id": str(job.id),
        "success": error is None,
        "stdout": data.get("output", ""),
        "stderr": "" if error is None else _traceback_line(error),
        "error_type": None if error is None else error.get("type"),
        "error_message": None if error is None else error.get("message"),
        "execution_time": data.get("execution_time"),
        "memory_used_mb": data.get("memory_used_mb"),
        "output_truncated": bool(data.get("output_dropped")),
    }
    if "locals" in data:
        answer["locals"] = data["locals"]
    return answer


def _traceback_line(error: dict[str, Any]) -> str:
    where = f"line {error['line']}: " if error.get("line") else ""
    return f"{where}{error.get('type', 'Error')}: {error.get('message', '')}\n"
