"""The package's layers, held apart by reading every module's imports (function-level ones included).

* ``errors`` imports nothing of ours; ``names`` and ``layout`` import only ``errors``; ``spec/`` imports only
  ``errors``, ``names`` and itself.
* The CLI (``cli/``) imports only the SDK and its own modules.
* The control plane (everything outside ``runtime/``) never imports ``runtime/``: that code runs on the
  cluster, inside Ray Train workers and Serve replicas.
* No module of ours but the CLI imports Click.
"""

from __future__ import annotations

import ast
from pathlib import Path
from typing import Dict, Set

import pytest

PKG = Path(__file__).resolve().parents[2] / "platform" / "zeroplane"


def _module_name(path: Path) -> str:
    rel = path.relative_to(PKG.parent).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _imports(path: Path) -> Set[str]:
    """Absolute names of every module ``path`` imports (relative imports resolved)."""
    mod = _module_name(path)
    package = mod if path.name == "__init__.py" else mod.rpartition(".")[0]
    out: Set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            out.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - (node.level - 1)]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            out.add(target)
            # ``from . import x`` / ``from .. import sdk`` name modules too
            out.update(f"{target}.{a.name}" for a in node.names)
    return out


def _ours(names: Set[str]) -> Set[str]:
    """Our modules among ``names``; the root package itself (it holds only ``__version__``) is left out."""
    return {n for n in names if n.startswith("zeroplane.")}


MODULES: Dict[str, Set[str]] = {_module_name(p): _imports(p) for p in sorted(PKG.rglob("*.py"))}


def _existing(name: str) -> bool:
    """True when ``name`` is one of our modules or packages (``from .x import Name`` adds ``x.Name``)."""
    return name in MODULES


def _violations(prefix: str, allowed) -> Dict[str, Set[str]]:
    bad = {}
    for mod, imports in MODULES.items():
        if mod == prefix or mod.startswith(prefix + "."):
            wrong = {i for i in _ours(imports) if _existing(i) and not allowed(i)}
            if wrong:
                bad[mod] = wrong
    return bad


def _under(*prefixes: str):
    return lambda name: any(name == p or name.startswith(p + ".") for p in prefixes)


def test_the_scan_sees_relative_and_function_level_imports():
    assert "zeroplane.errors" in MODULES["zeroplane.sdk"]
    assert "zeroplane.sdk" in MODULES["zeroplane.cli.train"]  # imported inside the commands


@pytest.mark.parametrize("module,allowed", [
    ("zeroplane.errors", ("zeroplane.errors",)),
    ("zeroplane.names", ("zeroplane.errors",)),
    ("zeroplane.layout", ("zeroplane.errors",)),
    ("zeroplane.spec", ("zeroplane.errors", "zeroplane.names", "zeroplane.spec")),
])
def test_foundation_modules_import_only_errors(module, allowed):
    assert _violations(module, _under(*allowed)) == {}


def test_cli_imports_only_the_sdk_and_itself():
    assert _violations("zeroplane.cli", _under("zeroplane.sdk", "zeroplane.cli")) == {}


def test_control_plane_never_imports_the_runtime():
    bad = {m: {i for i in _ours(imps) if i.startswith("zeroplane.runtime")}
           for m, imps in MODULES.items() if not m.startswith("zeroplane.runtime")}
    assert {m: v for m, v in bad.items() if v} == {}


def test_only_the_cli_imports_click():
    users = {m for m, imps in MODULES.items() if any(i == "click" or i.startswith("click.") for i in imps)}
    assert {m for m in users if not m.startswith("zeroplane.cli")} == set()
