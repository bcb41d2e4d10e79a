"""Security events: every rejection of untrusted code, by the layer that caught it.

Each one is a row of ``security_events`` (who, which job and symbol, which layer, why) and one JSON line
on the ``alphaforge.security`` logger, so that operators can alert on the log and audit from the table.
"""

from __future__ import annotations

import json
import logging
import uuid
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

from sqlalchemy import func, select
from sqlalchemy.orm import Session, sessionmaker

from shared.errors import ScriptCompileError
from shared.infra.models import SecurityEvent

log = logging.getLogger("alphaforge.security")

# The layers of the sandbox (README, "The sandbox") and the reasons each one rejects for, in plain words.
REASONS: dict[str, dict[str, str]] = {
    "language": {
        "compile_policy": "the script uses something the sandbox does not allow, so it was not run",
        "policy_violation": "the script tried a forbidden import, attribute or object and was refused",
        "resource_limit": "the script asked for more than a sandbox limit allows (such as a huge range)",
    },
    "process": {
        "memory_limit": "the script ran out of its memory allowance",
        "cpu_limit": "the script used up its CPU-time allowance and was stopped by the kernel",
        "killed": "the sandbox process was killed (most likely for memory) while running the script",
        "crashed": "the sandbox process ended unexpectedly while running the script",
    },
    "seccomp": {
        "seccomp_kill": "the script attempted a forbidden system call and its process was killed",
    },
    "supervisor": {
        "wall_clock_timeout": "the script ran past its time limit and was stopped",
        "output_limit": "the script produced more output than allowed and was stopped",
        "protocol_violation": "the sandbox process sent something other than a result and was stopped",
    },
    "result": {
        "invalid_result": "the script's result was not a finite number or None",
        "invalid_signals": "the strategy script's entries/exits or position were not one bool or number per bar",
    },
}

MAX_DETAIL_CHARS = 500

# Redis hash where each worker publishes the sandbox layers its host could apply (worker/sandbox_probe.py);
# ``/api/health`` reports them: hostname -> {"layers": {name: active}, "checked_at": iso time}.
SANDBOX_LAYERS_KEY = "alphaforge:sandbox_layers"


@dataclass(frozen=True)
class Incident:
    """One rejection seen while running a script for a symbol (before it is tied to a job)."""

    layer: str
    reason: str
    detail: str = ""

    def plain_words(self) -> str:
        return REASONS.get(self.layer, {}).get(self.reason, f"rejected by the {self.layer} layer ({self.reason})")


def is_known(layer: object, reason: object) -> bool:
    return isinstance(layer, str) and isinstance(reason, str) and reason in REASONS.get(layer, {})


def log_event(layer: str, reason: str, detail: str = "", **context: Any) -> None:
    """The structured log line of one event."""
    fields = {"event": "security", "layer": layer, "reason": reason, "detail": detail[:MAX_DETAIL_CHARS]}
    fields.update({k: str(v) for k, v in context.items() if v is not None})
    log.warning(json.dumps(fields, sort_keys=True))


def record(
    factory: sessionmaker[Session],
    incidents: Iterable[tuple[str | None, Incident]],
    *,
    job_id: uuid.UUID | None = None,
    owner_id: str | None = None,
) -> int:
    """Store ``(symbol, incident)`` pairs as events of one job (or of none, at submission) and log each."""
    rows = [
        SecurityEvent(
            owner_id=owner_id,
            job_id=job_id,
            symbol=symbol,
            layer=incident.layer,
            reason=incident.reason,
            detail=incident.detail[:MAX_DETAIL_CHARS],
        )
        for symbol, incident in incidents
    ]
    if not rows:
        return 0
    with factory.begin() as session:
        session.add_all(rows)
    for row in rows:
        log_event(row.layer, row.reason, row.detail, job=job_id, symbol=row.symbol, owner=owner_id)
    return len(rows)


def record_compile_refusal(factory: sessionmaker[Session], exc: ScriptCompileError, *, owner_id: str | None) -> None:
    """A script refused by the compile policy (not one with a plain syntax error) is a language-layer event."""
    if not exc.reason.startswith(("SyntaxError", "IndentationError", "TabError")):
        record(factory, [(None, Incident("language", "compile_policy", exc.message))], owner_id=owner_id)


MAX_LISTED = 100


def job_rejections(session: Session, job_id: uuid.UUID) -> dict[str, Any]:
    """What the sandbox rejected in one job: counts by reason and the first events, in plain words."""
    counts = session.execute(
        select(SecurityEvent.layer, SecurityEvent.reason, func.count())
        .where(SecurityEvent.job_id == job_id)
        .group_by(SecurityEvent.layer, SecurityEvent.reason)
    ).all()
    total = sum(n for _, _, n in counts)
    events: Sequence[SecurityEvent] = (
        session.scalars(
            select(SecurityEvent)
            .where(SecurityEvent.job_id == job_id)
            .order_by(SecurityEvent.symbol, SecurityEvent.id)
            .limit(MAX_LISTED)
        ).all()
        if total
        else []
    )
    return {
        "total": total,
        "by_reason": {f"{layer}.{reason}": n for layer, reason, n in sorted(counts)},
        "events": [
            {
                "symbol": e.symbol,
                "layer": e.layer,
                "reason": e.reason,
                "explanation": Incident(e.layer, e.reason).plain_words(),
                "detail": e.detail,
            }
            for e in events
        ],
        "truncated": total > len(events),
    }
