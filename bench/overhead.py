"""Framework overhead per step: a scripted planner and no-op tools, K steps per run.

Every step takes the full production path (argument validation, permission
decision written to the hash-chained audit log, breaker, sandbox backend,
evaluator, journal intent and outcome). The tools do nothing, so what is
measured is the framework.

    python bench/overhead.py [--runs N] [--steps 2,20,100,1000] [--max-parallel N]
                             [--instructions] [--otel]

Prints, per K and journal backend (in-memory, durable SQLite), and for a bare
asyncio loop that only validates each step's arguments (the same compiled
validator the framework uses) and awaits the tool: the median wall time of one
run divided by K (per-request work amortised), the marginal cost of one more step
((T(K) - T(2)) / (K - 2)), and that marginal cost over the bare loop's. Then the
responder's own cost per request (it runs once, after the steps, outside the
per-step path): the deterministic responder's answer for a run of K steps, which
the figures above include (the LLM responder, when configured, costs one chat
completion instead).

The plan's steps are independent no-op lookups, so they run concurrently up to
``[executor] max_parallel``; ``--max-parallel 1`` runs them one at a time.

Two floors: ``bare`` validates with the compiled check the framework's fast path
uses, ``bare-js`` with jsonschema's reference validator (as a hand-written loop
without a schema compiler would).

``--instructions`` also counts CPU instructions per step with valgrind's
callgrind (stable under machine noise, unlike time): each configuration runs in
its own process under ``valgrind --tool=callgrind --instr-atstart=no``, which
counts only the measured runs (switched on and off with ``callgrind_control``):
``(I(K=102) - I(K=2)) / (100 * runs)``. It takes a few minutes.

``--otel`` adds the OpenTelemetry plugin (``plugins/agentkeel-otel``) with SDK
providers whose exporter discards what it gets: the cost of recording a span per
phase and the metrics, without the cost of a network.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from typing import Any

import fastjsonschema
import jsonschema
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


async def measure(k: int, runs: int, warmup: int, journal: str, otel: bool = False, max_parallel: int | None = None,
                  around: Callable[[bool], None] | None = None) -> list[float]:
    """Wall times of ``runs`` runs of K steps (after ``warmup``); ``around(True/False)`` brackets them."""
    extra = [telemetry()] if otel else []
    config: dict[str, Any] = {"journal": {"backend": journal}, "planner": {"max_steps": max(k, 1)}}
    if max_parallel is not None:
        config["executor"] = {"max_parallel": max_parallel}
    system = make_system(NoopTools(), ScriptedPlanner(wire(k)), *extra, principals={"bench": ["bench"]},
                         config=config)
    times = []
    async with system:
        for n in range(warmup + runs):
            if n == warmup and around is not None:
                around(True)
            request = AgentRequest(message="bench", user_id="bench")
            start = time.perf_counter()
            response = await system.run(request)
            elapsed = time.perf_counter() - start
            if not response.ok or len(response.steps) != k:
                raise SystemExit(f"benchmark run failed: {response.message}")
            if n >= warmup:
                times.append(elapsed)
        if around is not None:
            around(False)
    return times


async def measure_bare(k: int, runs: int, warmup: int, around: Callable[[bool], None] | None = None,
                       validator: str = "compiled") -> list[float]:
    """The floor: a loop that validates each step's arguments and awaits the tool, nothing else.
    ``compiled``: the compiled check the framework's fast path uses; ``jsonschema``: the
    reference validator (``Draft202012Validator.iter_errors``), as a loop without a compiler would."""
    schema = noop_spec().args_schema
    if validator == "compiled":
        validate: Callable[[Any], Any] = fastjsonschema.compile(schema)
    else:
        reference = jsonschema.Draft202012Validator(schema)

        def validate(args: Any) -> Any:
            errors = list(reference.iter_errors(args))
            if errors:
                raise ValueError(errors[0].message)
    fn = noop_spec().fn
    steps = wire(k)["steps"]
    times = []
    for n in range(warmup + runs):
        if n == warmup and around is not None:
            around(True)
        start = time.perf_counter()
        results = []
        for step in steps:
            args = step["tool_args"]
            validate(args)
            results.append(await fn(**args))
        elapsed = time.perf_counter() - start
        if len(results) != k:
            raise SystemExit("bare loop lost a step")
        if n >= warmup:
            times.append(elapsed)
    if around is not None:
        around(False)
    return times


BARE = {"bare": "compiled", "bare-js": "jsonschema"}
"""The floors: a bare loop with the compiled check, and with the reference validator."""


def noop_spec() -> Any:
    from agentkeel.tools.decorator import spec_of

    spec = spec_of(noop)
    assert spec is not None
    return spec


def callgrind_toggle(on: bool) -> None:
    """Switch callgrind's counting on or off for this process (run under ``--instr-atstart=no``)."""
    subprocess.run(["callgrind_control", "-i", "on" if on else "off", str(os.getpid())], check=True,
                   capture_output=True)


def count_child(kind: str, k: int, runs: int, max_parallel: int | None) -> None:
    """In a process under callgrind: the measured runs, counted."""
    if kind in BARE:
        asyncio.run(measure_bare(k, runs, 3, around=callgrind_toggle, validator=BARE[kind]))
    else:
        asyncio.run(measure(k, runs, 3, kind, max_parallel=max_parallel, around=callgrind_toggle))


def instructions(kind: str, k: int, runs: int, max_parallel: int | None) -> int:
    """Instructions callgrind counted for ``runs`` runs of K steps of ``kind`` (bare, memory, sqlite)."""
    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "callgrind.out")
        cmd = ["valgrind", "--tool=callgrind", "--instr-atstart=no", f"--callgrind-out-file={out}",
               sys.executable, os.path.abspath(__file__), "--count-child", f"{kind},{k},{runs},{max_parallel or 0}"]
        env = {**os.environ, "AGENTKEEL_HOME": os.path.join(tmp, "home")}
        proc = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=tmp)
        if proc.returncode != 0:
            raise SystemExit(f"callgrind run failed ({' '.join(cmd)}):\n{proc.stderr[-2000:]}")
        with open(out) as fh:
            found = re.search(r"^totals:\s+(\d+)", fh.read(), re.MULTILINE)
        if found is None:
            raise SystemExit(f"no totals in {out}")
        return int(found.group(1))


def report_instructions(runs: int, max_parallel: int | None) -> None:
    if shutil.which("valgrind") is None or shutil.which("callgrind_control") is None:
        print("instructions per step: valgrind (callgrind) is not installed; skipped")
        return
    print(f"instructions per step (callgrind; (I(K=102) - I(K=2)) / (100 x {runs} runs)):")
    floors: dict[str, float] = {}
    for kind in (*BARE, "memory", "sqlite"):
        per_step = (instructions(kind, 102, runs, max_parallel) - instructions(kind, 2, runs, max_parallel)) / (
            100 * runs)
        floors[kind] = per_step
        ratio = ("  " + ", ".join(f"{per_step / floors[b]:.2f}x {b}" for b in BARE if floors.get(b))
                 if kind not in BARE else "")
        print(f"{kind:>8} {per_step / 1000:12.1f}k {ratio}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", type=int, default=200)
    parser.add_argument("--warmup", type=int, default=20)
    parser.add_argument("--steps", default="2,20,100,1000")
    parser.add_argument("--max-parallel", type=int, default=None,
                        help="[executor] max_parallel (default: the configuration's default)")
    parser.add_argument("--instructions", action="store_true", help="also count instructions per step (callgrind)")
    parser.add_argument("--otel", action="store_true", help="with the OpenTelemetry plugin (exporting nowhere)")
    parser.add_argument("--count-child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.count_child:
        kind, k, runs, mp = args.count_child.split(",")
        count_child(kind, int(k), int(runs), int(mp) or None)
        return
    ks = [int(k) for k in args.steps.split(",")]
    print(f"python {sys.version.split()[0]}, {args.runs} runs per K (fewer above K=20), {args.warmup} warm-up runs")
    print("memory: in-memory journal; sqlite: durable SQLite journal (WAL, synchronous=NORMAL); "
          "bare / bare-js: validate (compiled / jsonschema) + await, nothing else")
    if args.max_parallel is not None:
        print(f"[executor] max_parallel = {args.max_parallel}")
    if args.otel:
        print("with the OpenTelemetry plugin: a span per phase and per tool call, metrics (exported nowhere)")
    print(f"{'journal':>8} {'K steps':>8} {'median run (ms)':>16} {'per step (us)':>14} {'marginal step (us)':>19} "
          f"{'/ bare':>8} {'/ bare-js':>10}")
    bare_marginal: dict[tuple[str, int], float] = {}
    for journal in (*BARE, "memory", "sqlite"):
        with tempfile.TemporaryDirectory() as home:
            os.environ["AGENTKEEL_HOME"] = home
            medians: dict[int, float] = {}
            for k in ks:
                runs = max(10, args.runs * 20 // k) if k > 20 else args.runs
                if journal in BARE:
                    times = asyncio.run(measure_bare(k, runs, args.warmup, validator=BARE[journal]))
                else:
                    times = asyncio.run(measure(k, runs, args.warmup, journal, args.otel, args.max_parallel))
                medians[k] = statistics.median(times)
                base_k = ks[0]
                if k == base_k:
                    print(f"{journal:>8} {k:>8} {medians[k] * 1e3:16.3f} {medians[k] / k * 1e6:14.1f} {'-':>19}")
                    continue
                marginal = (medians[k] - medians[base_k]) / (k - base_k)
                bare_marginal[journal, k] = marginal
                ratios = "" if journal in BARE else " ".join(
                    f"{marginal / bare_marginal[b, k]:{w}.2f}x" for b, w in (("bare", 7), ("bare-js", 9)))
                print(f"{journal:>8} {k:>8} {medians[k] * 1e3:16.3f} {medians[k] / k * 1e6:14.1f} "
                      f"{marginal * 1e6:19.1f} {ratios}")
    print("responder (deterministic, per request, included above):")
    for k in ks:
        print(f"{'':>8} {k:>8} {responder_cost(k) * 1e6:16.1f} us")
    if args.instructions:
        report_instructions(20, args.max_parallel)


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
