"""What a plugin author writes from the README type-checks under ``mypy --strict``."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

PLUGIN = '''
from typing import Any

from agentkeel import Decision, PlanTemplate, Verdict, hookimpl, parse_plan, tool
from agentkeel.types import Plan


@tool(permissions=["refunds"], idempotent=True)
async def lookup(order_id: str) -> dict[str, Any]:
    """Look an order up."""
    return {"order_id": order_id}


TEMPLATE = PlanTemplate(
    pattern=r"where is order (?P<order_id>\\\\d+)",
    steps=[{"description": "look", "tool_name": "lookup", "tool_args": {"order_id": "{order_id}"}}],
    name="mine:where",
)


@hookimpl
def agentkeel_register_plan_templates(register: Any) -> None:
    register(TEMPLATE)


@hookimpl(tryfirst=True)
def agentkeel_plan(request: Any) -> Plan | None:
    return parse_plan({"reasoning": "r", "steps": []}, planner="mine") if request else None


def decide() -> tuple[Decision, Verdict]:
    return Decision(True, "ok"), Verdict(True, 1.0, "")
'''


def test_readme_style_plugin_passes_mypy_strict(tmp_path: Path) -> None:
    pytest.importorskip("mypy")  # in the test extra
    source = tmp_path / "my_plugin.py"
    source.write_text(PLUGIN)
    result = subprocess.run(
        [sys.executable, "-m", "mypy", "--strict", "--no-incremental", "--cache-dir", str(tmp_path / "cache"),
         str(source)],
        capture_output=True, text=True, timeout=300, cwd=tmp_path,
    )
    assert result.returncode == 0, result.stdout + result.stderr
