"""Meta-tests: every hook specification is documented and called by the host."""

from __future__ import annotations

import inspect
from collections.abc import Generator
from typing import Any

from agentkeel import AgentRequest, PlanTemplate, hookimpl, hookspecs
from agentkeel.testing import ScriptedPlanner, make_system

HOOK_NAMES = sorted(name for name, _ in inspect.getmembers(hookspecs, inspect.isfunction)
                    if name.startswith("agentkeel_"))


def test_every_hookspec_is_documented() -> None:
    assert len(HOOK_NAMES) >= 15
    for name in HOOK_NAMES:
        spec = getattr(hookspecs, name)
        doc = inspect.getdoc(spec) or ""
        assert "firstresult" in doc, f"{name} must say whether it is firstresult"
        opts = spec.agentkeel_spec
        if opts.get("firstresult"):
            assert "Not firstresult" not in doc, name
        else:
            assert "Not firstresult" in doc, f"{name} is not firstresult and must say so"


def make_tracer() -> Any:
    """A plugin wrapping every hook (``wrapper=True``) to record that the host called it."""
    called: set[str] = set()

    def wrapper(name: str) -> Any:
        @hookimpl(wrapper=True, specname=name)
        def trace() -> Generator[None, Any, Any]:
            called.add(name)
            return (yield)

        return staticmethod(trace)

    tracer_cls = type("Tracer", (), {f"trace_{n}": wrapper(n) for n in HOOK_NAMES})
    tracer = tracer_cls()
    tracer.called = called
    return tracer


async def test_every_hook_is_called_by_one_request() -> None:
    from tests.test_system import AGENT, Shop, refund_if_shipped

    class Templates:
        @hookimpl
        def agentkeel_register_plan_templates(self, register: Any) -> None:
            register(PlanTemplate(pattern="never matches", steps=[], name="t"))

    tracer = make_tracer()
    system = make_system(Shop(), Templates(), ScriptedPlanner(refund_if_shipped("1")), tracer, principals=AGENT)
    # Registration hooks are called per implementation (see hookspecs): they show in the registries.
    assert system.tools and system.sandboxes and system.templates
    async with system:
        response = await system.run(AgentRequest(message="m", user_id="agent"))
    assert response.ok, response.message
    # Two hooks are not reached by a request that succeeds at once; call them as the host would.
    system.plugins.model_price("gpt-4o-mini", system.config)
    step = response.plan.steps[0] if response.plan else None
    assert step is not None
    from agentkeel.context import RunContext
    from agentkeel.cost.budget import Budget

    run = RunContext(AgentRequest(message="m", user_id="agent"), system.config.principals["agent"],
                     system.config, Budget(1.0), system.pricer, system)
    system.plugins.recover(step, system.tools["lookup"], "boom", 1, True, run)
    registration = {n for n in HOOK_NAMES if n.startswith("agentkeel_register_")}
    assert len(registration) == 3
    assert sorted(tracer.called) == sorted(set(HOOK_NAMES) - registration)
