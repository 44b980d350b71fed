"""Per-step framework overhead, side by side: agentkeel, a bare loop and other agent frameworks.

Every framework runs the same scenario (scenario.py): a scripted zero-latency
model asks for K sequential calls of three trivial async tools; per step the
framework validates the arguments and calls the tool. Peer frameworks get one
tool call per model turn, through each framework's own test model; agentkeel
gets the K-step plan from its scripted planner, as in bench/overhead.py.

    python bench/peers/run.py [--steps 2,20,100] [--runs N] [--warmup N] [--only name,...]

Prints, per framework and K: the median wall time of a run, that divided by K,
the marginal cost of one more step ((T(K) - T(Kmin)) / (K - Kmin)), and that
marginal cost over the bare loop's. Every run's tool results are checked against
the expected ones, so a broken adapter fails instead of reporting a time. The
bare loop always runs: it is the floor the others are compared with.
"""

from __future__ import annotations

import argparse
import asyncio
import importlib
import statistics
import sys
import time
from dataclasses import dataclass, field
from importlib.metadata import PackageNotFoundError, version
from typing import Any

import scenario


@dataclass(frozen=True)
class Entry:
    """A row of the table: the adapter module that runs it, with its options."""

    key: str
    label: str
    module: str
    distributions: tuple[str, ...]
    options: dict[str, Any] = field(default_factory=dict)


ENTRIES: tuple[Entry, ...] = (
    Entry("bare", "bare loop", "adapt_bare", ("jsonschema",)),
    Entry("agentkeel-memory", "agentkeel (memory journal)", "adapt_agentkeel", ("agentkeel",), {"journal": "memory"}),
    Entry("agentkeel-sqlite", "agentkeel (sqlite journal)", "adapt_agentkeel", ("agentkeel",), {"journal": "sqlite"}),
    Entry("langchain", "LangChain (tool-calling loop)", "adapt_langchain", ("langchain-core",)),
    Entry("langgraph-react", "LangGraph (create_react_agent)", "adapt_langgraph", ("langgraph", "langgraph-prebuilt"),
          {"builder": "create_react_agent"}),
    Entry("langgraph-create-agent", "LangChain create_agent (LangGraph)", "adapt_langgraph", ("langchain", "langgraph"),
          {"builder": "create_agent"}),
    Entry("openai-agents", "OpenAI Agents SDK (Runner.run)", "adapt_openai_agents", ("openai-agents", "openai")),
    Entry("pydantic-ai", "Pydantic AI (Agent.run)", "adapt_pydantic_ai", ("pydantic-ai-slim", "pydantic")),
)

BASELINE = "bare"

WIDTH = max(len(e.label) for e in ENTRIES)

HEADER = (
    f"{'framework':<{WIDTH}} {'K':>4} {'median run (ms)':>16} {'per step (us)':>14} "
    f"{'marginal step (us)':>19} {'marginal / bare':>16}"
)


def selected(only: str | None) -> list[Entry]:
    """The baseline and the entries named by ``--only`` (a name also selects ``name-*``), in table order."""
    if only is None:
        return list(ENTRIES)
    names = {name.strip() for name in only.split(",") if name.strip()}
    unknown = {n for n in names if not any(named(e, n) for e in ENTRIES)}
    if unknown:
        raise SystemExit(f"unknown --only name(s): {', '.join(sorted(unknown))}; known: "
                         + ", ".join(e.key for e in ENTRIES))
    return [e for e in ENTRIES if e.key == BASELINE or any(named(e, n) for n in names)]


def named(entry: Entry, name: str) -> bool:
    """Whether ``--only name`` selects the entry: its key, or the part of it before a dash."""
    return entry.key == name or entry.key.startswith(name + "-")


def versions(entries: list[Entry]) -> str:
    """The installed version of every distribution the entries use."""
    names = dict.fromkeys(d for e in entries for d in e.distributions)
    return ", ".join(f"{name} {installed(name)}" for name in names)


def installed(distribution: str) -> str:
    """The distribution's version, or "not installed"."""
    try:
        return version(distribution)
    except PackageNotFoundError:
        return "not installed"


def scaled(k: int, runs: int, least: int) -> int:
    """Runs at K: as bench/overhead.py, fewer above K=20 (at least ``least``) so each K costs about as much."""
    return max(least, runs * 20 // k) if k > 20 else runs


async def measure(entry: Entry, k: int, runs: int, warmup: int) -> list[float]:
    """Wall times of ``runs`` runs of K steps after ``warmup`` ones, each run's results checked."""
    adapter = importlib.import_module(entry.module)
    want = scenario.expected(k)
    times = []
    async with adapter.open_session(k, **entry.options) as session:
        for n in range(warmup + runs):
            start = time.perf_counter()
            output = await session.run()
            elapsed = time.perf_counter() - start
            got = session.results(output)
            if got != want:
                raise scenario.BrokenRun(f"{len(got)} tool results, expected {k}; first difference: "
                                         + first_difference(got, want))
            if n >= warmup:
                times.append(elapsed)
    return times


def first_difference(got: list[Any], want: list[Any]) -> str:
    """Where two result lists first differ, for the failure message."""
    for n, (g, w) in enumerate(zip(got, want, strict=False)):
        if g != w:
            return f"step {n}: {g!r} != {w!r}"
    return "one list is a prefix of the other"


def row(label: str, k: int, median: float, marginal: float | None, floor: float | None) -> str:
    """One line of the table (times in seconds)."""
    step = f"{marginal * 1e6:19.1f}" if marginal is not None else f"{'-':>19}"
    ratio = f"{marginal / floor:15.1f}x" if marginal is not None and floor else f"{'-':>16}"
    return f"{label:<{WIDTH}} {k:>4} {median * 1e3:16.3f} {median / k * 1e6:14.1f} {step} {ratio}"


def bench(entry: Entry, ks: list[int], runs: int, warmup: int, floor: dict[int, float]) -> dict[int, float]:
    """Print the entry's rows; return its marginal step per K (empty when it cannot run)."""
    medians: dict[int, float] = {}
    marginals: dict[int, float] = {}
    for k in ks:
        try:
            times = asyncio.run(measure(entry, k, scaled(k, runs, 10), scaled(k, warmup, min(warmup, 2))))
        except ImportError as exc:
            print(f"{entry.label:<{WIDTH}} not available: {type(exc).__name__}: {exc}")
            return {}
        except Exception as exc:  # noqa: BLE001 - a failing framework is reported, and the others still run
            print(f"{entry.label:<{WIDTH}} failed at K={k}: {type(exc).__name__}: {exc}")
            return {}
        medians[k] = statistics.median(times)
        marginal = (medians[k] - medians[ks[0]]) / (k - ks[0]) if k != ks[0] else None
        if marginal is not None:
            marginals[k] = marginal
        print(row(entry.label, k, medians[k], marginal, floor.get(k)), flush=True)
    return marginals


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", default="2,20,100", help="comma-separated K values (default 2,20,100)")
    parser.add_argument("--runs", type=int, default=100, help="measured runs per K up to 20, fewer above")
    parser.add_argument("--warmup", type=int, default=10, help="unmeasured runs before each K up to 20, fewer above")
    parser.add_argument("--only", help="comma-separated names: " + ", ".join(e.key for e in ENTRIES))
    args = parser.parse_args()
    ks = sorted({int(k) for k in args.steps.split(",")})
    if len(ks) < 2 or ks[0] < 1:
        raise SystemExit("--steps needs at least two distinct positive K values")
    entries = selected(args.only)
    print(f"python {sys.version.split()[0]}; {args.runs} runs per K up to 20 (fewer above), "
          f"after {args.warmup} warm-up runs (fewer above)")
    print(versions(entries))
    print(HEADER)
    floor: dict[int, float] = {}
    for entry in entries:
        marginals = bench(entry, ks, args.runs, args.warmup, floor)
        if entry.key == BASELINE:
            floor = marginals


if __name__ == "__main__":
    main()
