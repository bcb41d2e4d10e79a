"""Hostile scripts: each is contained to its own symbol and names the reason; the next symbol is fine.

These call the sandbox runner directly (no database or worker), for quick feedback on the classic bombs
and traversals; the full attack suite, through the API and a real worker, is tests/integration/
test_attack_suite.py with the catalogue in tests/attacks.py.
"""

from __future__ import annotations

import pytest

from shared.domain.sandbox.policy import compile_script
from shared.errors import ScriptCompileError
from shared.infra.config import SandboxLimits
from shared.sandbox.runner import run_script
from tests.unit.test_sandbox_runner import bars

LIMITS = SandboxLimits(symbol_timeout_s=1.5, memory_mb=512)

RUNTIME_ATTACKS = {
    "int power bomb": ("x = 10**10**8", "TimeoutError"),
    "factorial bomb": ("x = math.factorial(10**7)", "TimeoutError"),
    "string memory bomb": ("x = 'a' * 10**10", "MemoryError"),
    "list memory bomb": ("x = [0] * 10**10", "MemoryError"),
    "format width bomb": ("x = f'{1:>{10**10}}'", "MemoryError"),
    "ljust bomb": ("x = 'a'.ljust(10**10)", "MemoryError"),
    "shift bomb": ("x = 1 << 2**36", "MemoryError"),
    "join bomb": ("x = ''.join(['x'] * 10**9)", "MemoryError"),
    "unbounded recursion": ("def f(n):\n    return f(n + 1)\nx = f(0)", "RecursionError"),
    "output flood": ("while True:\n    print('x' * 10000)", "TimeoutError"),
    "exception-swallowing loop": (
        "while True:\n    try:\n        pass\n    except Exception:\n        pass",
        "TimeoutError",
    ),
    "huge range": ("x = range(10**12)", "SecurityViolation"),
    "no input": ("x = input()", "NameError"),
    "no exit": ("raise SystemExit(0)", "NameError"),
    "no classes": ("class A:\n    pass", "NameError"),
    "no os via statistics": ("import statistics\nx = statistics.sys", "AttributeError"),
    "no other modules": ("import os", "SecurityViolation"),
    "no str.format traversal": ("x = '{0.real}'.format(1)", "SecurityViolation"),
}

COMPILE_ATTACKS = {
    "dunder attribute": "x = ().__class__.__bases__",
    "generator frame": "g = (i for i in [1])\nx = g.gi_frame.f_back",
    "traceback frame": "try:\n    1 / 0\nexcept Exception as e:\n    x = e.__traceback__",
    "shadow guard": "def f(_getattr_=None):\n    return 1",
    "exec": "exec('x = 1')",
    "eval": "x = eval('1')",
    "try star": "try:\n    pass\nexcept* ValueError:\n    pass",
}


@pytest.mark.parametrize("name", sorted(RUNTIME_ATTACKS))
def test_runtime_attack_is_contained_to_its_symbol(name: str) -> None:
    attack, expected = RUNTIME_ATTACKS[name]
    body = "\n".join("    " + line for line in attack.splitlines())
    script = f"if symbol == 'EVIL':\n{body}\nresult = close[-1]"
    evil, good = run_script(script, {}, [bars("EVIL"), bars("GOOD")], LIMITS)
    assert evil.value is None and evil.error is not None
    assert evil.error["type"] == expected, evil.error
    assert good.error is None and good.value == 149.0


@pytest.mark.parametrize("name", sorted(COMPILE_ATTACKS))
def test_compile_time_attack_is_refused(name: str) -> None:
    with pytest.raises(ScriptCompileError):
        compile_script(COMPILE_ATTACKS[name])
