"""Rule templates run on RE2: matching is linear in the message's length, and a
pattern RE2 cannot run is refused when the template is built, naming it."""

from __future__ import annotations

import time
from typing import Any

import pytest
from agentkeel import AgentRequest, Config, PlanTemplate, Principal, hookimpl
from agentkeel.context import RunContext
from agentkeel.cost.budget import Budget, Pricer
from agentkeel.errors import PluginError
from agentkeel.planner import rules
from agentkeel.testing import make_system
from agentkeel.tools.decorator import spec_of
from agentkeel.types import ToolSpec
from agentkeel_pycode import plugin as pycode
from agentkeel_support.plugin import TEMPLATES as SUPPORT_TEMPLATES
from agentkeel_support.tools import ALL_TOOLS as SUPPORT_TOOLS

KB64 = 64 * 1024


def demo_templates() -> list[PlanTemplate]:
    templates = list(SUPPORT_TEMPLATES)
    pycode.agentkeel_register_plan_templates(register=templates.append)
    return templates


def demo_tools() -> dict[str, ToolSpec]:
    tools = {}
    for fn in (*SUPPORT_TOOLS, pycode.run_python, pycode.describe_sandbox):
        spec = spec_of(fn)
        assert spec is not None
        tools[spec.name] = spec
    return tools


def plan(message: str) -> tuple[Any, float]:
    config = Config.from_dict({}, "<test>")
    request = AgentRequest(message=message, user_id="u")
    run = RunContext(request, Principal("u"), config, Budget(1.0), Pricer(lambda model, cfg: None, config),
                     demo_tools())
    start = time.perf_counter()
    found = rules.agentkeel_plan(request=request, run=run, templates=demo_templates())
    return found, time.perf_counter() - start


def padded(head: str, filler: str, tail: str, size: int = KB64) -> str:
    return head + filler * ((size - len(head) - len(tail)) // len(filler)) + tail


# Each was quadratic or worse under Python's re with the demo templates: 16,000
# spaces in the first took 4.6 s, 64 KB close to a minute of CPU.
HOSTILE = [
    padded("refund order 1001", " ", "x"),
    padded("refund order 1001", " \t\n", " if it has shipped and do something else"),
    padded("please refund order 1001 ,", " ", ", and email the customer!!"),
    padded("check if order 7 has", "  been ", "x"),
    padded("is ", "\t", " in stock?"),
    padded("is", " ", "."),
    padded("run python:", " ", "\n"),
]


@pytest.mark.parametrize("message", HOSTILE, ids=range(len(HOSTILE)))
def test_a_64_kb_whitespace_heavy_message_is_decided_well_under_a_second(message: str) -> None:
    assert len(message) >= KB64 - 64
    found, elapsed = plan(message)
    assert found is None
    assert elapsed < 0.25, f"{elapsed:.3f} s"


def test_a_64_kb_message_a_template_matches_is_planned_quickly() -> None:
    code = padded("", "x = 1;     ", "print(x)")
    found, elapsed = plan("run python: " + code)
    assert found is not None and found.planner == "rules:pycode:run"
    assert found.steps[0].tool_args == {"code": code}
    assert elapsed < 0.25, f"{elapsed:.3f} s"
    found, _ = plan(padded("refund order 1001", " ", "if it has shipped"))
    assert found is not None and found.planner == "rules:support:refund_if_shipped"


def test_a_message_past_the_cap_is_left_to_the_next_planner() -> None:
    message = "run python: " + "x" * rules.TEMPLATE_MAX_CHARS
    found, elapsed = plan(message)
    assert found is None
    assert elapsed < 0.05
    assert plan("run python: print(1)")[0] is not None


def test_named_groups_and_case_insensitivity_keep_working() -> None:
    template = PlanTemplate(pattern=r"look up (?P<order>\w+) and (?<other>\d+)", name="t",
                            steps=[{"description": "x", "tool_name": "t", "tool_args": {"a": "{order}",
                                                                                         "b": "{other}"}}])
    wire = template.match("  LOOK UP A7 and 12  ")
    assert wire is not None and wire["steps"][0]["tool_args"] == {"a": "A7", "b": "12"}
    assert template.match("look up A7 and 12 please") is None  # the whole message must match
    found, _ = plan("Refund order #A-12, if it has shipped, and email the customer.")
    assert found is not None and [s.tool_name for s in found.steps] == ["lookup_order", "issue_refund", "send_email"]
    assert found.steps[0].tool_args == {"order_id": "A-12"}


@pytest.mark.parametrize(
    ("pattern", "reason"),
    [
        (r"refund (\d+) and \1", "invalid escape sequence: \\1"),
        (r"refund (?=order)\w+", "invalid perl operator: (?="),
        (r"(?<!no )refund", "invalid perl operator: (?<!"),
        (r"refund (?P<id>\d+", "missing )"),
        (r"refund \d+\Z", "invalid escape sequence: \\Z"),
        (r"(?x) refund", "invalid perl operator: (?x"),
    ],
)
def test_a_pattern_re2_cannot_run_is_refused_when_the_template_is_built(pattern: str, reason: str) -> None:
    with pytest.raises(ValueError) as caught:
        PlanTemplate(pattern=pattern, steps=[], name="shop:bad")
    message = str(caught.value)
    assert message.startswith("plan template 'shop:bad': pattern ")
    assert reason in message and "RE2" in message


def test_a_plugin_registering_a_bad_template_fails_at_load_naming_plugin_and_template() -> None:
    class Broken:
        @hookimpl
        def agentkeel_register_plan_templates(self, register: Any) -> None:
            register(PlanTemplate(pattern=r"(a+)\1", steps=[], name="broken:backref"))

    with pytest.raises(PluginError) as caught:
        make_system(Broken())
    assert "plan template 'broken:backref'" in str(caught.value)
    assert "invalid escape sequence" in str(caught.value)


def test_a_template_pattern_must_be_a_string() -> None:
    with pytest.raises(ValueError, match="plan template 'x': the pattern must be a string"):
        PlanTemplate(pattern=b"refund", steps=[], name="x")  # type: ignore[arg-type]
