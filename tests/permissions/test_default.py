"""The default permissions gate: principals from the config, deny by default."""

from __future__ import annotations

from typing import Any

import pytest
from agentkeel import Config, Decision, Principal, tool
from agentkeel.permissions.default import PermissionsGate
from agentkeel.permissions.gate import NOBODY_ALLOWED, combine_decisions, visible_tools
from agentkeel.tools.decorator import spec_of
from agentkeel.types import ToolSpec


def spec(fn: Any) -> ToolSpec:
    found = spec_of(fn)
    assert found is not None
    return found


@tool(permissions=["refunds"], allow_uncancellable=True)
def refund(order_id: str, amount: float) -> None:
    """Refund an order."""


@tool(permissions=["refunds", "audit"], allow_uncancellable=True)
def refund_audited(order_id: str) -> None:
    """Refund with an audit trail."""


@tool(allow_uncancellable=True)
def open_tool() -> None:
    """A tool that declares no permissions."""


REFUND, AUDITED, OPEN = spec(refund), spec(refund_audited), spec(open_tool)


@pytest.fixture
def gate() -> PermissionsGate:
    return PermissionsGate()


def test_principals_come_from_the_config_and_strangers_get_nothing(gate: PermissionsGate) -> None:
    config = Config.from_dict({"principals": {"agent": {"permissions": ["refunds"], "tools": ["refund"]}}}, "<t>")
    agent = gate.agentkeel_resolve_principal("agent", config)
    assert agent == Principal("agent", frozenset({"refunds"}), frozenset({"refund"}))
    assert gate.agentkeel_resolve_principal("mallory", config) is None


def test_every_declared_permission_is_needed(gate: PermissionsGate) -> None:
    agent = Principal("agent", frozenset({"refunds"}))
    assert gate.agentkeel_authorize(agent, REFUND, None).allowed
    denied = gate.agentkeel_authorize(agent, AUDITED, {"order_id": "1"})
    assert not denied.allowed and denied.reason == "'agent' lacks permission(s) ['audit'] for 'refund_audited'"


def test_a_tool_without_permissions_is_callable_only_when_listed(gate: PermissionsGate) -> None:
    # Holding no permission is not a grant, and holding others is not either.
    for principal in (Principal("nobody"), Principal("agent", frozenset({"refunds"}))):
        decision = gate.agentkeel_authorize(principal, OPEN, None)
        assert not decision.allowed
        assert "declares no permissions" in decision.reason
        assert f"[principals.{principal.name}] tools" in decision.reason
    listed = Principal("ops", tools=frozenset({"open_tool"}))
    assert gate.agentkeel_authorize(listed, OPEN, {}) == Decision(True, "holds an explicit grant")


def test_the_tool_list_restricts_on_top_of_permissions(gate: PermissionsGate) -> None:
    agent = Principal("agent", frozenset({"refunds", "audit"}), tools=frozenset({"refund"}))
    assert gate.agentkeel_authorize(agent, REFUND, None).allowed
    decision = gate.agentkeel_authorize(agent, AUDITED, None)
    assert not decision.allowed and "'refund_audited' is not on the tool list of 'agent'" in decision.reason


def test_constraints_apply_to_the_arguments_of_each_call(gate: PermissionsGate) -> None:
    agent = Principal("agent", frozenset({"refunds"}), constraints={"refund": {"amount": {"maximum": 10}}})
    assert gate.agentkeel_authorize(agent, REFUND, None).allowed  # tool level: no arguments yet
    assert gate.agentkeel_authorize(agent, REFUND, {"order_id": "1", "amount": 10}).allowed
    too_much = gate.agentkeel_authorize(agent, REFUND, {"order_id": "1", "amount": 11})
    assert not too_much.allowed and too_much.reason.startswith("constraint of 'agent' on refund.amount:")


def test_constraint_validators_belong_to_their_configuration(gate: PermissionsGate) -> None:
    loose = Principal("agent", frozenset({"refunds"}), constraints={"refund": {"amount": {"maximum": 100}}})
    tight = Principal("agent", frozenset({"refunds"}), constraints={"refund": {"amount": {"maximum": 10}}})
    args = {"order_id": "1", "amount": 50}
    assert gate.agentkeel_authorize(loose, REFUND, args).allowed
    assert not gate.agentkeel_authorize(tight, REFUND, args).allowed  # not the cached loose validator
    assert not PermissionsGate().agentkeel_authorize(tight, REFUND, args).allowed


def test_decisions_combine_deny_by_default() -> None:
    yes, no, wait = Decision(True, "ok"), Decision(False, "no"), Decision(False, "approval pending", wait=True)
    assert combine_decisions([]) is NOBODY_ALLOWED and not NOBODY_ALLOWED.allowed
    assert combine_decisions([yes]) is yes
    assert combine_decisions([yes, no]) is no and combine_decisions([no, yes]) is no
    assert combine_decisions([yes, wait]) is wait  # a pending approval pauses...
    assert combine_decisions([wait, no]) is no  # ...unless someone denies outright


def test_visible_tools_are_those_the_principal_may_call(gate: PermissionsGate) -> None:
    tools = {"refund": REFUND, "refund_audited": AUDITED, "open_tool": OPEN}

    def authorize(principal: Principal, tool: ToolSpec, args: Any) -> Decision:
        return combine_decisions([gate.agentkeel_authorize(principal, tool, args)])

    agent = Principal("agent", frozenset({"refunds"}))
    assert sorted(visible_tools(agent, tools, authorize)) == ["refund"]
    assert visible_tools(Principal("nobody"), tools, authorize) == {}
