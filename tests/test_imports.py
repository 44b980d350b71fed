"""Every module imports on its own, and imports flow one way: leaves <- components <-
plugin machinery <- runtime <- cli. Checked on the source, so a forbidden import fails here."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import agentkeel
import pytest

PACKAGE = Path(agentkeel.__file__).parent
LEAVES = {"errors", "types", "config", "context", "markers", "hookspecs", "stores", "jsonvalue", "patterns", "facts",
          "pg", "pg_schema", "logs"}
PUBLIC = {"__init__", "__main__", "plan"}  # the public facade and compatibility names: above everything
COMPONENTS = {"permissions", "cost", "memory", "planner", "tools", "sandbox", "evaluator", "recovery", "journal",
              "responder", "models"}
LAYERS = {"leaf": 0, "component": 1, "plugin": 2, "runtime": 3, "testing": 4, "cli": 4, "public": 5}


def modules() -> list[str]:
    names = []
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        names.append(".".join(parts))
    return names


def layer(module: str) -> str:
    parts = module.split(".")
    if len(parts) == 1 or parts[1] in PUBLIC:
        return "public"
    top = parts[1]
    if top in LEAVES:
        return "leaf"
    if top in COMPONENTS:
        return "component"
    return top


def runtime_imports(path: Path) -> list[tuple[int, str]]:
    """Modules imported at run time (``if TYPE_CHECKING:`` blocks do not count)."""
    tree = ast.parse(path.read_text())
    found: list[tuple[int, str]] = []

    def visit(node: ast.AST) -> None:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.If) and "TYPE_CHECKING" in ast.unparse(child.test):
                continue
            if isinstance(child, ast.Import):
                found.extend((child.lineno, a.name) for a in child.names)
            elif isinstance(child, ast.ImportFrom) and child.module and child.level == 0:
                found.append((child.lineno, child.module))
            visit(child)

    visit(tree)
    return [(line, name) for line, name in found if name == "agentkeel" or name.startswith("agentkeel.")]


@pytest.mark.parametrize("module", modules())
def test_module_imports_alone_without_warnings(module: str) -> None:
    result = subprocess.run([sys.executable, "-W", "error", "-c", f"import {module}"],
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr[-2000:]


def test_imports_flow_one_way() -> None:
    problems = []
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        here = ".".join(parts)
        mine = layer(here)
        for line, target in runtime_imports(path):
            theirs = layer(target)
            if theirs not in LAYERS or mine not in LAYERS:
                continue
            if LAYERS[theirs] > LAYERS[mine]:
                problems.append(f"{here}:{line} ({mine}) imports {target} ({theirs})")
    assert problems == []


def test_the_package_shows_its_components() -> None:
    folders = {p.name for p in PACKAGE.iterdir() if p.is_dir() and not p.name.startswith("_")}
    assert COMPONENTS <= folders
    assert {"plugin", "runtime", "cli"} <= folders
    flat = {p.stem for p in PACKAGE.glob("*.py")}
    assert flat <= LEAVES | PUBLIC, f"modules outside the component folders: {sorted(flat - LEAVES - PUBLIC)}"
