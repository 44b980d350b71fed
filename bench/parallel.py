"""Parallel plans: a run's wall time against its critical path.

Every step calls an I/O-bound tool that sleeps 50 ms (an idempotent in-process
lookup), so a plan's critical path is 50 ms times the longest chain of
dependencies. Three plans:

- ``independent``: 10 lookups that reference nothing (critical path 50 ms);
- ``diamond``: a lookup, two that each reference its result, and one that
  references both (critical path 150 ms);
- ``chain``: 5 lookups, each referencing the one before (critical path 250 ms).

    python bench/parallel.py [--runs N] [--journal sqlite|memory] [--sleep-ms 50]

Prints, per plan, with ``[executor] max_parallel = 1`` (one step at a time) and
with the default (independent steps run together): the median wall time of a
run, the critical path, and their ratio. Every run is checked: all steps
succeeded and the results flowed through the references.
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
from agentkeel.config import DEFAULT_MAX_PARALLEL
from agentkeel.testing import ScriptedPlanner, make_system

SLEEP_S = 0.050


@tool(idempotent=True, permissions=["bench"])
async def lookup(key: str, seen: list[str] | None = None) -> dict[str, Any]:
    """Look a key up (an I/O wait); returns the keys it was given, to check references."""
    await asyncio.sleep(SLEEP_S)
    return {"key": key, "path": [*(seen or []), key]}


class Tools:
    @hookimpl
    def agentkeel_register_tools(self, register: Any) -> None:
        register(lookup)


def step(key: str, *refs: int) -> dict[str, Any]:
    """A lookup reading the first of ``refs`` and waiting for the others (``depends_on``)."""
    args: dict[str, Any] = {"key": key}
    if refs:
        args["seen"] = {"$ref": f"/{refs[0]}/path"}
    wire: dict[str, Any] = {"description": f"look up {key}", "tool_name": "lookup", "tool_args": args}
    if len(refs) > 1:
        wire["depends_on"] = list(refs[1:])
    return wire


PLANS: dict[str, tuple[list[dict[str, Any]], int]] = {
    "independent": ([step(f"k{i}") for i in range(1, 11)], 1),
    "diamond": ([step("a"), step("b", 1), step("c", 1), step("d", 2, 3)], 3),
    "chain": ([step("s1"), *(step(f"s{i}", i - 1) for i in range(2, 6))], 5),
}
"""Each plan's steps and its critical path in tool calls."""


async def measure(name: str, runs: int, journal: str, max_parallel: int | None) -> list[float]:
    steps, _ = PLANS[name]
    config: dict[str, Any] = {"journal": {"backend": journal}}
    if max_parallel is not None:
        config["executor"] = {"max_parallel": max_parallel}
    system = make_system(Tools(), ScriptedPlanner({"reasoning": name, "steps": steps}),
                         principals={"bench": ["bench"]}, config=config)
    times = []
    async with system:
        for n in range(runs + 1):
            start = time.perf_counter()
            response = await system.run(AgentRequest(message=name, user_id="bench"))
            elapsed = time.perf_counter() - start
            if not response.ok or len(response.steps) != len(steps):
                raise SystemExit(f"{name}: the run failed: {response.message}")
            last = response.steps[-1].result
            if name == "chain" and last["path"] != ["s1", "s2", "s3", "s4", "s5"]:
                raise SystemExit(f"chain: the references did not flow: {last}")
            if name == "diamond" and last["path"] != ["a", "b", "d"]:
                raise SystemExit(f"diamond: the references did not flow: {last}")
            if n:  # the first run opens the stores
                times.append(elapsed)
    return times


def main() -> None:
    global SLEEP_S
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", type=int, default=10)
    parser.add_argument("--journal", choices=("sqlite", "memory"), default="sqlite")
    parser.add_argument("--sleep-ms", type=float, default=50.0)
    args = parser.parse_args()
    SLEEP_S = args.sleep_ms / 1000
    print(f"python {sys.version.split()[0]}, journal={args.journal}, tools sleep {args.sleep_ms:g} ms, "
          f"median of {args.runs} runs")
    print(f"{'plan':>12} {'steps':>6} {'max_parallel':>13} {'median run (ms)':>16} {'critical path (ms)':>19} "
          f"{'ratio':>7}")
    with tempfile.TemporaryDirectory() as home:
        os.environ["AGENTKEEL_HOME"] = home
        for name, (steps, depth) in PLANS.items():
            critical = depth * SLEEP_S
            for max_parallel in (1, None):
                median = statistics.median(asyncio.run(measure(name, args.runs, args.journal, max_parallel)))
                shown = str(max_parallel or f"{DEFAULT_MAX_PARALLEL} (default)")
                print(f"{name:>12} {len(steps):>6} {shown:>13} {median * 1e3:16.1f} {critical * 1e3:19.1f} "
                      f"{median / critical:6.2f}x")


if __name__ == "__main__":
    main()
