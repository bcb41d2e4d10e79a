"""The language layer of the sandbox: RestrictedPython compile policy, builtins and guards.

This is the innermost and weakest layer (RestrictedPython's maintainers say it "is not a sandbox
system"): user code additionally runs in a separate, resource-limited process with an empty
environment (worker/sandbox_runner.py), and only checked plain numbers leave it. This module is
imported by the API (to compile-check a script before a job is written) and by the sandbox child
process; it must stay free of database, Celery and Flask imports.
"""

from __future__ import annotations

import ast
import builtins
import math
import operator
import re
import statistics
import types
from collections.abc import Callable, Iterable, Mapping
from typing import Any

from RestrictedPython import compile_restricted_exec
from RestrictedPython.Guards import (
    full_write_guard,
    guarded_iter_unpack_sequence,
    guarded_unpack_sequence,
    safer_getattr_raise,
)

from shared.errors import ScriptCompileError

SCRIPT_FILENAME = "<user-script>"
RESULT_NAME = "result"
MAX_RANGE = 10_000_000  # largest range() a script may build
PRINT_LIMIT_CHARS = 10_000  # what print() may collect per symbol (discarded; kept bounded)

_LINE_PREFIX = re.compile(r"^Line (\d+): (.*)$", re.DOTALL)


def compile_script(source: str) -> types.CodeType:
    """Compile ``source`` under the restricted policy, or raise ScriptCompileError with the line.

    Compiling never executes user code; it may still be slow or deep for hostile input, so the
    caller bounds the source length first.
    """
    if "\x00" in source:
        raise ScriptCompileError("script contains a NUL character", line=None)
    try:
        ast.parse(source, SCRIPT_FILENAME, "exec")
    except SyntaxError as exc:
        raise ScriptCompileError(f"{type(exc).__name__}: {exc.msg}", line=exc.lineno) from None
    except (RecursionError, MemoryError, ValueError) as exc:
        raise ScriptCompileError(
            f"script is too deeply nested or too large ({type(exc).__name__})", line=None
        ) from None
    try:
        compiled = compile_restricted_exec(source, filename=SCRIPT_FILENAME)
    except (RecursionError, MemoryError, ValueError) as exc:
        raise ScriptCompileError(
            f"script is too deeply nested or too large ({type(exc).__name__})", line=None
        ) from None
    if compiled.errors:
        first = compiled.errors[0]
        match = _LINE_PREFIX.match(first)
        line, message = (int(match.group(1)), match.group(2)) if match else (None, first)
        if len(compiled.errors) > 1:
            message += f" (and {len(compiled.errors) - 1} more problem(s))"
        raise ScriptCompileError(message, line=line)
    if compiled.code is None:  # pragma: no cover - RestrictedPython reports errors instead
        raise ScriptCompileError("script did not compile", line=None)
    return compiled.code


# ---------------------------------------------------------------------------------------------
# Runtime: builtins whitelist, guards and read-only module facades.
# ---------------------------------------------------------------------------------------------


def _bounded_range(*args: int) -> range:
    r = range(*args)
    if len(r) > MAX_RANGE:
        raise ValueError(f"range() larger than {MAX_RANGE:,} elements is not allowed")
    return r


_INPLACE_OPS: dict[str, Callable[[Any, Any], Any]] = {
    "+=": operator.iadd,
    "-=": operator.isub,
    "*=": operator.imul,
    "/=": operator.itruediv,
    "//=": operator.ifloordiv,
    "%=": operator.imod,
    "**=": operator.ipow,
    "<<=": operator.ilshift,
    ">>=": operator.irshift,
    "&=": operator.iand,
    "^=": operator.ixor,
    "|=": operator.ior,
    "@=": operator.imatmul,
}


def _inplacevar(op: str, target: Any, value: Any) -> Any:
    try:
        func = _INPLACE_OPS[op]
    except KeyError:
        raise SyntaxError(f"unsupported in-place operator {op}") from None
    return func(target, value)


def _apply(func: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
    return func(*args, **kwargs)


class _PrintCollector:
    """``print`` for scripts: output is collected up to a bound and never reaches a real stream."""

    def __init__(self, _getattr_: Any = None) -> None:
        self.parts: list[str] = []
        self.size = 0

    def write(self, text: str) -> None:
        if self.size < PRINT_LIMIT_CHARS:
            chunk = str(text)[: PRINT_LIMIT_CHARS - self.size]
            self.parts.append(chunk)
            self.size += len(chunk)

    def __call__(self) -> str:
        return "".join(self.parts)

    def _call_print(self, *objects: Any, **kwargs: Any) -> None:
        sep = str(kwargs.get("sep", " ") or " ")
        end = str(kwargs.get("end", "\n") or "\n")
        self.write(sep.join(str(o) for o in objects) + end)


class ReadOnlyModule:
    """A module facade exposing only chosen public callables and constants, immutable.

    Real modules leak their imports (``statistics.sys.modules`` reaches ``os``); a facade does not.
    """

    __slots__ = ("_members", "_name")

    def __init__(self, name: str, members: Mapping[str, Any]) -> None:
        object.__setattr__(self, "_name", name)
        object.__setattr__(self, "_members", dict(members))

    def __getattr__(self, item: str) -> Any:
        members: dict[str, Any] = object.__getattribute__(self, "_members")
        try:
            return members[item]
        except KeyError:
            raise AttributeError(
                f"module {object.__getattribute__(self, '_name')!r} has no attribute {item!r}"
            ) from None

    def __setattr__(self, key: str, value: Any) -> None:
        raise AttributeError("modules are read-only in scripts")

    def __dir__(self) -> Iterable[str]:
        return sorted(object.__getattribute__(self, "_members"))

    def __repr__(self) -> str:
        return f"<module {object.__getattribute__(self, '_name')!r}>"


def _public_members(module: types.ModuleType, names: Iterable[str]) -> dict[str, Any]:
    members: dict[str, Any] = {}
    for name in names:
        value = getattr(module, name)
        if isinstance(value, types.ModuleType):
            continue
        members[name] = value
    return members


_MATH_NAMES = [n for n in dir(math) if not n.startswith("_")]
_STATISTICS_NAMES = [
    n
    for n in statistics.__all__
    if n not in {"NormalDist"}  # NormalDist.samples reaches `random`
]

ALLOWED_MODULES: dict[str, ReadOnlyModule] = {
    "math": ReadOnlyModule("math", _public_members(math, _MATH_NAMES)),
    "statistics": ReadOnlyModule("statistics", _public_members(statistics, _STATISTICS_NAMES)),
}


def _guarded_import(
    name: str,
    globals_: Mapping[str, Any] | None = None,
    locals_: Mapping[str, Any] | None = None,
    fromlist: Iterable[str] | None = (),
    level: int = 0,
) -> ReadOnlyModule:
    if level != 0 or name not in ALLOWED_MODULES:
        allowed = ", ".join(sorted(ALLOWED_MODULES))
        raise ImportError(f"import of {name!r} is not allowed (allowed: {allowed})")
    return ALLOWED_MODULES[name]


_SAFE_BUILTIN_NAMES = (
    "abs", "all", "any", "bool", "chr", "dict", "divmod", "enumerate", "filter", "float", "int", "isinstance",
    "len", "list", "map", "max", "min", "ord", "pow", "repr", "reversed", "round", "set", "frozenset",
    "slice", "sorted", "str", "sum", "tuple", "zip", "None", "True", "False",
    # Exceptions a script may raise or catch. BaseException, SystemExit, KeyboardInterrupt and
    # GeneratorExit are deliberately absent: a script must not swallow or fake the host's signals.
    "ArithmeticError", "AssertionError", "AttributeError", "Exception", "IndexError", "KeyError",
    "LookupError", "NameError", "NotImplementedError", "OverflowError", "RuntimeError", "StopIteration",
    "TypeError", "ValueError", "ZeroDivisionError",
)  # fmt: skip


def _make_builtins() -> dict[str, Any]:
    table: dict[str, Any] = {name: getattr(builtins, name) for name in _SAFE_BUILTIN_NAMES}
    table["range"] = _bounded_range
    table["__import__"] = _guarded_import
    return table


SAFE_BUILTINS: Mapping[str, Any] = types.MappingProxyType(_make_builtins())


def script_globals(inputs: Mapping[str, Any]) -> dict[str, Any]:
    """Fresh globals for one execution: guards, builtins, module facades, then the inputs."""
    namespace: dict[str, Any] = {
        "__builtins__": dict(SAFE_BUILTINS),
        "__name__": "script",
        "_getattr_": safer_getattr_raise,
        # Plain C-level item access and iteration: every object a script can reach is data (tuples,
        # lists, dicts, numbers, strings) or a facade, so there is nothing to guard, and these run
        # once per bar in the hot loop of every script.
        "_getitem_": operator.getitem,
        "_getiter_": iter,
        "_iter_unpack_sequence_": guarded_iter_unpack_sequence,
        "_unpack_sequence_": guarded_unpack_sequence,
        "_write_": full_write_guard,
        "_inplacevar_": _inplacevar,
        "_apply_": _apply,
        "_print_": _PrintCollector,
        "math": ALLOWED_MODULES["math"],
        "statistics": ALLOWED_MODULES["statistics"],
    }
    namespace.update(inputs)
    return namespace
