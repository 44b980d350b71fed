"""Approvals: a human says yes or no before a step's tool runs.

A call needs approval when its tool declares ``requires_approval`` or the
principal's ``[principals.NAME.approval]`` names the tool (``true``: every call;
a table of argument constraints, as JSON Schema ``properties``: the calls whose
arguments match it, e.g. ``issue_refund = { amount = { exclusiveMinimum = 100 } }``).
The check runs before each forward call, after the permission decision allowed
it (compensations never wait: undoing must not depend on a human being there).

The first time, the step's approval request is journaled (``request_approval``),
audited (action ``approval``, decision ``wait``) and the run stops ``waiting``.
``agentkeel approve RUN STEP`` / ``deny`` decide it (``AgentSystem.decide``):
the approver must be a principal holding the ``approve`` permission and, unless
``[approvals] allow_self = true``, not the requester. ``resume`` then runs the
step when approved, or denies it (the run aborts and compensates) when denied
or expired (``[approvals] ttl_s``, default one day). The approved arguments
must be the arguments the step runs with.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Any

from agentkeel.tools.validation import CompiledSchema
from agentkeel.types import Principal, StepStatus, ToolSpec

if TYPE_CHECKING:
    from agentkeel.context import RunContext
    from agentkeel.journal.base import Journal, Lease

APPROVE_PERMISSION = "approve"

AuditRecord = Callable[..., None]


def _canonical(args: Mapping[str, Any]) -> str:
    return json.dumps(args, sort_keys=True, separators=(",", ":"), ensure_ascii=False, default=str)


class ApprovalGate:
    """Decides, per forward call, whether it must wait for a human (one per system)."""

    def __init__(self, audit: AuditRecord, ttl_s: float) -> None:
        self.audit = audit
        self.ttl_s = ttl_s
        self._rules: dict[tuple[str, str], tuple[object, CompiledSchema]] = {}

    def needs_approval(self, principal: Principal, spec: ToolSpec, args: Mapping[str, Any]) -> bool:
        if spec.requires_approval:
            return True
        if spec.name not in principal.approvals:
            return False
        rule = principal.approvals[spec.name]
        if rule is None:
            return True
        key = (principal.name, spec.name)
        cached = self._rules.get(key)
        if cached is None or cached[0] is not rule:
            cached = self._rules[key] = (rule, CompiledSchema(dict(rule)))
        return not cached[1].errors(args)

    def check(
        self, run: RunContext, step_id: int, spec: ToolSpec, args: Mapping[str, Any], journal: Journal, lease: Lease
    ) -> tuple[StepStatus, str] | None:
        """None when the call may run; else the status the step stops in and why (the
        request for approval is journaled under ``lease`` the first time)."""
        record = journal.approval(run.run_id, step_id)
        how = f"`agentkeel approve {run.run_id} {step_id}` (or `deny`), then `agentkeel resume {run.run_id}`"
        if record is None:
            record = journal.request_approval(lease, step_id, spec.name, args, run.request.user_id, self.ttl_s)
            self.audit(run_id=run.run_id, principal=run.principal.name, action="approval", tool=spec.name,
                       decision="wait", reason=f"step {step_id} waits for approval", arg_keys=tuple(args))
            if run.listened:
                run.emit("approval_requested", step_id=step_id, tool=spec.name, args=dict(args),
                         expires_at=record.expires_at)
            return StepStatus.WAITING, f"{spec.name} needs approval: {how}"
        if record.tool_name != spec.name or _canonical(record.args) != _canonical(args):
            return StepStatus.DENIED, (
                f"the approval of step {step_id} was for {record.tool_name} with {dict(record.args)}, "
                f"not {spec.name} with {dict(args)}")
        status = record.status_at(time.time())
        if status == "approved":
            return None
        if status == "pending":
            since = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(record.requested_at))
            return StepStatus.WAITING, f"{spec.name} is still waiting for approval (asked {since}): {how}"
        if status == "denied":
            why = f": {record.reason}" if record.reason else ""
            return StepStatus.DENIED, f"{spec.name} was denied by {record.decided_by}{why}"
        until = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(record.expires_at))
        return StepStatus.DENIED, (f"the approval request for {spec.name} expired at {until} unanswered "
                                   "([approvals] ttl_s); an expired approval counts as a denial")
