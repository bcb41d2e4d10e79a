"""A sandbox zygote whose children run *unrestricted* Python: what an attacker has after a RestrictedPython escape.

Everything else is the real thing: the zygote (shared/sandbox/zygote.py) with its network namespace and seccomp
program, the fork, each child's confinement (shared/sandbox/child.py) and the parent's supervision. Only the
language layer is taken away (the child compiles with ``compile`` and runs with real builtins), so tests can
check the layers below it as if it had already failed. Booted by tests only, through ``ForkServer(boot=BOOT)``.
"""

from __future__ import annotations

import sys
from typing import Any

BOOT = "import sys; sys.path.insert(0, sys.argv[1]); from tests.sandbox_escape import main; main(int(sys.argv[2]))"


def _unrestricted(source: str) -> Any:
    return compile(source, "<user-script>", "exec")


def _plain_globals(inputs: Any, violations: Any = None, output: Any = None) -> dict[str, Any]:
    """Real builtins (``open`` is the builtin again, not the bar series); the symbol and params only."""
    return {"__name__": "escape", "symbol": inputs.get("symbol"), "params": inputs.get("params")}


def main(control_fd: int) -> None:
    import mmap  # noqa: F401  (loaded before the filter, as an escaped script would find them)
    import resource  # noqa: F401
    import socket  # noqa: F401
    import threading  # noqa: F401

    from shared.sandbox import child, zygote

    child.compile_script = _unrestricted
    child.script_globals = _plain_globals
    zygote.main(control_fd)
    sys.exit(0)
