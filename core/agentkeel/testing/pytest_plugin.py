"""Pytest fixtures for agentkeel plugin authors (loaded through the ``pytest11`` entry point).

- ``openai_server``: a started ``ScriptedOpenAIServer``, stopped after the test.
  The environment is left alone; pass ``openai_server.base_url`` yourself.
- ``openai_server_env``: the same server, with ``OPENAI_BASE_URL`` and
  ``OPENAI_API_KEY`` pointing at it for the duration of the test.

Imports stay lazy: this module is loaded in every pytest run of every project
that has agentkeel installed.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import TYPE_CHECKING

import pytest

if TYPE_CHECKING:
    from agentkeel.testing.server import ScriptedOpenAIServer

TEST_API_KEY = "sk-agentkeel-test"


@pytest.fixture
def openai_server() -> Iterator[ScriptedOpenAIServer]:
    """A scripted OpenAI-compatible server on 127.0.0.1; the environment is not modified."""
    from agentkeel.testing.server import ScriptedOpenAIServer

    with ScriptedOpenAIServer() as server:
        yield server


@pytest.fixture
def openai_server_env(
    openai_server: ScriptedOpenAIServer, monkeypatch: pytest.MonkeyPatch
) -> ScriptedOpenAIServer:
    """``openai_server`` with ``OPENAI_BASE_URL``/``OPENAI_API_KEY`` set to reach it."""
    monkeypatch.setenv("OPENAI_BASE_URL", openai_server.base_url)
    monkeypatch.setenv("OPENAI_API_KEY", TEST_API_KEY)
    return openai_server
