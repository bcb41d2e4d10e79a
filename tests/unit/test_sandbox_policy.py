"""The language layer: compile policy, builtins whitelist, module facades."""

from __future__ import annotations

import pytest

from shared.domain.sandbox.policy import (
    ALLOWED_MODULES,
    SAFE_BUILTINS,
    SecurityViolation,
    Violations,
    compile_script,
    names_of,
    script_globals,
)
from shared.errors import ScriptCompileError


def run(source: str, violations: Violations | None = None, **inputs: object) -> dict[str, object]:
    namespace = script_globals(inputs, violations)
    exec(compile_script(source), namespace)
    return namespace


def refused(source: str) -> Violations:
    """Run ``source``, expecting a guard to refuse it; the refusal is recorded before it is raised."""
    violations: Violations = []
    with pytest.raises(SecurityViolation):
        run(source, violations)
    assert violations, "the refusal was not recorded"
    return violations


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
    assert refused("import os") == [
        ("policy_violation", "import of 'os' is not allowed (allowed: math, statistics, ta)")
    ]
    with pytest.raises(ImportError):
        run("from statistics import sys")
    with pytest.raises(ImportError, match="not available"):  # `ta` needs the sandbox process's preload
        run("import ta")
    with pytest.raises(AttributeError):
        run("import statistics\nx = statistics.sys")
    with pytest.raises(AttributeError):
        run("import statistics\nx = statistics.random")
    with pytest.raises((TypeError, AttributeError)):
        run("math.pi = 3")
    assert ALLOWED_MODULES["math"].pi == pytest.approx(3.14159, rel=1e-5)


@pytest.mark.parametrize(
    "source",
    [
        "result = '{0.real}'.format(1)",
        "result = str.format('{0.real}', 1)",
        "result = '{a.real}'.format_map({'a': 1})",
        "result = str.format_map('{0.real}', [1])",
        "try:\n    (1).nope\nexcept AttributeError as e:\n    result = e.obj",
        "try:\n    1 / 0\nexcept Exception as e:\n    result = e.with_traceback",
        "result = int.mro",
    ],
)
def test_traversal_attributes_are_refused_at_run_time(source: str) -> None:
    (reason, detail), *_ = refused(source)
    assert reason == "policy_violation" and "attribute" in detail


def test_a_caught_refusal_is_still_recorded() -> None:
    violations: Violations = []
    namespace = run("try:\n    import os\nexcept Exception:\n    pass\nresult = 1", violations)
    assert namespace["result"] == 1
    assert violations == [("policy_violation", "import of 'os' is not allowed (allowed: math, statistics, ta)")]


def test_objects_of_foreign_types_have_no_attributes() -> None:
    import fractions

    violations: Violations = []
    with pytest.raises(SecurityViolation, match="Fraction"):
        run("result = leaked.limit_denominator", violations, leaked=fractions.Fraction(1, 3))
    assert run("import statistics\nresult = statistics.linear_regression([1, 2, 3], [2, 4, 6]).slope")["result"] == 2


def test_names_of_lists_every_name_a_script_mentions() -> None:
    script = "import ta\ndef f(x):\n    return x + high[-1]\nresult = f'{close}' and f(ta.sma(low, 2)[-1])"
    assert names_of(script) == frozenset({"f", "x", "high", "result", "close", "ta", "low"})
    assert names_of("x = 'open'") == frozenset({"x"}) and names_of("x = (") is None


def test_range_is_bounded_and_inplace_ops_work() -> None:
    assert refused("x = range(10**9)")[0][0] == "resource_limit"
    assert run("s = 0\nfor i in range(10):\n    s += i\nresult = s")["result"] == 45


def test_print_is_collected_not_written(capsys: pytest.CaptureFixture[str]) -> None:
    run("print('hello', 'world')\nresult = 1")
    assert capsys.readouterr().out == ""


def test_globals_are_fresh_each_time() -> None:
    first = run("leak = 1\nresult = 1")
    assert "leak" in first
    with pytest.raises(NameError):
        run("result = leak")
