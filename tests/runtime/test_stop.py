"""Stopping a run at a step boundary: cancel (compensate, end ``cancelled``) and pause
(stay ``running``, resumable), for a run being served, one not started yet, and one
that no process is serving (waiting for an approval)."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import pytest
from agentkeel.config import Config
from agentkeel.runtime.system import AgentSystem
from agentkeel.types import AgentRequest, Event, RunStatus, StepStatus

from tests.server import slow_plugin

CONFIG = {
    "principals": {
        "u": {"permissions": ["read", "refunds"], "approval": {"issue_refund": True}},
        "boss": {"permissions": ["read", "approve"]},
    },
}


@pytest.fixture
def slow_log(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    path = tmp_path / "slow.log"
    monkeypatch.setenv(slow_plugin.LOG_ENV, str(path))
    return path


def _marks(path: Path) -> list[str]:
    return path.read_text().splitlines() if path.exists() else []


def _system() -> AgentSystem:
    return AgentSystem(Config.from_dict(CONFIG), plugins=[slow_plugin])


async def _stop_after_first_step(system: AgentSystem, request: AgentRequest, kind: str) -> object:
    def on_event(event: Event) -> None:
        if event.kind == "step_finished" and event.data["step"].step_id == 1:
            assert system.request_stop(request.run_id, kind, f"{kind} by the test")

    return await system.run(request, on_event=on_event)


async def test_cancel_mid_run_compensates_and_ends_cancelled(slow_log: Path) -> None:
    async with _system() as system:
        request = AgentRequest(message="slow 3 x 0.05", user_id="u")
        response = await _stop_after_first_step(system, request, "cancel")
        assert response.status is RunStatus.CANCELLED  # type: ignore[attr-defined]
        steps = {s.step_id: s.status for s in response.steps}  # type: ignore[attr-defined]
        assert steps == {1: StepStatus.COMPENSATED, 2: StepStatus.SKIPPED, 3: StepStatus.SKIPPED}
        key = f"{request.run_id}:1"
        assert _marks(slow_log) == [f"do {key}", f"undo {key}"]
        assert system.journal.load(request.run_id).run.status == "cancelled"
        assert "cancel by the test" in response.answer  # type: ignore[attr-defined]
        again = await system.resume(request.run_id)  # a cancelled run is over
        assert again.status is RunStatus.CANCELLED
        assert _marks(slow_log) == [f"do {key}", f"undo {key}"]
        assert request.run_id not in system.live_runs()


async def test_pause_leaves_a_resumable_run_that_finishes_without_repeating(slow_log: Path) -> None:
    async with _system() as system:
        request = AgentRequest(message="slow 3 x 0.01", user_id="u")
        response = await _stop_after_first_step(system, request, "pause")
        assert response.status is RunStatus.RUNNING  # type: ignore[attr-defined]
        record = system.journal.load(request.run_id).run
        assert record.status == "running" and record.owner == ""  # the lease was released
        assert _marks(slow_log) == [f"do {request.run_id}:1"]
        resumed = await system.resume(request.run_id)
        assert resumed.status is RunStatus.SUCCEEDED
        assert _marks(slow_log) == [f"do {request.run_id}:{i}" for i in (1, 2, 3)]


async def test_a_cancel_before_the_run_starts_runs_nothing(slow_log: Path) -> None:
    async with _system() as system:
        request = AgentRequest(message="slow 2 x 0.01", user_id="u")
        assert system.request_stop(request.run_id, "cancel", "queued and cancelled", pending=True)
        response = await system.run(request)
        assert response.status is RunStatus.CANCELLED
        assert response.steps == () and _marks(slow_log) == []
        assert system.journal.load(request.run_id).run.status == "cancelled"


async def test_cancel_a_run_waiting_for_approval(slow_log: Path) -> None:
    async with _system() as system:
        request = AgentRequest(message="refund order 1001 if it has shipped", user_id="u")
        waiting = await system.run(request)
        assert waiting.status is RunStatus.WAITING
        assert request.run_id not in system.live_runs()
        response = await system.cancel(request.run_id, by="boss", reason="not needed any more")
        assert response is not None and response.status is RunStatus.CANCELLED
        assert "not needed any more" in response.message
        assert system.journal.load(request.run_id).run.status == "cancelled"
        assert system.approvals() == []  # its approval is closed: nobody is asked any more
        assert system.approvals(None)[0].status == "denied"
        finished = await system.cancel(request.run_id, by="boss")
        assert finished is not None and "already finished" in finished.message
        system.stores.flush()
        lines = [json.loads(line) for line in (system.config.home / "audit.jsonl").read_text().splitlines()]
        cancels = [r for r in lines if r["action"] == "cancel"]
        assert cancels and cancels[0]["principal"] == "boss" and cancels[0]["run_id"] == request.run_id


async def test_cancel_while_a_step_runs_waits_for_the_step(slow_log: Path) -> None:
    async with _system() as system:
        request = AgentRequest(message="slow 2 x 0.3", user_id="u")
        task = asyncio.create_task(system.run(request))
        while request.run_id not in system.live_runs() or not _started(system, request.run_id):
            await asyncio.sleep(0.01)
        assert await system.cancel(request.run_id, by="u") is None  # served here: it stops by itself
        response = await task
        assert response.status is RunStatus.CANCELLED
        key = f"{request.run_id}:1"
        assert _marks(slow_log) == [f"do {key}", f"undo {key}"]  # the step in flight finished, then was undone


def _started(system: AgentSystem, run_id: str) -> bool:
    try:
        return any(s.phase == "intent" for s in system.journal.load(run_id).steps)
    except Exception:  # noqa: BLE001 - not journaled yet
        return False


def test_stop_kind_is_checked() -> None:
    with _system() as system, pytest.raises(ValueError, match="stop kind"):
        system.request_stop("x", "halt", "", pending=True)
