"""Principal constraints: ``pattern`` is ECMA-262, and a bad one is refused when the config loads."""

from __future__ import annotations

from typing import Any

import pytest
from agentkeel import Config, Principal, tool
from agentkeel.errors import ConfigError
from agentkeel.permissions.default import PermissionsGate
from agentkeel.tools.decorator import spec_of

EMAIL = r"^[a-z]+@example\.com$"


@tool(permissions=["mail"], allow_uncancellable=True)
def send_email(to: str, subject: str = "") -> None:
    """Send an email."""


SEND = spec_of(send_email)
assert SEND is not None


def config(constraints: dict[str, Any]) -> Config:
    return Config.from_dict(
        {"principals": {"bob": {"permissions": ["mail"], "constraints": {"send_email": constraints}}}}, "<t>"
    )


def test_a_pattern_constraint_does_not_accept_a_trailing_newline() -> None:
    gate = PermissionsGate()
    bob = config({"to": {"type": "string", "pattern": EMAIL}}).principals["bob"]
    assert gate.agentkeel_authorize(bob, SEND, {"to": "bob@example.com"}).allowed
    for sneaky in ("bob@example.com\n", "bob@example.com\nattacker@evil.test", "\nbob@example.com"):
        decision = gate.agentkeel_authorize(bob, SEND, {"to": sneaky})
        assert not decision.allowed, sneaky
        assert decision.reason.startswith("constraint of 'bob' on send_email.to: ")
        assert "does not match" in decision.reason


def test_a_constraint_pattern_uses_ecma_262_classes() -> None:
    gate = PermissionsGate()
    bob = config({"to": {"pattern": r"^\d{4}$"}}).principals["bob"]
    assert gate.agentkeel_authorize(bob, SEND, {"to": "1234"}).allowed
    assert not gate.agentkeel_authorize(bob, SEND, {"to": "١٢٣٤"}).allowed  # Arabic-Indic digits are not \d


@pytest.mark.parametrize("pattern", [r"^(?P<user>[a-z]+)@example\.com$", r"(?i)^bob$", r"^bob\Z", r"^[a-z"])
def test_a_constraint_pattern_that_is_not_ecma_262_is_refused_at_load_naming_the_field(pattern: str) -> None:
    with pytest.raises(ConfigError) as caught:
        config({"to": {"type": "string", "pattern": pattern}})
    message = str(caught.value)
    assert "principals.bob.constraints.send_email: properties.to.pattern: " in message
    assert "is not an ECMA-262 regular expression" in message


def test_an_ecma_262_pattern_python_cannot_compile_is_accepted() -> None:
    bob = config({"to": {"pattern": r"^\p{Ll}+@example\.com$"}}).principals["bob"]
    gate = PermissionsGate()
    assert gate.agentkeel_authorize(bob, SEND, {"to": "zoë@example.com"}).allowed
    assert not gate.agentkeel_authorize(bob, SEND, {"to": "Zoë@example.com"}).allowed


def test_a_bad_pattern_that_bypassed_the_config_denies_every_call() -> None:
    bob = Principal("bob", frozenset({"mail"}), constraints={"send_email": {"to": {"pattern": "(?P<u>x)"}}})
    decision = PermissionsGate().agentkeel_authorize(bob, SEND, {"to": "x"})
    assert not decision.allowed
    assert decision.reason.startswith("constraint of 'bob' on send_email is invalid: properties.to.pattern: ")
