"""Security events: every rejection of untrusted code is logged as one structured line.

(A ``security_events`` table and per-layer reporting arrive with the sandbox-hardening issue; the log
line carries the same fields so that nothing is lost in between.)
"""

from __future__ import annotations

import json
import logging
from typing import Any

log = logging.getLogger("alphaforge.security")

# Per-symbol error types that mean a sandbox layer (not the script's own logic) stopped the script.
SANDBOX_REJECTIONS = frozenset({"TimeoutError", "MemoryError", "SandboxError"})


def security_event(layer: str, reason: str, **context: Any) -> None:
    """Log one rejection: the layer that caught it, why, and who/what (job, symbol, owner) when known."""
    fields = {"event": "security", "layer": layer, "reason": reason[:500]}
    fields.update({k: str(v) for k, v in context.items() if v is not None})
    log.warning(json.dumps(fields, sort_keys=True))
