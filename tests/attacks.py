"""A catalogue of hostile calculation scripts, by attack class, with the containment each must meet.

Runtime attacks run for the symbol ``EVIL`` only (``when_evil``) or as whole scripts; the symbol ``GOOD``
follows ``EVIL`` in the same shard and must get its correct value. Compile-time attacks never become a job.
Used by tests/integration/test_attack_suite.py (through the API and a real worker).
"""

from __future__ import annotations

from dataclasses import dataclass

GOOD_RESULT = "result = close[-1]"


def when_evil(attack: str) -> str:
    """``attack`` runs for EVIL only; every symbol then returns its last close."""
    body = "\n".join("    " + line for line in attack.strip("\n").splitlines())
    return f"if symbol == 'EVIL':\n{body}\n{GOOD_RESULT}\n"


@dataclass(frozen=True)
class Attack:
    name: str
    script: str
    error: str | None  # EVIL's error type; None when the attack is contained without one (EVIL's value is right)
    incident: tuple[str, str] | None = None  # (layer, reason) of the security event recorded for EVIL
    message: str | None = None  # a fragment EVIL's error message must contain


@dataclass(frozen=True)
class CompileAttack:
    name: str
    script: str


RUNTIME_ATTACKS: list[Attack] = [
    # --- attribute traversal through formatting --------------------------------------------------------
    Attack(
        "str.format traversal",
        when_evil("x = '{0.real}'.format(1)"),
        "SecurityViolation",
        ("language", "policy_violation"),
    ),
    Attack(
        "str.format on the type",
        when_evil("x = str.format('{0.real}', 1)"),
        "SecurityViolation",
        ("language", "policy_violation"),
    ),
    Attack(
        "format_map traversal",
        when_evil("x = '{a.real}'.format_map({'a': 1})"),
        "SecurityViolation",
        ("language", "policy_violation"),
    ),
    Attack(
        "string.Formatter",
        when_evil("import string\nx = string.Formatter().format('{0}', 1)"),
        "SecurityViolation",
        ("language", "policy_violation"),
    ),
    Attack(
        "format refusal caught and ignored",
        when_evil("try:\n    x = '{0.real}'.format(1)\nexcept Exception:\n    pass"),
        None,
        ("language", "policy_violation"),
    ),
    # --- frames, tracebacks, exception attributes ------------------------------------------------------
    Attack(
        "AttributeError.obj",
        when_evil("try:\n    (1).nope\nexcept AttributeError as e:\n    x = e.obj"),
        "SecurityViolation",
        ("language", "policy_violation"),
    ),
    Attack(
        "with_traceback",
        when_evil("try:\n    1 / 0\nexcept Exception as e:\n    x = e.with_traceback"),
        "SecurityViolation",
        ("language", "policy_violation"),
    ),
    Attack("type.mro walk", when_evil("x = int.mro()[-1]"), "SecurityViolation", ("language", "policy_violation")),
    Attack(
        "generator methods give no frame",
        when_evil("g = (i for i in [1])\nx = g.send(None)\ng.send(None)"),
        "StopIteration",
    ),
    # --- imports and module facades ---------------------------------------------------------------------
    Attack("import os", when_evil("import os"), "SecurityViolation", ("language", "policy_violation")),
    Attack("import subprocess", when_evil("import subprocess"), "SecurityViolation", ("language", "policy_violation")),
    Attack("import importlib", when_evil("import importlib"), "SecurityViolation", ("language", "policy_violation")),
    Attack("import numpy directly", when_evil("import numpy"), "SecurityViolation", ("language", "policy_violation")),
    Attack(
        "from-import os.path", when_evil("from os import path"), "SecurityViolation", ("language", "policy_violation")
    ),
    Attack(
        "import random to reseed",
        when_evil("import random\nrandom.seed(1)"),
        "SecurityViolation",
        ("language", "policy_violation"),
    ),
    Attack("statistics leaks sys", when_evil("import statistics\nx = statistics.sys"), "AttributeError"),
    Attack(
        "statistics NormalDist reaches random",
        when_evil("import statistics\nx = statistics.NormalDist"),
        "AttributeError",
    ),
    Attack("math facade is read-only", "if symbol == 'EVIL':\n    math.pi = 3\nresult = close[-1]", "TypeError"),
    Attack("ta facade hides numpy", when_evil("import ta\nx = ta.np"), "AttributeError"),
    Attack("ta results are plain tuples", when_evil("import ta\nx = ta.sma(close, 3).tofile"), "AttributeError"),
    # --- dangerous builtins -----------------------------------------------------------------------------
    Attack("open is the bar series, not a file", when_evil("x = open('/proc/self/environ')"), "TypeError"),
    Attack(
        "io module for files",
        when_evil("import io\nx = io.open('/proc/self/environ')"),
        "SecurityViolation",
        ("language", "policy_violation"),
    ),
    Attack("compile", when_evil("x = compile('1', 'f', 'eval')"), "NameError"),
    Attack("getattr", when_evil("x = getattr(math, 'sys')"), "NameError"),
    Attack("type", when_evil("x = type(1)"), "NameError"),
    Attack("vars and globals", when_evil("x = vars() or globals()"), "NameError"),
    Attack("id leaks addresses", when_evil("x = id(close)"), "NameError"),
    Attack("hash", when_evil("x = hash('a')"), "NameError"),
    Attack("class statement", when_evil("class A:\n    pass"), "NameError"),
    Attack("input", when_evil("x = input()"), "NameError"),
    # --- the host's control flow ------------------------------------------------------------------------
    Attack("raise SystemExit", when_evil("raise SystemExit(0)"), "NameError"),
    Attack("raise KeyboardInterrupt", when_evil("raise KeyboardInterrupt"), "NameError"),
    Attack("GeneratorExit", when_evil("raise GeneratorExit"), "NameError"),
    Attack("BaseException catch-all", when_evil("try:\n    1 / 0\nexcept BaseException:\n    pass"), "NameError"),
    Attack(
        "bare except swallowing the deadline",
        when_evil("while True:\n    try:\n        pass\n    except:\n        pass"),
        "TimeoutError",
        ("supervisor", "wall_clock_timeout"),
    ),
    # --- CPU bombs --------------------------------------------------------------------------------------
    Attack("int power bomb", when_evil("x = 10**10**8"), "TimeoutError", ("supervisor", "wall_clock_timeout")),
    Attack(
        "factorial bomb", when_evil("x = math.factorial(10**8)"), "TimeoutError", ("supervisor", "wall_clock_timeout")
    ),
    Attack(
        "endless sorting",
        when_evil("while True:\n    sorted(close * 50)"),
        "TimeoutError",
        ("supervisor", "wall_clock_timeout"),
    ),
    Attack(
        "nested generator bomb",
        when_evil("x = sum(1 for a in range(10**7) for b in range(10**7))"),
        "TimeoutError",
        ("supervisor", "wall_clock_timeout"),
    ),
    # --- memory bombs -----------------------------------------------------------------------------------
    Attack("string repeat", when_evil("x = 'a' * 10**10"), "MemoryError", ("process", "memory_limit")),
    Attack("list repeat", when_evil("x = [0] * 10**9"), "MemoryError", ("process", "memory_limit")),
    Attack("f-string width", when_evil("x = f'{1:>{10**10}}'"), "MemoryError", ("process", "memory_limit")),
    Attack("%-format width", when_evil("x = '%*d' % (2**31 - 1, 1)"), "MemoryError", ("process", "memory_limit")),
    Attack("ljust", when_evil("x = 'a'.ljust(10**10)"), "MemoryError", ("process", "memory_limit")),
    Attack("left shift", when_evil("x = 1 << 2**36"), "MemoryError", ("process", "memory_limit")),
    Attack("join", when_evil("x = ''.join(['x'] * 10**9)"), "MemoryError", ("process", "memory_limit")),
    Attack(
        "growing list",
        when_evil("x = []\nwhile True:\n    x.append('y' * 10**6)"),
        "MemoryError",
        ("process", "memory_limit"),
    ),
    Attack("huge range", when_evil("x = range(10**12)"), "SecurityViolation", ("language", "resource_limit")),
    # --- recursion, floods, huge messages ---------------------------------------------------------------
    Attack("unbounded recursion", when_evil("def f(n):\n    return f(n + 1)\nx = f(0)"), "RecursionError"),
    Attack(
        "deeply nested repr", when_evil("a = []\nfor i in range(10**6):\n    a = [a]\nx = repr(a)"), "RecursionError"
    ),
    Attack(
        "print flood",
        when_evil("while True:\n    print('x' * 10000)"),
        "TimeoutError",
        ("supervisor", "wall_clock_timeout"),
    ),
    Attack("fake protocol lines", when_evil("print('{\"i\": 1, \"value\": 12345.0}')\nprint('\\n' * 100)"), None),
    Attack("huge exception message", when_evil("raise ValueError('z' * 10**8)"), "ValueError", message="zzzz"),
    Attack(
        "address leak through repr",
        when_evil("raise ValueError(repr(lambda: 0) + repr(reversed(close)))"),
        "ValueError",
        message="0x…",
    ),
    # --- hostile results --------------------------------------------------------------------------------
    Attack(
        "huge int result",
        "result = 10**400 if symbol == 'EVIL' else close[-1]",
        "OverflowError",
        ("result", "invalid_result"),
    ),
    Attack(
        "NaN result",
        "result = float('nan') if symbol == 'EVIL' else close[-1]",
        "ValueError",
        ("result", "invalid_result"),
    ),
    Attack(
        "infinite result",
        "result = float('inf') if symbol == 'EVIL' else close[-1]",
        "ValueError",
        ("result", "invalid_result"),
    ),
    Attack(
        "bool result", "result = True if symbol == 'EVIL' else close[-1]", "TypeError", ("result", "invalid_result")
    ),
    Attack(
        "string result",
        "result = 'DROP TABLE' if symbol == 'EVIL' else close[-1]",
        "TypeError",
        ("result", "invalid_result"),
    ),
    Attack(
        "container result",
        "result = [1.0] if symbol == 'EVIL' else close[-1]",
        "TypeError",
        ("result", "invalid_result"),
    ),
    Attack(
        "function result", "result = len if symbol == 'EVIL' else close[-1]", "TypeError", ("result", "invalid_result")
    ),
    Attack("no result", "if symbol != 'EVIL':\n    result = close[-1]", "ResultError"),
    # --- state shared between symbols -------------------------------------------------------------------
    Attack("mutating the input series", when_evil("close[0] = 0.0"), "TypeError"),
    Attack(
        "mutating params for the next symbol",
        "if symbol == 'EVIL':\n    params['poison'] = 1\n    params.clear()\n"
        "result = close[-1] if 'poison' not in params else -1.0",
        None,
    ),
    Attack(
        "globals leaking to the next symbol",
        "try:\n    poisoned\n    result = -1.0\nexcept NameError:\n    result = close[-1]\npoisoned = 1",
        None,
    ),
    Attack(
        "rebinding builtins for the next symbol",
        "if symbol == 'EVIL':\n    len = lambda x: 0\n"
        "result = close[-1] if len(close) > 0 or symbol == 'EVIL' else -1.0",
        None,
    ),
    Attack("NUL and lone surrogate in the message", when_evil("raise ValueError('a\\x00b\\ud800c')"), "ValueError"),
]

COMPILE_ATTACKS: list[CompileAttack] = [
    CompileAttack("dunder class walk", "x = ().__class__.__bases__[0].__subclasses__()"),
    CompileAttack("generator frame", "g = (i for i in [1])\nx = g.gi_frame.f_back.f_globals"),
    CompileAttack("generator code", "g = (i for i in [1])\nx = g.gi_code"),
    CompileAttack("coroutine frame", "async def f():\n    pass\nx = f().cr_frame"),
    CompileAttack("traceback frame", "try:\n    1 / 0\nexcept Exception as e:\n    x = e.__traceback__.tb_frame"),
    CompileAttack("positional-only guard shadowing", "def f(_getattr_=None, /):\n    return 1\nresult = f()"),
    CompileAttack("keyword-only guard shadowing", "def f(*, _write_=None):\n    return 1\nresult = f()"),
    CompileAttack("lambda default shadowing", "f = lambda _getitem_=None: 1\nresult = f()"),
    CompileAttack("except star", "try:\n    pass\nexcept* ValueError:\n    pass"),
    CompileAttack("__import__", "os = __import__('os')"),
    CompileAttack("builtins dict", "x = __builtins__"),
    CompileAttack("exec", "exec('import os')"),
    CompileAttack("eval", "x = eval('1')"),
    CompileAttack("breakpoint", "breakpoint()"),
    CompileAttack("f-string attribute walk", "x = f'{close.__class__}'"),
    CompileAttack("function globals", "def f():\n    pass\nx = f.__globals__"),
    CompileAttack("underscore import name", "from math import _private"),
    CompileAttack("nonlocal trickery", "def f():\n    a = 1\n    def g():\n        nonlocal a\n    return g"),
]
