"""The OpenTelemetry plugin's spans, captured with the SDK's in-memory exporter, for a
run planned by the LLM planner (the real openai client over HTTP to the scripted
server) whose steps retry, fall back and, when the last step fails, compensate."""

from __future__ import annotations

import json
import logging
from collections.abc import Iterator
from typing import Any

import pytest

pytest.importorskip("agentkeel_otel")
pytest.importorskip("opentelemetry.sdk")

from agentkeel import AgentRequest, Config, RunStatus, StepStatus, hookimpl, tool
from agentkeel.errors import ToolError
from agentkeel.runtime.system import AgentSystem
from agentkeel.testing.server import ScriptedOpenAIServer
from agentkeel_otel import Telemetry
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import InMemoryMetricReader
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import StatusCode

CALLS: dict[str, int] = {}
EFFECTS: list[str] = []


def _count(name: str) -> int:
    CALLS[name] = CALLS.get(name, 0) + 1
    return CALLS[name]


@tool(permissions=["ops"], rollback="unbook")
async def book(room: str, idempotency_key: str) -> dict[str, Any]:
    """Book a room."""
    EFFECTS.append(f"book {room}")
    return {"booking": f"B-{room}"}


@tool(permissions=["ops"])
async def unbook(booking: str, idempotency_key: str) -> dict[str, Any]:
    """Cancel a booking."""
    EFFECTS.append(f"unbook {booking}")
    return {"cancelled": booking}


@tool(permissions=["ops"], idempotent=True)
async def flaky_lookup(room: str) -> dict[str, Any]:
    """Look a room up; the first call fails."""
    if _count("flaky_lookup") == 1:
        raise ToolError("lookup service busy", retryable=True)
    return {"room": room, "floor": 3}


@tool(permissions=["ops"], fallback="backup_notify")
async def notify(text: str) -> dict[str, Any]:
    """Notify the guest (down)."""
    _count("notify")
    raise ToolError("notification service down", retryable=False)


@tool(permissions=["ops"])
async def backup_notify(text: str) -> dict[str, Any]:
    """Notify the guest another way."""
    _count("backup_notify")
    logging.getLogger("agentkeel.tests.otel").warning("backup notification sent")
    return {"sent": True}


@tool(permissions=["ops"])
async def charge(amount: float) -> dict[str, Any]:
    """Charge the guest (declined)."""
    raise ToolError("card declined", retryable=False)


class Tools:
    @hookimpl
    def agentkeel_register_tools(self, register: Any) -> None:
        for fn in (book, unbook, flaky_lookup, notify, backup_notify, charge):
            register(fn)


PLAN = {
    "reasoning": "book, look up, notify, charge",
    "steps": [
        {"description": "book", "tool_name": "book", "tool_args": {"room": "12"}},
        {"description": "look up", "tool_name": "flaky_lookup", "tool_args": {"room": "12"}},
        {"description": "notify", "tool_name": "notify", "tool_args": {"text": "booked room 12 for Ada"}},
        {"description": "charge", "tool_name": "charge", "tool_args": {"amount": 99.5}},
    ],
}

CONFIG: dict[str, Any] = {
    "principals": {"ada": {"permissions": ["ops"]}},
    "models": {"tiers": [{"name": "fast", "model": "gpt-4o-mini", "max_tokens": 512}]},
    "retry": {"base_delay_s": 0.0, "max_delay_s": 0.0},
    "recovery": {"max_replans": 0},
    "journal": {"backend": "memory"},
}


@pytest.fixture
def captured() -> Iterator[tuple[InMemorySpanExporter, InMemoryMetricReader, TracerProvider]]:
    CALLS.clear()
    EFFECTS.clear()
    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    reader = InMemoryMetricReader()
    yield exporter, reader, provider
    provider.shutdown()


def _by_name(spans: list[ReadableSpan], name: str) -> list[ReadableSpan]:
    return [s for s in spans if s.name == name]


def _children(spans: list[ReadableSpan], parent: ReadableSpan) -> list[ReadableSpan]:
    pid = parent.context.span_id
    return sorted((s for s in spans if s.parent is not None and s.parent.span_id == pid),
                  key=lambda s: s.start_time or 0)


async def _run(openai_server_env: ScriptedOpenAIServer, telemetry: Telemetry, **extra: Any) -> Any:
    openai_server_env.queue(PLAN, usage=(1200, 150))
    openai_server_env.queue("The charge was declined; the booking was undone.", usage=(800, 20))
    config = Config.from_dict({**CONFIG, **extra})
    async with AgentSystem(config, plugins=[Tools(), telemetry], load_entrypoints=False) as system:
        return await system.run(AgentRequest(message="book room 12 for Ada and charge her card", user_id="ada"))


async def test_span_tree_of_a_run_with_retry_fallback_and_compensation(
    openai_server_env: ScriptedOpenAIServer, captured: Any, caplog: pytest.LogCaptureFixture
) -> None:
    exporter, reader, provider = captured
    telemetry = Telemetry(provider, MeterProvider(metric_readers=[reader]), capture_content=False)
    response = await _run(openai_server_env, telemetry)
    assert response.status is RunStatus.FAILED, response.message
    assert [s.status for s in response.steps] == [StepStatus.COMPENSATED, StepStatus.SUCCEEDED,
                                                  StepStatus.SUCCEEDED, StepStatus.FAILED]
    assert EFFECTS == ["book 12", "unbook B-12"]

    spans = list(exporter.get_finished_spans())
    (root,) = _by_name(spans, "invoke_agent agentkeel")
    assert root.parent is None
    assert {s.context.trace_id for s in spans} == {root.context.trace_id}
    assert root.attributes["gen_ai.operation.name"] == "invoke_agent"
    assert root.attributes["agentkeel.run_id"] == response.run_id
    assert root.attributes["agentkeel.status"] == "failed"
    assert root.attributes["gen_ai.usage.input_tokens"] == 2000
    assert root.attributes["gen_ai.usage.output_tokens"] == 170
    assert root.status.status_code is StatusCode.ERROR

    top = [s.name for s in _children(spans, root)]
    assert top == ["agentkeel.permissions", "agentkeel.memory", "agentkeel.plan", "agentkeel.plan_check",
                   "agentkeel.step", "agentkeel.step", "agentkeel.step", "agentkeel.step",
                   "agentkeel.compensate", "agentkeel.respond"]

    (plan,) = _by_name(spans, "agentkeel.plan")
    (planner_call,) = _children(spans, plan)
    assert planner_call.name == "chat gpt-4o-mini"
    attrs = planner_call.attributes
    assert attrs["gen_ai.operation.name"] == "chat"
    assert attrs["gen_ai.request.model"] == "gpt-4o-mini"
    assert attrs["gen_ai.usage.input_tokens"] == 1200 and attrs["gen_ai.usage.output_tokens"] == 150
    assert attrs["gen_ai.response.finish_reasons"] == ("stop",)
    assert attrs["server.address"] == "127.0.0.1"
    assert attrs["agentkeel.tier"] == "fast" and attrs["agentkeel.purpose"] == "plan"
    assert attrs["agentkeel.cost_usd"] == pytest.approx((1200 * 0.15 + 150 * 0.60) / 1e6)
    (respond,) = _by_name(spans, "agentkeel.respond")
    assert [c.name for c in _children(spans, respond)] == ["chat gpt-4o-mini"]

    steps = [s for s in _children(spans, root) if s.name == "agentkeel.step"]
    assert [s.attributes["agentkeel.step_id"] for s in steps] == [1, 2, 3, 4]
    assert [s.attributes["agentkeel.status"] for s in steps] == ["succeeded", "succeeded", "succeeded", "failed"]
    assert steps[3].status.status_code is StatusCode.ERROR

    def tools_of(step: ReadableSpan) -> list[tuple[str, Any, Any]]:
        return [(c.attributes["gen_ai.tool.name"], c.attributes["agentkeel.attempt"], c.status.status_code)
                for c in _children(spans, step) if c.name.startswith("execute_tool ")]

    # The retry: two attempts of the idempotent lookup, the first an error; a "retry" event on the step.
    assert tools_of(steps[1]) == [("flaky_lookup", 1, StatusCode.ERROR), ("flaky_lookup", 2, StatusCode.UNSET)]
    assert [e.name for e in steps[1].events] == ["retry"]
    assert [c.name for c in _children(spans, steps[1])] == [
        "execute_tool flaky_lookup", "agentkeel.recover", "execute_tool flaky_lookup", "agentkeel.evaluate"]
    # The fallback: notify failed, backup_notify ran in the same step.
    assert tools_of(steps[2]) == [("notify", 1, StatusCode.ERROR), ("backup_notify", 1, StatusCode.UNSET)]
    assert [e.name for e in steps[2].events] == ["fallback"]
    assert steps[2].attributes["gen_ai.tool.name"] == "backup_notify"
    (recover,) = [c for c in _children(spans, steps[2]) if c.name == "agentkeel.recover"]
    assert recover.attributes["agentkeel.action"] == "fallback"
    assert recover.attributes["agentkeel.fallback_tool"] == "backup_notify"

    tool_span = _children(spans, steps[0])[0]
    assert tool_span.name == "execute_tool book"
    assert tool_span.attributes["gen_ai.operation.name"] == "execute_tool"
    assert tool_span.attributes["gen_ai.tool.call.id"] == f"{response.run_id}:1"
    assert tool_span.attributes["agentkeel.idempotency_key"] == f"{response.run_id}:1"
    assert tool_span.attributes["agentkeel.sandbox"] == "inprocess"
    evaluate = _children(spans, steps[0])[1]
    assert evaluate.name == "agentkeel.evaluate" and evaluate.attributes["agentkeel.passed"] is True

    # The compensation: one compensation step under the compensate span, undoing step 1 with unbook.
    (compensate,) = _by_name(spans, "agentkeel.compensate")
    (undo,) = _children(spans, compensate)
    assert undo.name == "agentkeel.step"
    assert undo.attributes["agentkeel.call_kind"] == "compensation"
    assert undo.attributes["agentkeel.step_id"] == 1 and undo.attributes["agentkeel.compensates"] == "book"
    (undo_call,) = [c for c in _children(spans, undo) if c.name.startswith("execute_tool")]
    assert undo_call.attributes["gen_ai.tool.name"] == "unbook"
    assert undo_call.attributes["agentkeel.call_kind"] == "compensation"

    # Contents are off by default: no prompt, no output, no arguments anywhere.
    every = json.dumps([dict(s.attributes or {}) for s in spans], default=str)
    assert "Ada" not in every and "gen_ai.input.messages" not in every
    assert "gen_ai.tool.call.arguments" not in every and "declined; the booking" not in every


async def test_contents_are_recorded_when_switched_on(openai_server_env: ScriptedOpenAIServer,
                                                       captured: Any) -> None:
    exporter, _, provider = captured
    telemetry = Telemetry(provider, capture_content=None)
    response = await _run(openai_server_env, telemetry, plugins={"otel": {"capture_content": True}})
    assert response.status is RunStatus.FAILED
    spans = list(exporter.get_finished_spans())
    (planner_call,) = _children(spans, _by_name(spans, "agentkeel.plan")[0])
    messages = json.loads(planner_call.attributes["gen_ai.input.messages"])
    assert any("book room 12 for Ada" in json.dumps(m) for m in messages)
    output = json.loads(planner_call.attributes["gen_ai.output.messages"])
    assert json.loads(output[0]["parts"][0]["content"])["steps"][0]["tool_name"] == "book"
    (book_call,) = _by_name(spans, "execute_tool book")
    assert json.loads(book_call.attributes["gen_ai.tool.call.arguments"]) == {"room": "12"}
    assert json.loads(book_call.attributes["gen_ai.tool.call.result"]) == {"booking": "B-12"}


async def test_metrics_follow_the_run(openai_server_env: ScriptedOpenAIServer, captured: Any) -> None:
    _, reader, provider = captured
    telemetry = Telemetry(provider, MeterProvider(metric_readers=[reader]))
    response = await _run(openai_server_env, telemetry)
    data = reader.get_metrics_data()
    points: dict[str, list[Any]] = {}
    for rm in data.resource_metrics:
        for sm in rm.scope_metrics:
            for metric in sm.metrics:
                points[metric.name] = list(metric.data.data_points)
    (runs,) = points["agentkeel.runs"]
    assert dict(runs.attributes) == {"status": "failed"} and runs.value == 1
    tokens = {(p.attributes["model"], p.attributes["direction"]): p.value for p in points["agentkeel.llm.tokens"]}
    assert tokens == {("gpt-4o-mini", "input"): 2000, ("gpt-4o-mini", "output"): 170}
    (cost,) = points["agentkeel.cost"]
    assert cost.value == pytest.approx(response.total_cost_usd)
    steps = {(p.attributes["tool"], p.attributes["status"]): p.count for p in points["agentkeel.step.duration"]}
    assert steps == {("book", "succeeded"): 1, ("flaky_lookup", "succeeded"): 1,
                     ("backup_notify", "succeeded"): 1, ("charge", "failed"): 1}
    usage = {p.attributes["gen_ai.token.type"]: p.sum for p in points["gen_ai.client.token.usage"]}
    assert usage == {"input": 2000, "output": 170}
    (duration,) = points["gen_ai.client.operation.duration"]
    assert duration.count == 2


async def test_logs_carry_the_trace(openai_server_env: ScriptedOpenAIServer, captured: Any,
                                    caplog: pytest.LogCaptureFixture) -> None:
    from agentkeel.logs import current_fields

    exporter, _, provider = captured
    seen: list[dict[str, Any]] = []

    class Grab(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            seen.append(current_fields())

    handler = Grab()
    logging.getLogger("agentkeel.tests.otel").addHandler(handler)
    try:
        telemetry = Telemetry(provider)
        response = await _run(openai_server_env, telemetry)
    finally:
        logging.getLogger("agentkeel.tests.otel").removeHandler(handler)
    (fields,) = seen
    (call,) = _by_name(list(exporter.get_finished_spans()), "execute_tool backup_notify")
    assert fields["run_id"] == response.run_id and fields["step_id"] == 3
    assert fields["trace_id"] == format(call.context.trace_id, "032x")
    assert fields["span_id"] == format(call.context.span_id, "016x")


@tool(permissions=["ops"], requires_approval=True, idempotent=True)
async def open_vault(vault: str) -> dict[str, Any]:
    """Open a vault (needs a human's approval)."""
    return {"opened": vault}


class VaultTools:
    @hookimpl
    def agentkeel_register_tools(self, register: Any) -> None:
        register(open_vault)


async def test_a_resumed_run_links_to_the_trace_it_began_in(openai_server_env: ScriptedOpenAIServer,
                                                            captured: Any, tmp_path: Any) -> None:
    exporter, _, provider = captured
    plan = {"reasoning": "open it", "steps": [
        {"description": "open", "tool_name": "open_vault", "tool_args": {"vault": "7"}}]}
    openai_server_env.queue(plan, usage=(100, 10))
    openai_server_env.queue("Waiting for an approval.", usage=(50, 5))
    openai_server_env.queue("The vault is open.", usage=(50, 5))
    config = Config.from_dict({
        **CONFIG, "home": str(tmp_path), "journal": {"backend": "sqlite"},
        "principals": {"ada": {"permissions": ["ops"]}, "boss": {"permissions": ["approve"]}},
    })
    async with AgentSystem(config, plugins=[VaultTools(), Telemetry(provider)], load_entrypoints=False) as first:
        waiting = await first.run(AgentRequest(message="open vault 7", user_id="ada"))
        assert waiting.status is RunStatus.WAITING, waiting.message
        first.decide(waiting.run_id, 1, approver="boss", approved=True)
    began = {s.context.span_id: s for s in exporter.get_finished_spans() if s.name == "invoke_agent agentkeel"}
    (first_root,) = began.values()
    # Another system (as after a restart): the link comes from the journal, not from memory.
    async with AgentSystem(config, plugins=[VaultTools(), Telemetry(provider)], load_entrypoints=False) as second:
        done = await second.resume(waiting.run_id)
    assert done.status is RunStatus.SUCCEEDED, done.message
    roots = [s for s in exporter.get_finished_spans() if s.name == "invoke_agent agentkeel"]
    assert len(roots) == 2
    resumed = next(s for s in roots if s.context.span_id != first_root.context.span_id)
    assert resumed.attributes["agentkeel.resumed"] == "resume"
    assert resumed.attributes["agentkeel.run_id"] == waiting.run_id
    (link,) = resumed.links
    assert (link.context.trace_id, link.context.span_id) == (first_root.context.trace_id,
                                                             first_root.context.span_id)
    steps = [s for s in exporter.get_finished_spans() if s.name == "agentkeel.step"
             and s.context.trace_id == resumed.context.trace_id]
    assert [s.attributes["agentkeel.status"] for s in steps] == ["succeeded"]


@tool(permissions=["ops"], idempotent=True)
async def always_busy(room: str) -> dict[str, Any]:
    """Always busy."""
    raise ToolError("busy", retryable=True)


class BusyTools:
    @hookimpl
    def agentkeel_register_tools(self, register: Any) -> None:
        register(always_busy)


async def test_breaker_state_changes_are_counted_and_marked(openai_server_env: ScriptedOpenAIServer,
                                                            captured: Any) -> None:
    exporter, reader, provider = captured
    plan = {"reasoning": "try", "steps": [
        {"description": "try", "tool_name": "always_busy", "tool_args": {"room": "1"}}]}
    openai_server_env.queue(plan, usage=(10, 10))
    openai_server_env.queue("It is busy.", usage=(10, 10))
    config = Config.from_dict({**CONFIG, "breaker": {"failure_threshold": 2, "reset_after_s": 60}})
    telemetry = Telemetry(provider, MeterProvider(metric_readers=[reader]))
    async with AgentSystem(config, plugins=[BusyTools(), telemetry], load_entrypoints=False) as system:
        response = await system.run(AgentRequest(message="try room 1", user_id="ada"))
    assert response.status is RunStatus.FAILED
    assert response.steps[0].attempts == 3  # the third attempt is refused by the open breaker
    changes = [p for rm in reader.get_metrics_data().resource_metrics for sm in rm.scope_metrics
               for m in sm.metrics if m.name == "agentkeel.breaker.state_changes" for p in m.data.data_points]
    assert [(dict(p.attributes), p.value) for p in changes] == [({"tool": "always_busy", "state": "open"}, 1)]
    (step,) = _by_name(list(exporter.get_finished_spans()), "agentkeel.step")
    marks = [(e.name, dict(e.attributes or {})) for e in step.events if e.name == "breaker_state"]
    assert marks == [("breaker_state", {"gen_ai.tool.name": "always_busy", "agentkeel.breaker.previous": "closed",
                                        "agentkeel.breaker.state": "open"})]


async def test_log_fields_come_and_go_with_the_system(openai_server_env: ScriptedOpenAIServer) -> None:
    from agentkeel import logs
    from opentelemetry import metrics, trace

    telemetry = Telemetry(trace.NoOpTracerProvider(), metrics.NoOpMeterProvider())
    response = await _run(openai_server_env, telemetry)
    assert response.status is RunStatus.FAILED
    assert telemetry.log_fields not in logs._providers  # the system closed: no provider left behind
    token = logs.RUN_ID.set(response.run_id)
    try:
        assert telemetry.log_fields() == {}  # a no-op provider has no trace to join: no zero ids
    finally:
        logs.RUN_ID.reset(token)
