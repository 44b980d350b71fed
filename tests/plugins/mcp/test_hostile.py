"""A hostile MCP server: names that are not tool names are left out (and logged), and a result
larger than a step result may be fails the step instead of reaching the journal and prompts."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

pytest.importorskip("mcp")

from agentkeel.types import StepStatus  # noqa: E402

from tests.plugins.mcp.helpers import run, step, system  # noqa: E402

HOSTILE = {"hostile": {"command": sys.executable, "args": [str(Path(__file__).parent / "hostile_server.py")],
                       "permissions": ["h"]}}
PRINCIPALS = {"tester": {"permissions": ["h"]}}


def test_names_that_are_not_tool_names_are_left_out(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level("WARNING", logger="agentkeel.mcp")
    sys_ = system(HOSTILE, principals=PRINCIPALS)
    try:
        names = sorted(n for n in sys_.tools.all() if n.startswith("hostile."))
    finally:
        sys_.close()
    assert names == ["hostile.fine", "hostile.huge"]
    left_out = [r.getMessage() for r in caplog.records if "left out" in r.getMessage()]
    assert len(left_out) == 2 and any("wire_money" in m for m in left_out)


def test_a_result_too_large_fails_the_step() -> None:
    response = run(HOSTILE, step("hostile.huge"), step("hostile.fine"), principals=PRINCIPALS)
    first = response.steps[0]
    assert first.status is StepStatus.FAILED
    assert "more than the 1048576" in (first.error or "")
    assert first.attempts == 1  # a refused result is not retried
    assert first.result is None
