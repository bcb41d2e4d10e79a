"""The language layer: compile policy, builtins whitelist, module facades."""

from __future__ import annotations

import pytest

from shared.errors import ScriptCompileError
from shared.sandbox.policy import ALLOWED_MODULES, SAFE_BUILTINS, compile_script, script_globals


def run(source: str, **inputs: object) -> dict[str, object]:
    namespace = script_globals(inputs)
    exec(compile_script(source), namespace)
    return namespace


@pytest.mark.parametrize(
    ("source", "line"),
    [
        ("x = (", 1),
        ("x = 1\nif x:\nresult = 2", 3),
        ("x = 1\nresult = x._private", 2),
        ("import os\n\nexec('1')", 3),
        ("result = 1\nclass A:\n    __slots__ = ()\n    def __init__(self): pass", 3),
        ("y = 2\nresult = y.__class__", 2),
    ],
)
def test_compile_errors_carry_the_line(source: str, line: int) -> None:
    with pytest.raises(ScriptCompileError) as info:
        compile_script(source)
    assert info.value.line == line
    assert info.value.details["errors"][0]["field"] == "script"


def test_nul_and_pathological_nesting_are_compile_errors_not_crashes() -> None:
    with pytest.raises(ScriptCompileError):
        compile_script("x = 1\x00")
    with pytest.raises(ScriptCompileError):
        compile_script("x = " + "(" * 5000 + ")" * 5000)
    with pytest.raises(ScriptCompileError):
        compile_script("x = " + "-" * 200_000 + "1")


def test_dangerous_builtins_are_absent() -> None:
    for name in ("open", "eval", "exec", "compile", "__build_class__", "id", "hash", "type", "vars", "dir",
                 "globals", "locals", "getattr", "setattr", "delattr", "input", "breakpoint",
                 "BaseException", "SystemExit", "KeyboardInterrupt", "GeneratorExit"):  # fmt: skip
        assert name not in SAFE_BUILTINS
    with pytest.raises(NameError):
        run("result = open('/etc/passwd')")
    with pytest.raises(NameError):
        run("raise SystemExit(0)")


def test_imports_are_whitelisted_and_modules_are_facades() -> None:
    assert run("import math\nresult = math.sqrt(16)")["result"] == 4.0
    assert run("from statistics import mean\nresult = mean([1, 2, 3])")["result"] == 2
    with pytest.raises(ImportError, match="not allowed"):
        run("import os")
    with pytest.raises(ImportError):
        run("from statistics import sys")
    with pytest.raises(AttributeError):
        run("import statistics\nx = statistics.sys")
    with pytest.raises(AttributeError):
        run("import statistics\nx = statistics.random")
    with pytest.raises((TypeError, AttributeError)):
        run("math.pi = 3")
    assert ALLOWED_MODULES["math"].pi == pytest.approx(3.14159, rel=1e-5)


def test_str_format_traversal_is_refused() -> None:
    with pytest.raises(NotImplementedError):
        run("result = '{0.__class__}'.format(1)")


def test_range_is_bounded_and_inplace_ops_work() -> None:
    with pytest.raises(ValueError, match="range"):
        run("x = range(10**9)")
    assert run("s = 0\nfor i in range(10):\n    s += i\nresult = s")["result"] == 45


def test_print_is_collected_not_written(capsys: pytest.CaptureFixture[str]) -> None:
    run("print('hello', 'world')\nresult = 1")
    assert capsys.readouterr().out == ""


def test_globals_are_fresh_each_time() -> None:
    first = run("leak = 1\nresult = 1")
    assert "leak" in first
    with pytest.raises(NameError):
        run("result = leak")
