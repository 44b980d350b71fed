"""The ecosystem plugins (``agentkeel-otel``, ``agentkeel-mcp``) cost nothing when they are
not installed: the core never imports OpenTelemetry or the MCP SDK, and a run served
without the plugins' distributions leaves neither in ``sys.modules``."""

from __future__ import annotations

import ast
import importlib.util
import json
import subprocess
import sys
import textwrap
from pathlib import Path

import agentkeel
import pytest

PACKAGE = Path(agentkeel.__file__).parent
OPTIONAL = ("opentelemetry", "mcp", "agentkeel_otel", "agentkeel_mcp")
DISTRIBUTIONS = ("agentkeel-otel", "agentkeel-mcp")


def test_the_core_never_imports_them() -> None:
    found = []
    for path in sorted(PACKAGE.rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            names = ([a.name for a in node.names] if isinstance(node, ast.Import)
                     else [node.module or ""] if isinstance(node, ast.ImportFrom) and node.level == 0 else [])
            found += [f"{path.relative_to(PACKAGE)}:{node.lineno} {n}" for n in names
                      if n.split(".")[0] in OPTIONAL]
    assert found == []


SCRIPT = """
import importlib.metadata, json, sys
hidden = set(sys.argv[1].split(",")) if sys.argv[1] else set()
everything = importlib.metadata.distributions
def distributions(**kwargs):
    return [d for d in everything(**kwargs) if d.metadata["Name"] not in hidden]
importlib.metadata.distributions = distributions  # as if those distributions were not installed

from agentkeel import AgentRequest
from agentkeel.runtime.system import AgentSystem
from agentkeel.config import Config
config = Config.from_dict({"principals": {"demo": {"permissions": ["read", "refunds"]}},
                           "journal": {"backend": "memory"}})
with AgentSystem(config) as system:
    response = system.run_sync(AgentRequest(message="refund order 1001 if it has shipped", user_id="demo"))
    plugins = sorted(p["name"] for p in system.plugins.describe())
from agentkeel.cli import cli  # the command line's modules too
loaded = sorted(m for m in sys.modules if m.split(".")[0] in OPTIONAL)
print(json.dumps({"status": response.status.value, "plugins": plugins, "loaded": loaded}))
"""


def _serve_one(hidden: tuple[str, ...], tmp_path: Path) -> dict[str, object]:
    script = tmp_path / "probe.py"
    script.write_text(f"OPTIONAL = {set(OPTIONAL)!r}\n" + textwrap.dedent(SCRIPT))
    done = subprocess.run([sys.executable, str(script), ",".join(hidden)], capture_output=True, text=True,
                          timeout=120, cwd=tmp_path, env={"PATH": "/usr/bin:/bin", "HOME": str(tmp_path),
                                                          "AGENTKEEL_HOME": str(tmp_path / "home")})
    assert done.returncode == 0, done.stderr[-3000:]
    result: dict[str, object] = json.loads(done.stdout.strip().splitlines()[-1])
    return result


def test_a_run_without_them_imports_nothing_of_them(tmp_path: Path) -> None:
    result = _serve_one(DISTRIBUTIONS, tmp_path)
    assert result["status"] == "succeeded"
    assert "support" in result["plugins"]  # the other entry points still load
    assert result["loaded"] == []


@pytest.mark.skipif(importlib.util.find_spec("agentkeel_otel") is None, reason="agentkeel-otel is not installed")
def test_installed_they_load(tmp_path: Path) -> None:
    """The probe above can fail: with the distributions visible, their modules are loaded."""
    result = _serve_one((), tmp_path)
    assert result["status"] == "succeeded"
    assert "otel" in result["plugins"]
    assert "agentkeel_otel" in result["loaded"] and "opentelemetry" in result["loaded"]
