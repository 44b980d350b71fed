"""Spans and metrics from agentkeel's observer events and its tool-call wrapper hook.

Spans of one run:

- ``invoke_agent agentkeel``: the run (``run_started`` to ``run_finished``), or its
  resumption (``run_resumed``, linked to the span the run began in: its trace
  context is journaled with the run);
- one child per phase (``phase_started``/``phase_finished``): ``agentkeel.permissions``,
  ``agentkeel.memory``, ``agentkeel.plan`` (with a ``chat MODEL`` span per LLM call),
  ``agentkeel.plan_check``, ``agentkeel.step`` (forward or compensation) with an
  ``execute_tool TOOL`` span per attempt (from the ``agentkeel_call_tool`` wrapper)
  and ``agentkeel.evaluate`` / ``agentkeel.recover`` beside it, ``agentkeel.compensate``,
  ``agentkeel.respond``.

A phase span is made current while it lasts, so spans and logs made inside it (a
tool's own, an HTTP client's) are its children. Model calls and tool executions
follow the OpenTelemetry GenAI semantic conventions (``gen_ai.*``); everything
else is ``agentkeel.*``. Contents (prompts, model output, tool arguments and
results, evaluator reasons) may be personal data: they are recorded only with
``capture_content`` (``OTEL_INSTRUMENTATION_GENAI_CAPTURE_MESSAGE_CONTENT=true`` or
``[plugins.otel] capture_content = true``).

Metrics count what the service's Prometheus ``/metrics`` counts, from the same
events, so both show the same numbers: runs by status, run and step durations,
LLM tokens, cost, budget refusals; plus breaker state changes and the GenAI
client metrics (``gen_ai.client.token.usage``, ``gen_ai.client.operation.duration``).
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Awaitable, Callable, Generator, Mapping
from typing import Any
from urllib.parse import urlsplit

import attrs
from agentkeel.logs import RUN_ID, add_fields, remove_fields
from agentkeel.markers import hookimpl
from agentkeel.types import AgentRequest, AgentResponse, Event, RunStatus, StepResult, StepStatus
from opentelemetry import context as otel_context
from opentelemetry import metrics, trace
from opentelemetry.metrics import MeterProvider
from opentelemetry.trace import Link, Span, SpanKind, Status, StatusCode, TracerProvider
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

SCOPE = "agentkeel"
AGENT_NAME = "agentkeel"
CAPTURE_ENV = "OTEL_INSTRUMENTATION_GENAI_CAPTURE_MESSAGE_CONTENT"

CONTENT_KEYS = frozenset({"messages", "output", "reason", "problems", "args", "result"})
"""Phase attributes that may hold personal data: recorded only with ``capture_content``."""

_PROPAGATOR = TraceContextTextMapPropagator()
_STEP_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
_OK_RUNS = (RunStatus.SUCCEEDED, RunStatus.DEGRADED, RunStatus.WAITING, RunStatus.RUNNING)


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("agentkeel-otel")
    except PackageNotFoundError:  # a source tree on the path
        return "0"


def content_from_environment() -> bool | None:
    """``OTEL_INSTRUMENTATION_GENAI_CAPTURE_MESSAGE_CONTENT`` as a bool (None when unset)."""
    value = os.environ.get(CAPTURE_ENV)
    if value is None or not value.strip():
        return None
    return value.strip().lower() in ("1", "true", "yes", "on")


@attrs.define
class _Open:
    span: Span
    token: object | None


@attrs.define
class _RunSpans:
    """The spans of one run this process is serving, by the span number of its phases."""

    root: Span
    phases: dict[int, _Open] = attrs.field(factory=dict)
    ours: set[int] = attrs.field(factory=set)
    """The span ids of every open span of the run (to tell our current span from a foreign one)."""


class Telemetry:
    """The plugin: register an instance (``AgentSystem(plugins=[Telemetry(...)])``) or let
    the ``otel`` entry point register one configured from the environment.

    :param tracer_provider: where spans go (default: the global provider).
    :param meter_provider: where metrics go (default: the global provider).
    :param capture_content: record contents (default: the environment variable, else
        ``[plugins.otel] capture_content``, else off).
    """

    def __init__(self, tracer_provider: TracerProvider | None = None, meter_provider: MeterProvider | None = None,
                 *, capture_content: bool | None = None) -> None:
        version = _version()
        self.tracer = trace.get_tracer(SCOPE, version, tracer_provider=tracer_provider)
        meter = metrics.get_meter(SCOPE, version, meter_provider=meter_provider)
        self._capture_explicit = capture_content
        self.capture_content = bool(capture_content) if capture_content is not None else bool(
            content_from_environment())
        self._runs: dict[str, _RunSpans] = {}
        self.runs = meter.create_counter("agentkeel.runs", unit="{run}", description="Runs finished, by status")
        self.run_duration = meter.create_histogram("agentkeel.run.duration", unit="s",
                                                   description="Run duration, by status")
        self.step_duration = meter.create_histogram(
            "agentkeel.step.duration", unit="s", description="Step latency, by tool and status",
            explicit_bucket_boundaries_advisory=list(_STEP_BUCKETS))
        self.tokens = meter.create_counter("agentkeel.llm.tokens", unit="{token}",
                                           description="LLM tokens, by model, tier and direction")
        self.cost = meter.create_counter("agentkeel.cost", unit="USD",
                                         description="Spend in USD, by kind (llm or tool), model and tier")
        self.budget_refusals = meter.create_counter(
            "agentkeel.budget.refusals", unit="{run}",
            description="Runs stopped because a budget could not afford a call")
        self.breaker_changes = meter.create_counter(
            "agentkeel.breaker.state_changes", unit="{change}",
            description="Circuit breaker state changes, by tool and the state entered")
        self.token_usage = meter.create_histogram("gen_ai.client.token.usage", unit="{token}",
                                                  description="Tokens used per LLM call (GenAI conventions)")
        self.operation_duration = meter.create_histogram(
            "gen_ai.client.operation.duration", unit="s", description="LLM call duration (GenAI conventions)")
        self._llm_started: dict[tuple[str, int], float] = {}
        self._systems = 0

    # --- lifecycle --------------------------------------------------------------------

    @hookimpl
    def agentkeel_startup(self, config: Any) -> None:
        self._systems += 1
        add_fields(self.log_fields)  # log records get trace_id/span_id while a system runs
        if self._capture_explicit is None and content_from_environment() is None:
            section = config.section("plugins", "otel")
            value = section.get("capture_content")
            if value is not None and not isinstance(value, bool):
                from agentkeel.errors import ConfigError

                raise ConfigError(f"plugins.otel.capture_content: must be true or false, got {value!r}")
            self.capture_content = bool(value)

    @hookimpl
    def agentkeel_shutdown(self) -> None:
        self._systems = max(0, self._systems - 1)
        if self._systems == 0:
            remove_fields(self.log_fields)

    # --- observer events ----------------------------------------------------------------

    @hookimpl
    def agentkeel_event(self, event: Event) -> None:
        handler = _HANDLERS.get(event.kind)
        if handler is not None:
            handler(self, event.run_id, event.data)

    def _run_started(self, run_id: str, data: Mapping[str, Any]) -> None:
        request = data.get("request")
        root = self.tracer.start_span(f"invoke_agent {AGENT_NAME}", kind=SpanKind.INTERNAL,
                                      attributes=self._run_attributes(run_id, request))
        self._runs[run_id] = _RunSpans(root, ours={root.get_span_context().span_id})
        carrier = data.get("trace")
        if isinstance(carrier, dict):
            _PROPAGATOR.inject(carrier, context=trace.set_span_in_context(root))

    def _run_resumed(self, run_id: str, data: Mapping[str, Any]) -> None:
        links = []
        earlier = data.get("earlier_trace")
        if isinstance(earlier, Mapping):
            linked = trace.get_current_span(_PROPAGATOR.extract(dict(earlier))).get_span_context()
            if linked.is_valid:
                links.append(Link(linked, {"agentkeel.link": "run began"}))
        attributes = self._run_attributes(run_id, data.get("request"))
        attributes["agentkeel.resumed"] = str(data.get("action", "resume"))
        root = self.tracer.start_span(f"invoke_agent {AGENT_NAME}", kind=SpanKind.INTERNAL, attributes=attributes,
                                      links=links)
        stale = self._runs.pop(run_id, None)
        if stale is not None:  # a resume in the same process as the start: the older root ends here
            stale.root.end()
        self._runs[run_id] = _RunSpans(root, ours={root.get_span_context().span_id})

    @staticmethod
    def _run_attributes(run_id: str, request: Any) -> dict[str, Any]:
        attributes: dict[str, Any] = {"gen_ai.operation.name": "invoke_agent", "gen_ai.agent.name": AGENT_NAME,
                                      "agentkeel.run_id": run_id}
        if isinstance(request, AgentRequest):
            attributes["gen_ai.conversation.id"] = request.session_id
            attributes["agentkeel.user_id"] = request.user_id
            if request.budget_usd is not None:
                attributes["agentkeel.budget_usd"] = request.budget_usd
        return attributes

    def _run_finished(self, run_id: str, data: Mapping[str, Any]) -> None:
        response = data.get("response")
        if not isinstance(response, AgentResponse):
            return
        self._count_run(response)
        state = self._runs.pop(run_id, None)
        if state is None:  # refused before it started (an unknown principal): a span of its own
            root = self.tracer.start_span(f"invoke_agent {AGENT_NAME}",
                                          attributes=self._run_attributes(run_id, None))
        else:
            root = state.root
            for phase in reversed(list(state.phases.values())):  # left open by a bug: never leak them
                phase.span.end()
        tokens_in = sum(c.usage.input_tokens for c in response.costs if c.usage is not None)
        tokens_out = sum(c.usage.output_tokens for c in response.costs if c.usage is not None)
        root.set_attributes({
            "agentkeel.status": response.status.value, "agentkeel.cost_usd": response.total_cost_usd,
            "agentkeel.steps": len(response.steps), "agentkeel.revisions": len(response.revisions),
            "gen_ai.usage.input_tokens": tokens_in, "gen_ai.usage.output_tokens": tokens_out,
        })
        if response.status not in _OK_RUNS:
            root.set_status(Status(StatusCode.ERROR, f"{response.status.value}: {response.message}"[:500]))
        root.end()

    def _count_run(self, response: AgentResponse) -> None:
        """The numbers the service's Prometheus metrics count at the same event."""
        status = response.status.value
        self.runs.add(1, {"status": status})
        self.run_duration.record(response.duration_s, {"status": status})
        if response.status is RunStatus.BUDGET_EXHAUSTED:
            self.budget_refusals.add(1)
        for cost in response.costs:
            model, tier = cost.model or "", cost.tier or ""
            if cost.kind == "llm" and cost.usage is not None:
                self.tokens.add(cost.usage.input_tokens, {"model": model, "tier": tier, "direction": "input"})
                self.tokens.add(cost.usage.output_tokens, {"model": model, "tier": tier, "direction": "output"})
            if cost.cost_usd > 0:
                self.cost.add(cost.cost_usd, {"kind": cost.kind, "model": model, "tier": tier})

    def _step_finished(self, run_id: str, data: Mapping[str, Any]) -> None:
        step = data.get("step")
        if isinstance(step, StepResult) and step.status is not StepStatus.PENDING:
            self.step_duration.record(step.duration_s, {"tool": step.tool_name, "status": step.status.value})

    def _attempt_failed(self, run_id: str, data: Mapping[str, Any]) -> None:
        action = str(data.get("action", ""))
        name = {"retry": "retry", "fallback": "fallback", "replan": "replan"}.get(action, "attempt_failed")
        attributes: dict[str, Any] = {"agentkeel.step_id": int(data.get("step_id", 0)), "agentkeel.action": action,
                      "agentkeel.call_kind": str(data.get("call_kind", "forward")),
                      "error.message": str(data.get("error", ""))[:1000]}
        self._current_or_root(run_id).add_event(name, attributes)

    def _approval_requested(self, run_id: str, data: Mapping[str, Any]) -> None:
        self._current_or_root(run_id).add_event("approval_requested", {
            "agentkeel.step_id": int(data.get("step_id", 0)), "gen_ai.tool.name": str(data.get("tool", ""))})

    def _breaker_state(self, run_id: str, data: Mapping[str, Any]) -> None:
        tool, state = str(data.get("tool", "")), str(data.get("state", ""))
        self.breaker_changes.add(1, {"tool": tool, "state": state})
        self._current_or_root(run_id).add_event("breaker_state", {
            "gen_ai.tool.name": tool, "agentkeel.breaker.previous": str(data.get("previous", "")),
            "agentkeel.breaker.state": state})

    # --- phases -------------------------------------------------------------------------

    def _phase_started(self, run_id: str, data: Mapping[str, Any]) -> None:
        state = self._runs.get(run_id)
        if state is None:
            return
        phase = str(data.get("phase", ""))
        attributes = data.get("attributes") or {}
        name, kind, mapped = self._describe(phase, attributes)
        span = self.tracer.start_span(name, context=self._parent(state), kind=kind, attributes=mapped)
        state.ours.add(span.get_span_context().span_id)
        token = otel_context.attach(trace.set_span_in_context(span))
        state.phases[int(data.get("span", 0))] = _Open(span, token)
        if phase == "llm":
            self._llm_started[(run_id, int(data.get("span", 0)))] = time.perf_counter()

    def _phase_finished(self, run_id: str, data: Mapping[str, Any]) -> None:
        state = self._runs.get(run_id)
        number = int(data.get("span", 0))
        opened = state.phases.pop(number, None) if state is not None else None
        if state is None or opened is None:
            return
        span = opened.span
        if opened.token is not None:
            try:
                otel_context.detach(opened.token)  # type: ignore[arg-type]
            except Exception:  # noqa: BLE001 - detached elsewhere: the span still ends
                pass
        phase = str(data.get("phase", ""))
        attributes = data.get("attributes") or {}
        span.set_attributes(self._finished_attributes(phase, attributes))
        error = data.get("error")
        if error is not None:
            span.set_attribute("error.type", str(data.get("error_type") or "Exception"))
            span.set_status(Status(StatusCode.ERROR, str(error)[:500]))
        elif phase == "step" and attributes.get("status") not in (None, "succeeded", "skipped", "pending",
                                                                   "waiting"):
            span.set_status(Status(StatusCode.ERROR, f"{attributes.get('status')}: "
                                                     f"{attributes.get('step_error', '')}"[:500]))
        if phase == "llm":
            self._record_llm(run_id, number, attributes, error is not None, data.get("error_type"))
        state.ours.discard(span.get_span_context().span_id)
        span.end()

    def _record_llm(self, run_id: str, number: int, attributes: Mapping[str, Any], failed: bool,
                    error_type: Any) -> None:
        started = self._llm_started.pop((run_id, number), None)
        base = {"gen_ai.operation.name": "chat", "gen_ai.provider.name": "openai",
                "gen_ai.request.model": str(attributes.get("model", ""))}
        if started is not None:
            duration = {**base, **({"error.type": str(error_type)} if failed else {})}
            self.operation_duration.record(time.perf_counter() - started, duration)
        for direction, key in (("input", "input_tokens"), ("output", "output_tokens")):
            value = attributes.get(key)
            if isinstance(value, int):
                self.token_usage.record(value, {**base, "gen_ai.token.type": direction})

    def _parent(self, state: _RunSpans) -> otel_context.Context:
        """The current span when it is one of this run's, else the run's span."""
        current = trace.get_current_span()
        if current.get_span_context().span_id in state.ours:
            return otel_context.get_current()
        return trace.set_span_in_context(state.root)

    def _current_or_root(self, run_id: str) -> Span:
        state = self._runs.get(run_id)
        current = trace.get_current_span()
        if state is None:
            return current
        return current if current.get_span_context().span_id in state.ours else state.root

    def _describe(self, phase: str, attributes: Mapping[str, Any]) -> tuple[str, SpanKind, dict[str, Any]]:
        if phase == "llm":
            model = str(attributes.get("model", ""))
            mapped: dict[str, Any] = {
                "gen_ai.operation.name": "chat", "gen_ai.provider.name": "openai",
                "gen_ai.request.model": model,
                "gen_ai.request.max_tokens": int(attributes.get("max_tokens", 0)),
                "gen_ai.request.temperature": float(attributes.get("temperature", 0.0)),
                "agentkeel.tier": str(attributes.get("tier", "")),
                "agentkeel.purpose": str(attributes.get("purpose", "")),
                "agentkeel.streaming": bool(attributes.get("streaming", False)),
                "agentkeel.structured_output": bool(attributes.get("structured", False)),
            }
            base_url = str(attributes.get("base_url", ""))
            if base_url:
                parts = urlsplit(base_url)
                if parts.hostname:
                    mapped["server.address"] = parts.hostname
                if parts.port:
                    mapped["server.port"] = parts.port
            if self.capture_content and "messages" in attributes:
                mapped["gen_ai.input.messages"] = _json(attributes["messages"])
            return f"chat {model}", SpanKind.CLIENT, mapped
        return f"agentkeel.{phase}", SpanKind.INTERNAL, self._plain(attributes)

    def _finished_attributes(self, phase: str, attributes: Mapping[str, Any]) -> dict[str, Any]:
        if phase != "llm":
            return self._plain(attributes)
        mapped: dict[str, Any] = {"agentkeel.cost_usd": float(attributes.get("cost_usd", 0.0)),
                                  "agentkeel.cost_estimated": bool(attributes.get("estimated", False))}
        for key in ("input_tokens", "output_tokens"):
            if isinstance(attributes.get(key), int):
                mapped[f"gen_ai.usage.{key}"] = attributes[key]
        if "finish_reason" in attributes:
            mapped["gen_ai.response.finish_reasons"] = [str(attributes["finish_reason"])]
            mapped["gen_ai.response.model"] = str(attributes.get("model", ""))
        if self.capture_content and attributes.get("output") is not None:
            mapped["gen_ai.output.messages"] = _json([{"role": "assistant", "parts": [
                {"type": "text", "content": attributes["output"]}], "finish_reason": attributes.get(
                    "finish_reason", "stop")}])
        return mapped

    def _plain(self, attributes: Mapping[str, Any]) -> dict[str, Any]:
        """``agentkeel.KEY`` for each attribute OpenTelemetry can hold, contents only when captured."""
        out: dict[str, Any] = {}
        for key, value in attributes.items():
            if key in CONTENT_KEYS and not self.capture_content:
                continue
            if key == "tool":
                out["gen_ai.tool.name"] = str(value)
                continue
            if key == "error" and not self.capture_content:
                continue
            if isinstance(value, bool | int | float | str):
                out[f"agentkeel.{key}"] = value
            elif value is not None:
                out[f"agentkeel.{key}"] = _json(value)
        return out

    # --- tool calls (the wrapper hook) -------------------------------------------------

    @hookimpl(wrapper=True)
    def agentkeel_call_tool(self, call: Any, sandbox: Any, run: Any) -> Generator[None, Any, Awaitable[Any]]:
        inner: Awaitable[Any] = yield
        return self._traced_call(inner, call, sandbox)

    async def _traced_call(self, inner: Awaitable[Any], call: Any, sandbox: Any) -> Any:
        from agentkeel.tools.router import idempotency_key

        state = self._runs.get(call.run_id)
        spec = call.spec
        key = idempotency_key(call.run_id, call.step_id)
        attributes: dict[str, Any] = {
            "gen_ai.operation.name": "execute_tool", "gen_ai.tool.name": spec.name, "gen_ai.tool.type": "function",
            "gen_ai.tool.call.id": key, "agentkeel.run_id": call.run_id, "agentkeel.step_id": call.step_id,
            "agentkeel.attempt": call.attempt, "agentkeel.call_kind": call.kind,
            "agentkeel.sandbox": spec.isolation, "agentkeel.idempotency_key": key,
            "agentkeel.idempotent": spec.idempotent, "agentkeel.timeout_s": call.timeout,
        }
        if spec.description:
            attributes["gen_ai.tool.description"] = spec.description[:500]
        if spec.cost_usd:
            attributes["agentkeel.cost_usd"] = spec.cost_usd
        if self.capture_content:
            attributes["gen_ai.tool.call.arguments"] = _json(
                {k: v for k, v in call.args.items() if k not in ("idempotency_key", "run")})
        parent = self._parent(state) if state is not None else None
        with self.tracer.start_as_current_span(f"execute_tool {spec.name}", context=parent, kind=SpanKind.INTERNAL,
                                               attributes=attributes, record_exception=False,
                                               set_status_on_exception=False) as span:
            if state is not None:
                state.ours.add(span.get_span_context().span_id)
            try:
                result = await inner
            except BaseException as exc:
                span.set_attribute("error.type", type(exc).__name__)
                span.set_status(Status(StatusCode.ERROR, str(exc)[:500] or type(exc).__name__))
                raise
            finally:
                if state is not None:
                    state.ours.discard(span.get_span_context().span_id)
            if self.capture_content:
                span.set_attribute("gen_ai.tool.call.result", _json(result))
            return result

    # --- logs ---------------------------------------------------------------------------

    def log_fields(self) -> dict[str, str]:
        """``trace_id``/``span_id`` of the current span, or of the current run's span."""
        context = trace.get_current_span().get_span_context()
        if not context.is_valid:
            state = self._runs.get(RUN_ID.get() or "")
            if state is None:
                return {}
            context = state.root.get_span_context()
        if not context.is_valid:  # a no-op provider: there is no trace to join
            return {}
        return {"trace_id": format(context.trace_id, "032x"), "span_id": format(context.span_id, "016x")}


def _json(value: Any) -> str:
    try:
        return json.dumps(value, default=str, ensure_ascii=False)[:8192]
    except (TypeError, ValueError):
        return repr(value)[:8192]


_HANDLERS: dict[str, Callable[[Telemetry, str, Mapping[str, Any]], None]] = {
    "run_started": Telemetry._run_started,
    "run_resumed": Telemetry._run_resumed,
    "run_finished": Telemetry._run_finished,
    "step_finished": Telemetry._step_finished,
    "step_attempt_failed": Telemetry._attempt_failed,
    "approval_requested": Telemetry._approval_requested,
    "breaker_state": Telemetry._breaker_state,
    "phase_started": Telemetry._phase_started,
    "phase_finished": Telemetry._phase_finished,
}
