"""The service's Prometheus metrics (``prometheus-client``), fed by the events of the
runs it serves.

Each app has its own registry, so two apps in one process (tests) never share
counters. The counters move when a run's events arrive (``observe``); the
gauges (queue depth, runs in flight, breaker states) are read at scrape time.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from prometheus_client import CollectorRegistry, Counter, Histogram, disable_created_metrics, generate_latest
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

from agentkeel.types import AgentResponse, Event, RunStatus, StepResult, StepStatus

if TYPE_CHECKING:
    from collections.abc import Iterator

    from agentkeel.server.manager import LiveRun, RunManager
    from agentkeel.tools.breaker import BreakerBoard

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"

STEP_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
BREAKER_STATES = ("closed", "open", "half_open")


class _Live(Collector):
    """Gauges read when Prometheus scrapes: queue depth, runs in flight, breaker states."""

    def __init__(self, manager: RunManager, breakers: BreakerBoard) -> None:
        self.manager = manager
        self.breakers = breakers

    def collect(self) -> Iterator[GaugeMetricFamily]:
        queue = GaugeMetricFamily("agentkeel_queue_depth", "Runs admitted and waiting for a slot")
        queue.add_metric([], self.manager.queued)
        yield queue
        inflight = GaugeMetricFamily("agentkeel_runs_inflight", "Runs executing now")
        inflight.add_metric([], self.manager.inflight)
        yield inflight
        states = GaugeMetricFamily("agentkeel_breaker_state", "1 for each tool's current breaker state",
                                   labels=["tool", "state"])
        for tool, state in sorted(self.breakers.snapshot().items()):
            for name in BREAKER_STATES:
                states.add_metric([tool, name], 1.0 if state.value == name else 0.0)
        yield states


class Metrics:
    """The counters and histograms of one app, and its registry."""

    def __init__(self, manager: RunManager, breakers: BreakerBoard) -> None:
        disable_created_metrics()  # type: ignore[no-untyped-call]  # *_created series: noise in a scrape
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self.runs = Counter("agentkeel_runs", "Runs finished, by status", ["status"], registry=r)
        self.steps = Histogram("agentkeel_step_duration_seconds", "Step latency, by tool and status",
                               ["tool", "status"], buckets=STEP_BUCKETS, registry=r)
        self.tokens = Counter("agentkeel_llm_tokens", "LLM tokens, by model, tier and direction",
                              ["model", "tier", "direction"], registry=r)
        self.cost = Counter("agentkeel_cost_usd", "Spend in USD, by kind (llm or tool), model and tier",
                            ["kind", "model", "tier"], registry=r)
        self.budget_refusals = Counter("agentkeel_budget_refusals",
                                       "Runs stopped because a budget could not afford a call", registry=r)
        self.requests = Counter("agentkeel_http_requests", "HTTP requests answered, by route and status code",
                                ["route", "code"], registry=r)
        self.auth_failures = Counter("agentkeel_auth_failures", "Requests refused for their API key, by reason",
                                     ["reason"], registry=r)
        self.rejected = Counter("agentkeel_overload_refusals", "Runs refused with 429 because the queue was full",
                                registry=r)
        r.register(_Live(manager, breakers))

    def observe(self, live: LiveRun, event: Event) -> None:
        """Count one event of a run (the manager's listener)."""
        if event.kind == "step_finished":
            step = event.data.get("step")
            if isinstance(step, StepResult) and step.status is not StepStatus.PENDING:
                self.steps.labels(step.tool_name, step.status.value).observe(step.duration_s)
        elif event.kind == "run_finished":
            response = event.data.get("response")
            if isinstance(response, AgentResponse):
                self.finished(response)

    def finished(self, response: AgentResponse) -> None:
        self.runs.labels(response.status.value).inc()
        if response.status is RunStatus.BUDGET_EXHAUSTED:
            self.budget_refusals.inc()
        for cost in response.costs:
            model = cost.model or ""
            tier = cost.tier or ""
            if cost.kind == "llm" and cost.usage is not None:
                self.tokens.labels(model, tier, "input").inc(cost.usage.input_tokens)
                self.tokens.labels(model, tier, "output").inc(cost.usage.output_tokens)
            if cost.cost_usd > 0:
                self.cost.labels(cost.kind, model, tier).inc(cost.cost_usd)

    def exposition(self) -> bytes:
        return generate_latest(self.registry)


def metric_value(text: str, name: str, **labels: Any) -> float | None:
    """The value of one sample in an exposition text (for tests and the dashboard)."""
    from prometheus_client.parser import text_string_to_metric_families

    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == name and all(sample.labels.get(k) == str(v) for k, v in labels.items()):
                return float(sample.value)
    return None
