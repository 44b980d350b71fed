"""Shared by the journal conformance suite: a fake clock, record and plan builders, real processes."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Callable, Mapping
from typing import Any

import attrs
from agentkeel.journal.base import ApprovalRecord, Journal, Lease, StepRecord
from agentkeel.types import Plan, PlanStep

MakeJournal = Callable[..., Journal]

ALICE = "host-a.invalid:101:5001"  # other hosts: liveness unknown, only expiry frees a run
BOB = "host-b.invalid:202:6002"
OWNER_SCRIPT = "from agentkeel.journal.base import make_owner; print(make_owner(), flush=True)"
HAS_PROC = os.path.exists(f"/proc/{os.getpid()}/stat")


class FakeClock:
    """A clock that moves only when told."""

    def __init__(self, now: float = 1_700_000_000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


def a_plan() -> dict[str, Any]:
    return Plan(
        steps=(
            PlanStep(1, "shop:lookup_order", {"order_id": "A-17"}, "find it"),
            PlanStep(2, "shop:refund", {"order_id": "A-17", "note": "Rückerstattung ✓ 退款"}),
        ),
        reasoning="look it up, then refund",
        planner="rules",
    ).to_dict()


def another_plan(note: str = "replanned") -> dict[str, Any]:
    return Plan(
        steps=(PlanStep(1, "shop:cancel_order", {"order_id": "A-17", "note": note}, "cancel instead"),),
        reasoning="the refund was refused: cancel the order",
        planner="llm",
    ).to_dict()


def ask(
    journal: Journal,
    lease: Lease,
    step_id: int = 2,
    ttl_s: float = 60.0,
    tool_name: str = "shop:refund",
    args: Mapping[str, Any] | None = None,
    requested_by: str = "policy:refunds-over-100",
) -> ApprovalRecord:
    """Request approval of ``step_id`` (a refund of A-17 unless told otherwise)."""
    return journal.request_approval(
        lease, step_id, tool_name, {"order_id": "A-17"} if args is None else args, requested_by, ttl_s
    )


def new_run(
    journal: Journal,
    run_id: str = "run-1",
    owner: str = ALICE,
    ttl_s: float = 30.0,
    **overrides: Any,
) -> Lease:
    fields: dict[str, Any] = {
        "run_id": run_id,
        "user_id": "u-1",
        "session_id": "s-1",
        "message": "refund order A-17 🙏",
        "principal": "support",
        "budget_usd": 0.25,
        "plan": a_plan(),
        "owner": owner,
        "ttl_s": ttl_s,
    }
    fields.update(overrides)
    return journal.create_run(**fields)


def intent(step_id: int, kind: str = "forward", **kw: Any) -> StepRecord:
    kw.setdefault("args", {"order_id": "A-17"})
    return StepRecord(
        step_id=step_id, kind=kind, phase="intent", tool_name=f"shop:t{step_id}", **kw
    )


def outcome(
    step_id: int, kind: str = "forward", status: str = "succeeded", **kw: Any
) -> StepRecord:
    kw.setdefault("args", {"order_id": "A-17"})
    return StepRecord(
        step_id=step_id,
        kind=kind,
        phase="outcome",
        tool_name=f"shop:t{step_id}",
        status=status,
        **kw,
    )


def spawn_owner_process(*extra: str) -> tuple[subprocess.Popen[str], str]:
    """A real Python process that prints its ``make_owner()``; with extra args it then sleeps."""
    code = OWNER_SCRIPT + ("; import time; time.sleep(60)" if extra else "")
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    assert proc.stdout is not None
    owner = proc.stdout.readline().strip()
    assert owner.count(":") == 2, owner
    return proc, owner


def fields_of(record: StepRecord) -> dict[str, Any]:
    return attrs.asdict(record, recurse=False)


def proc_state(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            raw = f.read().decode("ascii", "replace")
    except OSError:
        return ""
    return raw[raw.rfind(")") + 2 :].split()[0]
