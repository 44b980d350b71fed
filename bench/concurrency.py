"""Many concurrent requests in one process: N runs started at once on one system.

Each request is a run of K steps (``--steps``, default 5) of an idempotent no-op
in-process tool, planned by a planner plugin whose ``agentkeel_plan`` hook is
async (the hook may return an awaitable, which the pipeline awaits): it awaits
``asyncio.sleep`` for ``--planner-ms`` (default 10 ms, a stand-in for a
planner's latency) and returns one ``Plan``, parsed once with ``parse_plan``
when the planner is built and shared by every request (a ``Plan`` is
immutable). All N requests (``--requests``, default 1000 and 10000) are started
together with ``asyncio.gather`` over ``AgentSystem.run`` on one
``AgentSystem``; every response must be ok with K succeeded steps, or the
benchmark stops with an error. Every step takes the full production path
(permission decision in the hash-chained audit log, breaker, sandbox,
evaluator, journal), and memory loads the context and saves the turn of every
request, as by default. Every request is from the user ``bench`` in the
default session, each with its own message.

    python bench/concurrency.py [--requests 1000,10000] [--journal memory,sqlite]
                                [--steps 5] [--planner-ms 10] [--max-parallel N]

The 5 steps are independent, so by default they run at the same time; each step in
flight holds its own coroutine stack, which shows in the peak memory per request
(``--max-parallel 1`` runs them one at a time).

Prints, per N and journal backend (``memory``: the in-memory journal;
``sqlite``: the durable SQLite journal, WAL, synchronous=NORMAL):

- wall: the batch's wall time (``perf_counter``), and wall minus the planner
  floor (the planner's sleep, which every request waits for once, all at the
  same time);
- CPU: the process CPU time of the batch (``time.process_time``), in total and
  per request;
- peak/req: the peak memory traced by ``tracemalloc`` during the batch, less
  what was traced before it, divided by N: what a request costs while N are in
  flight (the N responses the batch holds at its end included);
- kept/req: the traced memory still held after the batch and ``gc.collect()``,
  less what was held before it, divided by N: what a finished request leaves
  behind. With the memory journal this includes the journal keeping every run
  and the in-process memory store keeping every turn (``[memory] backend``
  follows the journal's); with SQLite both are on disk;
- RSS+/req: the growth of the process's peak resident set (``ru_maxrss``) over
  the timed batch, divided by N: a cross-check of peak/req that also counts
  what ``tracemalloc`` does not see (SQLite's own allocations, the allocator's
  fragmentation).

``tracemalloc`` slows allocation a lot, so memory is traced in a batch of its
own, never in the timed one. Every measured batch runs in a fresh interpreter
(so none inherits another's heap or peak RSS), on a fresh system in a fresh
``$AGENTKEEL_HOME`` (a temporary directory, for either journal: the audit log
and its anchor are there, and for ``sqlite`` the journal and the memory store),
after a warm-up batch of ``WARMUP`` requests on the same system. Requests of
one batch all load their context before any of them saves its turn, so each
sees the warm-up's turns only.

Settings: the principal ``bench`` holds the tool's permission, and ``[planner]
max_steps`` is raised to K when K exceeds the default (50). Nothing else needs
changing for 10,000 concurrent runs: the tool has no rate limit (``[tools.noop]
rate_limit`` unset) and costs nothing against the default per-request budget,
no ``[budget]`` scope limit is set, the breaker never sees a failure, and
``[server] max_inflight``/``max_queue`` bound only the HTTP server's run
manager, which ``AgentSystem.run`` does not go through.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import multiprocessing
import os
import resource
import sys
import tempfile
import time
import tracemalloc
from collections.abc import Callable, Coroutine
from concurrent.futures import ProcessPoolExecutor
from typing import Any, TypeVar

import attrs
from agentkeel import AgentRequest, hookimpl, tool
from agentkeel.config import DEFAULT_MAX_STEPS
from agentkeel.planner.plan import parse_plan
from agentkeel.runtime.system import AgentSystem
from agentkeel.testing import make_system
from agentkeel.types import AgentResponse, Plan, StepStatus

_T = TypeVar("_T")

WARMUP = 50
"""Requests in the warm-up batch run on every system before its measured batch."""

JOURNALS = ("memory", "sqlite")


@tool(idempotent=True, permissions=["bench"])
async def noop(i: int) -> dict[str, int]:
    """Do nothing, asynchronously."""
    return {"i": i}


class NoopTools:
    """Registers ``noop``."""

    @hookimpl
    def agentkeel_register_tools(self, register: Any) -> None:
        register(noop)


class SleepingPlanner:
    """An async planner: waits ``latency_s``, then returns the same K-step plan of ``noop``."""

    def __init__(self, steps: int, latency_s: float) -> None:
        wire = {
            "reasoning": "benchmark",
            "steps": [{"description": "noop", "tool_name": "noop", "tool_args": {"i": i}} for i in range(steps)],
        }
        self.plan = parse_plan(wire, planner="bench")
        self.latency_s = latency_s

    @hookimpl(tryfirst=True)
    async def agentkeel_plan(self) -> Plan:
        await asyncio.sleep(self.latency_s)
        return self.plan


@attrs.frozen
class Timing:
    """The timed batch: wall and CPU seconds, and the growth of the peak resident set in bytes."""

    wall_s: float
    cpu_s: float
    rss_growth_bytes: int


@attrs.frozen
class Footprint:
    """The traced batch: traced bytes at its peak and kept after it, both over the baseline before it."""

    peak_bytes: int
    kept_bytes: int


def build(journal: str, steps: int, planner_ms: float) -> AgentSystem:
    """A system with the no-op tool and the sleeping planner on ``journal`` (and ``[executor]
    max_parallel`` from ``$BENCH_MAX_PARALLEL``, which ``--max-parallel`` sets for the children)."""
    config: dict[str, Any] = {"journal": {"backend": journal}, "planner": {"max_steps": max(steps, DEFAULT_MAX_STEPS)}}
    if os.environ.get(MAX_PARALLEL_ENV):
        config["executor"] = {"max_parallel": int(os.environ[MAX_PARALLEL_ENV])}
    return make_system(NoopTools(), SleepingPlanner(steps, planner_ms / 1000), principals={"bench": ["bench"]},
                       config=config)


MAX_PARALLEL_ENV = "BENCH_MAX_PARALLEL"


async def batch(system: AgentSystem, n: int, steps: int) -> None:
    """Start ``n`` requests at once and check that every one succeeded with ``steps`` steps."""
    responses = await asyncio.gather(
        *(system.run(AgentRequest(message=f"bench {i}", user_id="bench")) for i in range(n)))
    for response in responses:
        check(response, steps)


def check(response: AgentResponse, steps: int) -> None:
    """Stop the benchmark unless ``response`` is ok with ``steps`` succeeded steps."""
    succeeded = sum(s.status is StepStatus.SUCCEEDED for s in response.steps)
    if not response.ok or succeeded != steps:
        raise SystemExit(f"run {response.run_id} failed ({response.status.value}, {succeeded}/{steps} steps "
                         f"succeeded): {response.message}")


async def timed(journal: str, n: int, steps: int, planner_ms: float) -> Timing:
    """Wall time, CPU time and peak RSS growth of one batch of ``n`` requests, after a warm-up batch."""
    async with build(journal, steps, planner_ms) as system:
        await batch(system, WARMUP, steps)
        rss, wall, cpu = max_rss_bytes(), time.perf_counter(), time.process_time()
        await batch(system, n, steps)
        return Timing(time.perf_counter() - wall, time.process_time() - cpu, max_rss_bytes() - rss)


async def traced(journal: str, n: int, steps: int, planner_ms: float) -> Footprint:
    """Traced memory at the peak of one batch of ``n`` requests and kept after it, after a warm-up batch."""
    async with build(journal, steps, planner_ms) as system:
        await batch(system, WARMUP, steps)
        gc.collect()
        tracemalloc.start()
        try:
            before = tracemalloc.get_traced_memory()[0]
            tracemalloc.reset_peak()
            await batch(system, n, steps)
            peak = tracemalloc.get_traced_memory()[1]
            # The loop's handle that woke this task still holds the gathered responses
            # until the task yields once.
            await asyncio.sleep(0)
            gc.collect()
            kept = tracemalloc.get_traced_memory()[0]
        finally:
            tracemalloc.stop()
        return Footprint(peak - before, kept - before)


def max_rss_bytes() -> int:
    """The process's peak resident set so far (``ru_maxrss`` is in KiB on Linux, bytes on macOS)."""
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return rss if sys.platform == "darwin" else rss * 1024


def row(journal: str, n: int, planner_ms: float, timing: Timing, footprint: Footprint) -> str:
    """One line of the table."""
    over_floor = timing.wall_s - planner_ms / 1000
    return (f"{journal:>8} {n:>8} {timing.wall_s:9.3f} {over_floor:10.3f} {timing.cpu_s:8.3f} "
            f"{timing.cpu_s / n * 1e6:12.1f} {footprint.peak_bytes / n / 1024:12.1f} "
            f"{footprint.kept_bytes / n / 1024:12.1f} {timing.rss_growth_bytes / n / 1024:13.1f}")


Measure = Callable[[str, int, int, float], Coroutine[Any, Any, _T]]
"""``timed`` or ``traced``: (journal, N, steps, planner ms) -> what one batch measured."""


def in_child(measure: Measure[_T], journal: str, n: int, steps: int, planner_ms: float) -> _T:
    """``measure`` in a fresh interpreter, so no batch inherits another's heap or peak RSS."""
    with ProcessPoolExecutor(max_workers=1, mp_context=multiprocessing.get_context("spawn")) as pool:
        return pool.submit(in_fresh_home, measure, journal, n, steps, planner_ms).result()


def in_fresh_home(measure: Measure[_T], journal: str, n: int, steps: int, planner_ms: float) -> _T:
    """Run ``measure`` to completion with ``$AGENTKEEL_HOME`` in a new temporary directory."""
    with tempfile.TemporaryDirectory() as home:
        os.environ["AGENTKEEL_HOME"] = home
        return asyncio.run(measure(journal, n, steps, planner_ms))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--requests", default="1000,10000", help="concurrent requests per batch (comma-separated)")
    parser.add_argument("--journal", default="memory,sqlite", help="journal backends (comma-separated)")
    parser.add_argument("--steps", type=int, default=5, help="no-op steps per run")
    parser.add_argument("--planner-ms", type=float, default=10.0, help="the planner's latency (ms)")
    parser.add_argument("--max-parallel", type=int, default=None,
                        help="[executor] max_parallel (default: the configuration's default)")
    args = parser.parse_args()
    if args.max_parallel is not None:
        os.environ[MAX_PARALLEL_ENV] = str(args.max_parallel)  # the spawned children read it
    ns = [int(n) for n in args.requests.split(",")]
    journals = args.journal.split(",")
    if not set(journals) <= set(JOURNALS):
        parser.error(f"--journal: choose from {', '.join(JOURNALS)}")
    print(f"python {sys.version.split()[0]}, {args.steps} steps per run, planner latency {args.planner_ms:g} ms, "
          f"warm-up batch of {WARMUP} requests before each measured batch"
          + (f", [executor] max_parallel = {args.max_parallel}" if args.max_parallel is not None else ""))
    print(f"{'journal':>8} {'N':>8} {'wall (s)':>9} {'- floor':>10} {'CPU (s)':>8} {'CPU/req (us)':>12} "
          f"{'peak/req KiB':>12} {'kept/req KiB':>12} {'RSS+/req KiB':>13}")
    for journal in journals:
        for n in ns:
            timing = in_child(timed, journal, n, args.steps, args.planner_ms)
            footprint = in_child(traced, journal, n, args.steps, args.planner_ms)
            print(row(journal, n, args.planner_ms, timing, footprint), flush=True)


if __name__ == "__main__":
    main()
