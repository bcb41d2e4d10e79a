"""The layout's rules, read from the source: what may import what, and how long a module may grow.

- ``shared/domain`` is pure: it imports nothing from ``shared.jobs``, ``shared.infra``, ``shared.accounts``,
  ``shared.library``, ``shared.ops``, ``shared.sandbox``, ``shared.marketdata``, ``shared.contract``, ``api`` or
  ``worker`` (``shared.errors``, the error vocabulary that imports nothing, is allowed);
- ``api`` and ``worker`` never import each other: they meet in ``shared`` (task names, queues and the enqueuer in
  ``shared/contract.py``), and ``shared`` imports neither;
- no product module is over 600 lines.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
PRODUCT = ("api", "worker", "shared")
MAX_LINES = 600


def _modules() -> dict[str, Path]:
    found = {}
    for package in PRODUCT:
        for path in sorted((ROOT / package).rglob("*.py")):
            found[".".join(path.relative_to(ROOT).with_suffix("").parts)] = path
    return found


def _imports(path: Path) -> set[str]:
    """Every module an import statement names, at any depth (function-level imports count too)."""
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module)
            names.update(f"{node.module}.{alias.name}" for alias in node.names)
    return names


def _under(name: str, prefix: str) -> bool:
    return name == prefix or name.startswith(prefix + ".")


MODULES = _modules()


def test_the_rules_see_the_whole_product() -> None:
    assert len(MODULES) > 100 and "shared.contract" in MODULES and "shared.domain.backtest.engine" in MODULES
    # The reader sees what a rule would catch: module-level and function-level imports of either form.
    assert "shared.infra.db" in _imports(MODULES["shared.jobs.pipeline"])
    assert "shared.domain.sandbox.ta" in _imports(MODULES["shared.domain.sandbox.policy"])  # inside a function


def test_domain_is_pure() -> None:
    forbidden = [f"shared.{p}" for p in ("jobs", "infra", "accounts", "library", "ops", "sandbox", "marketdata",
                                          "contract")] + ["api", "worker"]  # fmt: skip
    bad = {
        module: sorted(name for name in _imports(path) if any(_under(name, f) for f in forbidden))
        for module, path in MODULES.items()
        if _under(module, "shared.domain")
    }
    assert {m: names for m, names in bad.items() if names} == {}


@pytest.mark.parametrize(("importer", "imported"), [("api", "worker"), ("worker", "api"), ("shared", "api"),
                                                    ("shared", "worker")])  # fmt: skip
def test_api_and_worker_meet_only_in_shared(importer: str, imported: str) -> None:
    bad = {
        module: sorted(name for name in _imports(path) if _under(name, imported))
        for module, path in MODULES.items()
        if _under(module, importer)
    }
    assert {m: names for m, names in bad.items() if names} == {}


def test_no_module_over_600_lines() -> None:
    long = {module: n for module, path in MODULES.items() if (n := len(path.read_text().splitlines())) > MAX_LINES}
    assert long == {}
