"""A tool call longer than the lease: the lease is renewed while the call runs, so no other
process can take the run over in the middle of it (before, it was renewed only between steps)."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from agentkeel.config import Config
from agentkeel.errors import LeaseHeldError
from agentkeel.runtime.system import AgentSystem
from agentkeel.types import AgentRequest, RunStatus
from tests.server import slow_plugin


@pytest.fixture(autouse=True)
def slow_log(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    path = tmp_path / "slow.log"
    monkeypatch.setenv(slow_plugin.LOG_ENV, str(path))
    return path


async def test_a_slow_call_keeps_its_lease(slow_log: Path) -> None:
    config = Config.from_dict({"principals": {"u": {"permissions": ["read"]}}, "journal": {"lease_ttl_s": 0.6}})
    async with AgentSystem(config, plugins=[slow_plugin]) as system:
        request = AgentRequest(message="slow 1 x 2", user_id="u")
        task = asyncio.create_task(system.run(request))
        await asyncio.sleep(1.5)  # well past the 0.6 s lease, mid-call
        with pytest.raises(LeaseHeldError):
            system.journal.acquire(request.run_id, "elsewhere:1:1", 0.6)  # another host: only expiry frees it
        response = await task
        assert response.status is RunStatus.SUCCEEDED
        assert slow_log.read_text().splitlines() == [f"do {request.run_id}:1"]
