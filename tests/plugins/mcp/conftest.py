"""Fixtures of the agentkeel-mcp tests (the helpers are in ``helpers.py``)."""

from __future__ import annotations

import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest


@pytest.fixture
def state(tmp_path: Path) -> Path:
    """The test server's state folder (``$MCP_TEST_STATE``)."""
    path = tmp_path / "mcp-state"
    path.mkdir()
    return path


@pytest.fixture(autouse=True, scope="module")
def _no_server_left() -> Iterator[None]:
    """Whatever a module leaves running is stopped, so no module sees another's servers."""
    yield
    runtime = sys.modules.get("agentkeel_mcp.runtime")
    if runtime is not None:
        runtime.stop_all()


@pytest.fixture
def http_server(state: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Any]:
    """The test server over streamable HTTP; ``$MCP_TEST_BEARER`` holds its Authorization header."""
    from tests.plugins.mcp.helpers import TOKEN, HttpServer

    monkeypatch.setenv("MCP_TEST_BEARER", f"Bearer {TOKEN}")
    server = HttpServer(state).start()
    try:
        yield server
    finally:
        server.stop()
