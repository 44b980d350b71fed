"""Framework overhead per step: a scripted planner and no-op tools, K steps per run.

Every step takes the full production path (argument validation, permission
decision written to the hash-chained audit log, breaker, sandbox backend,
evaluator, tool-call audit record). The tools do nothing, so what is measured
is the framework.

    python bench/overhead.py [--runs N] [--steps 2,20,100] [--otel]

Prints, per K and journal backend (in-memory, durable SQLite): the median wall
time of one run divided by K (per-request work amortised), and the marginal
cost of one more step ((T(K) - T(2)) / (K - 2)). Then the responder's own cost
per request (it runs once, after the steps, outside the per-step path): the
deterministic responder's answer for a run of K steps, which the figures above
include (the LLM responder, when configured, costs one chat completion instead).

``--otel`` adds the OpenTelemetry plugin (``plugins/agentkeel-otel``) with SDK
providers whose exporter discards what it gets: the cost of recording a span per
phase and the metrics, without the cost of a network.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import sys
import tempfile
import time
from typing import Any

from agentkeel import AgentRequest, hookimpl, tool
from agentkeel.testing import ScriptedPlanner, make_system


@tool(idempotent=True, permissions=["bench"])
async def noop(i: int) -> dict:
    """Do nothing, asynchronously."""
    return {"i": i}


class NoopTools:
    @hookimpl
    def agentkeel_register_tools(self, register: Any) -> None:
        register(noop)


def wire(k: int) -> dict:
    return {
        "reasoning": "benchmark",
        "steps": [{"description": "noop", "tool_name": "noop", "tool_args": {"i": i}} for i in range(k)],
    }


def telemetry() -> Any:
    """The OpenTelemetry plugin on SDK providers that record everything and export nowhere."""
    from agentkeel_otel import Telemetry
    from opentelemetry.sdk.metrics import MeterProvider
    from opentelemetry.sdk.metrics.export import InMemoryMetricReader
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import BatchSpanProcessor, SpanExporter, SpanExportResult

    class Discard(SpanExporter):
        def export(self, spans: Any) -> SpanExportResult:
            return SpanExportResult.SUCCESS

    traces = TracerProvider()
    traces.add_span_processor(BatchSpanProcessor(Discard()))
    return Telemetry(traces, MeterProvider(metric_readers=[InMemoryMetricReader()]))


async def measure(k: int, runs: int, warmup: int, journal: str, otel: bool = False) -> list[float]:
    extra = [telemetry()] if otel else []
    system = make_system(
        NoopTools(), ScriptedPlanner(wire(k)), *extra, principals={"bench": ["bench"]},
        config={"journal": {"backend": journal}, "planner": {"max_steps": max(k, 1)}},
    )
    times = []
    async with system:
        for n in range(warmup + runs):
            request = AgentRequest(message="bench", user_id="bench")
            start = time.perf_counter()
            response = await system.run(request)
            elapsed = time.perf_counter() - start
            if not response.ok:
                raise SystemExit(f"benchmark run failed: {response.message}")
            if n >= warmup:
                times.append(elapsed)
    return times


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", type=int, default=200)
    parser.add_argument("--warmup", type=int, default=20)
    parser.add_argument("--steps", default="2,20,100")
    parser.add_argument("--otel", action="store_true", help="with the OpenTelemetry plugin (exporting nowhere)")
    args = parser.parse_args()
    ks = [int(k) for k in args.steps.split(",")]
    print(f"python {sys.version.split()[0]}, {args.runs} runs per K after {args.warmup} warm-up runs")
    print("journal=memory: in-memory journal; journal=sqlite: durable SQLite journal (WAL, synchronous=NORMAL)")
    if args.otel:
        print("with the OpenTelemetry plugin: a span per phase and per tool call, metrics (exported nowhere)")
    print(f"{'journal':>8} {'K steps':>8} {'median run (ms)':>16} {'per step (us)':>14} {'marginal step (us)':>19}")
    for journal in ("memory", "sqlite"):
        with tempfile.TemporaryDirectory() as home:
            os.environ["AGENTKEEL_HOME"] = home
            medians: dict[int, float] = {}
            for k in ks:
                runs = max(10, args.runs * 20 // k) if k > 20 else args.runs
                medians[k] = statistics.median(asyncio.run(measure(k, runs, args.warmup, journal, args.otel)))
                base_k = ks[0]
                marginal = (
                    f"{(medians[k] - medians[base_k]) / (k - base_k) * 1e6:19.1f}" if k != base_k else f"{'-':>19}"
                )
                print(f"{journal:>8} {k:>8} {medians[k] * 1e3:16.3f} {medians[k] / k * 1e6:14.1f} {marginal}")
    print("responder (deterministic, per request, included above):")
    for k in ks:
        print(f"{'':>8} {k:>8} {responder_cost(k) * 1e6:16.1f} us")


def responder_cost(k: int, runs: int = 2000) -> float:
    """Median time of the deterministic responder's answer for a succeeded run of ``k`` steps."""
    from agentkeel.responder.default import agentkeel_respond
    from agentkeel.types import RunStatus, StepResult, StepStatus

    request = AgentRequest(message="bench", user_id="bench")
    steps = [StepResult(i, "noop", StepStatus.SUCCEEDED, {"i": i}, {"i": i}) for i in range(1, k + 1)]
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        agentkeel_respond(request=request, status=RunStatus.SUCCEEDED, detail="", plan=None, steps=steps)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


if __name__ == "__main__":
    main()
