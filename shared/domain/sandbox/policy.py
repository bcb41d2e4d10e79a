"""The language layer of the sandbox: RestrictedPython compile policy, builtins and guards.

This is the innermost and weakest layer (RestrictedPython's maintainers say it "is not a sandbox
system"): user code additionally runs in a separate, resource-limited process with an empty
environment (shared/sandbox/runner.py), and only checked plain numbers leave it. This module is
imported by the API (to compile-check a script before a job is written) and by the sandbox child
process; it must stay free of database, Celery and Flask imports.
"""

from __future__ import annotations

import ast
import builtins
import functools
import math
import operator
import re
import statistics
import types
from array import array
from collections.abc import Callable, Iterable, Mapping
from typing import Any

from RestrictedPython import compile_restricted_exec
from RestrictedPython.Guards import full_write_guard, guarded_iter_unpack_sequence, guarded_unpack_sequence
from RestrictedPython.transformer import INSPECT_ATTRIBUTES

from shared.domain.sandbox.series import SCRIPT_ATTRIBUTES, Series
from shared.errors import ScriptCompileError

SCRIPT_FILENAME = "<user-script>"
RESULT_NAME = "result"
# What a strategy script assigns: ``entries`` and ``exits`` (one bool per bar) or ``position`` (one
# target in [-1, 1] per bar), and optionally ``warmup`` (the first bar its signals mean anything).
ENTRIES_NAME = "entries"
EXITS_NAME = "exits"
POSITION_NAME = "position"
WARMUP_NAME = "warmup"
MAX_RANGE = 10_000_000  # largest range() a script may build
PRINT_LIMIT_CHARS = 10_000  # what print() may collect per symbol by default

_LINE_PREFIX = re.compile(r"^Line (\d+): (.*)$", re.DOTALL)

Violations = list[tuple[str, str]]
"""Where the runtime guards note each refusal as ``(reason, detail)``, before raising. The list lives in
the trusted part of the sandbox process (a script cannot reach it), so a script that catches the error
still leaves the record."""


class SecurityViolation(Exception):
    """A runtime guard refused an operation (a forbidden import, attribute or object)."""


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


def _refuse(violations: Violations, reason: str, detail: str) -> SecurityViolation:
    violations.append((reason, detail))
    return SecurityViolation(detail)


def _make_range(violations: Violations) -> Callable[..., range]:
    def bounded_range(*args: int) -> range:
        r = range(*args)
        if len(r) > MAX_RANGE:
            raise _refuse(violations, "resource_limit", f"range() larger than {MAX_RANGE:,} elements is not allowed")
        return r

    return bounded_range


# Attribute names refused on every object, whatever the compile step let through: str.format-style
# traversal, frames and code reached from generators, coroutines and tracebacks, AttributeError.obj.
DENIED_ATTRIBUTES = frozenset(INSPECT_ATTRIBUTES) | {
    "format", "format_map", "obj", "with_traceback", "gi_frame", "gi_code", "gi_yieldfrom", "cr_frame",
    "cr_code", "cr_await", "cr_origin", "ag_frame", "ag_code", "ag_await", "tb_frame", "tb_next", "f_back",
    "f_globals", "f_locals", "f_builtins", "f_code", "mro",
}  # fmt: skip

# Only objects of these modules' types are open to attribute access: what scripts can reach is built-in
# data, statistics' result tuples and our facades. Anything else (a numpy object leaked by a bug, say)
# is refused, so even a leak gives no methods such as ``ndarray.tofile``.
_ATTRIBUTE_MODULES = frozenset({"builtins", "statistics", __name__})


def _make_getattr(violations: Violations) -> Callable[..., Any]:
    def guarded_getattr(obj: Any, name: str, *default: Any) -> Any:
        if type(name) is not str or name.startswith("_") or name in DENIED_ATTRIBUTES:
            raise _refuse(violations, "policy_violation", f"access to attribute {name!r} is not allowed")
        if type(obj) is Series or type(obj) is array:  # bars, ta results and their slices: read-only methods only
            if name not in SCRIPT_ATTRIBUTES:
                raise AttributeError(f"{type(obj).__name__!r} object has no attribute {name!r} a script can use "
                                     f"(it has: {', '.join(sorted(SCRIPT_ATTRIBUTES))})")  # fmt: skip
            return getattr(obj, name, *default)
        owner = type(obj).__module__ if not isinstance(obj, type) else obj.__module__
        if owner not in _ATTRIBUTE_MODULES:
            raise _refuse(violations, "policy_violation",
                          f"attribute access on {type(obj).__name__} objects is not allowed")  # fmt: skip
        return getattr(obj, name, *default)

    return guarded_getattr


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


class PrintOutput:
    """What one execution printed, from every scope, up to ``limit`` characters; the rest is counted, not kept."""

    def __init__(self, limit: int = PRINT_LIMIT_CHARS) -> None:
        self.limit = limit
        self.parts: list[str] = []
        self.size = 0
        self.dropped = 0  # characters printed past the limit

    def write(self, text: str) -> None:
        kept = text[: self.limit - self.size]
        if kept:
            self.parts.append(kept)
            self.size += len(kept)
        self.dropped += len(text) - len(kept)

    def text(self) -> str:
        return "".join(self.parts)


class _PrintCollector:
    """``print`` for scripts (RestrictedPython makes one per scope that prints): the text goes to the execution's
    :class:`PrintOutput` and never reaches a real stream. ``printed`` gives what this scope printed, bounded."""

    def __init__(self, _getattr_: Any = None, *, output: PrintOutput | None = None) -> None:
        self.own = PrintOutput()
        self.output = output

    def write(self, text: str) -> None:
        self.own.write(text)
        if self.output is not None:
            self.output.write(text)

    def __call__(self) -> str:
        return self.own.text()

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


INDICATOR_MODULE = "ta"  # the indicator library (shared/domain/sandbox/ta.py), loaded only for scripts that import it
IMPORTABLE = ("math", "statistics", INDICATOR_MODULE)


def indicator_facade() -> ReadOnlyModule:
    """The ``ta`` facade: its public functions only (they take and return tuples of plain floats).

    Imports numpy, so the sandbox process calls it before its seccomp filter closes ``open``.
    """
    if INDICATOR_MODULE not in ALLOWED_MODULES:
        from shared.domain.sandbox import ta

        ALLOWED_MODULES[INDICATOR_MODULE] = ReadOnlyModule(INDICATOR_MODULE, {n: getattr(ta, n) for n in ta.__all__})
    return ALLOWED_MODULES[INDICATOR_MODULE]


def names_of(source: str) -> frozenset[str] | None:
    """Every name a script mentions, or None when it does not parse. A script reaches a global only by writing its
    name (no ``globals()``, ``vars()`` or ``getattr`` on a module of its own), so the sandbox builds only the
    inputs a script names."""
    try:
        tree = ast.parse(source, SCRIPT_FILENAME, "exec")
    except (SyntaxError, ValueError, RecursionError, MemoryError):
        return None
    return frozenset(node.id for node in ast.walk(tree) if isinstance(node, ast.Name))


def _make_import(violations: Violations) -> Callable[..., ReadOnlyModule]:
    def guarded_import(
        name: str,
        globals_: Mapping[str, Any] | None = None,
        locals_: Mapping[str, Any] | None = None,
        fromlist: Iterable[str] | None = (),
        level: int = 0,
    ) -> ReadOnlyModule:
        if level != 0 or name not in IMPORTABLE:
            raise _refuse(violations, "policy_violation",
                          f"import of {name!r} is not allowed (allowed: {', '.join(IMPORTABLE)})")  # fmt: skip
        if name not in ALLOWED_MODULES:  # `ta` outside a process that preloaded it
            raise ImportError(f"module {name!r} is not available here")
        return ALLOWED_MODULES[name]

    return guarded_import


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


SAFE_BUILTINS: Mapping[str, Any] = types.MappingProxyType(
    {name: getattr(builtins, name) for name in _SAFE_BUILTIN_NAMES}
)


def script_globals(
    inputs: Mapping[str, Any], violations: Violations | None = None, output: PrintOutput | None = None
) -> dict[str, Any]:
    """Fresh globals for one execution: guards, builtins, module facades, then the inputs.

    Guards note each refusal in ``violations`` (the sandbox reports them as security events); what the script
    prints goes to ``output`` (bounded; discarded without one).
    """
    sink: Violations = [] if violations is None else violations
    namespace: dict[str, Any] = {
        "__builtins__": {**SAFE_BUILTINS, "range": _make_range(sink), "__import__": _make_import(sink)},
        "__name__": "script",
        "_getattr_": _make_getattr(sink),
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
        "_print_": functools.partial(_PrintCollector, output=output),
        "math": ALLOWED_MODULES["math"],
        "statistics": ALLOWED_MODULES["statistics"],
    }
    namespace.update(inputs)
    return namespace
