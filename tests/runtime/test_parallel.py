"""Independent steps run at the same time: the plan graph (references, ``depends_on``,
effect ordering), ``[executor] max_parallel``, per-tool ``max_concurrency``, failures and
stops in the middle of a wave, compensation in reverse completion order, the
``alongside`` of step events, and deferred outcomes in the journal.

Every tool here is a real async in-process tool that records when it started and ended
(``time.perf_counter``) and how many calls were running at once."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Generator, Mapping, Sequence
from typing import Any

import attrs
import pytest
from agentkeel import AgentRequest, RunStatus, StepStatus, ToolError, hookimpl, tool
from agentkeel.config import DEFAULT_MAX_PARALLEL, Config
from agentkeel.errors import ConfigError, ToolSpecError
from agentkeel.journal.base import Lease, StepRecord
from agentkeel.journal.memory import MemoryJournal
from agentkeel.planner.plan import parse_plan, plan_from_dict
from agentkeel.runtime.lease import HeldLease
from agentkeel.runtime.system import AgentSystem
from agentkeel.testing import ScriptedPlanner, make_system
from agentkeel.types import Event

SLEEP = 0.05


# --- what the tools observe ----------------------------------------------------------------


@attrs.define
class Span:
    start: float
    end: float = float("inf")


@attrs.define
class Recorder:
    live: int = 0
    peak: int = 0
    spans: dict[str, Span] = attrs.field(factory=dict)
    started: list[str] = attrs.field(factory=list)
    finished: list[str] = attrs.field(factory=list)
    released: list[str] = attrs.field(factory=list)
    """Compensations, in the order they ran."""
    gate: asyncio.Event | None = None
    gates: dict[str, asyncio.Event] = attrs.field(factory=dict)
    in_flight: asyncio.Event | None = None
    wait_for: int = 0

    def enter(self, tag: str) -> None:
        self.live += 1
        self.peak = max(self.peak, self.live)
        self.started.append(tag)
        self.spans[tag] = Span(time.perf_counter())
        if self.in_flight is not None and len(self.started) >= self.wait_for:
            self.in_flight.set()

    def leave(self, tag: str) -> None:
        self.spans[tag].end = time.perf_counter()
        self.finished.append(tag)
        self.live -= 1

    def overlap(self, a: str, b: str) -> bool:
        x, y = self.spans[a], self.spans[b]
        return x.start < y.end and y.start < x.end

    def before(self, a: str, b: str) -> bool:
        """``a`` ended before ``b`` started."""
        return self.spans[a].end <= self.spans[b].start


REC = Recorder()


@pytest.fixture(autouse=True)
def _reset() -> Generator[None, None, None]:
    global REC
    REC = Recorder()
    yield


async def _work(tag: str, delay: float) -> None:
    REC.enter(tag)
    try:
        await asyncio.sleep(delay)
    finally:
        REC.leave(tag)


# --- tools -------------------------------------------------------------------------------------


@tool(permissions=["t"], idempotent=True)
async def lookup(tag: str, delay: float = SLEEP) -> dict[str, Any]:
    """An idempotent read that takes ``delay`` seconds."""
    await _work(tag, delay)
    return {"tag": tag, "n": 2}


@tool(permissions=["t"], idempotent=True)
async def scale(tag: str, x: int, factor: int, delay: float = SLEEP) -> dict[str, Any]:
    """``x * factor``, slowly."""
    await _work(tag, delay)
    return {"n": x * factor}


@tool(permissions=["t"], idempotent=True)
async def add(tag: str, a: int, b: int, delay: float = SLEEP) -> dict[str, Any]:
    """``a + b``, slowly."""
    await _work(tag, delay)
    return {"n": a + b}


@tool(permissions=["t"])
async def effect(tag: str, delay: float = SLEEP) -> dict[str, Any]:
    """Neither idempotent nor taking an idempotency key: an effect."""
    await _work(tag, delay)
    return {"done": tag}


@tool(permissions=["t"])
async def keyed_effect(tag: str, idempotency_key: str, delay: float = SLEEP) -> dict[str, Any]:
    """Retry-safe through its key, but not idempotent: still an effect to order."""
    await _work(tag, delay)
    return {"done": tag, "key": idempotency_key}


@tool(permissions=["t"], idempotent=True, fallback="effect")
async def guarded(tag: str, delay: float = SLEEP) -> dict[str, Any]:
    """Idempotent, but its fallback is not: a step of it may have an effect."""
    await _work(tag, delay)
    return {"guarded": tag}


@tool(permissions=["t"], idempotent=True, max_concurrency=2)
async def limited(tag: str, delay: float = SLEEP) -> dict[str, Any]:
    """At most two calls at once, by declaration."""
    await _work(tag, delay)
    return {"tag": tag}


@tool(permissions=["t"], idempotent=True)
async def throttled(tag: str, delay: float = SLEEP) -> dict[str, Any]:
    """Declares no limit; the tests give it one in ``[tools.throttled]``."""
    await _work(tag, delay)
    return {"tag": tag}


@tool(permissions=["t"], idempotent=True, rollback="release")
async def reserve(tag: str, delay: float = SLEEP) -> dict[str, Any]:
    """Takes effect (idempotently) and can be undone by ``release``."""
    await _work(tag, delay)
    return {"reservation": f"r-{tag}"}


@tool(permissions=["t"], rollback="release")
async def book(tag: str, delay: float = SLEEP) -> dict[str, Any]:
    """An effect (not retry-safe) that ``release`` undoes."""
    await _work(tag, delay)
    return {"reservation": f"b-{tag}"}


@tool(permissions=["t"], idempotent=True)
async def release(tag: str, reservation: str) -> dict[str, Any]:
    """Undo a reservation, recording the order of undos."""
    REC.released.append(tag)
    return {"released": reservation}


@tool(permissions=["t"], idempotent=True)
async def refuse(tag: str, delay: float = SLEEP) -> None:
    """Fails after ``delay`` with a business refusal: trying again will not help."""
    await _work(tag, delay)
    raise ToolError(f"{tag} refused", retryable=False)


@tool(permissions=["t"], idempotent=True)
async def gated(tag: str) -> dict[str, Any]:
    """Runs until the test opens the gate."""
    REC.enter(tag)
    try:
        assert REC.gate is not None
        await REC.gate.wait()
    finally:
        REC.leave(tag)
    return {"tag": tag}


@tool(permissions=["t"], idempotent=True, rollback="release")
async def hold(tag: str, gate: str) -> dict[str, Any]:
    """Takes effect once the test's gate ``gate`` opens; undone by ``release``."""
    REC.enter(tag)
    try:
        await REC.gates.setdefault(gate, asyncio.Event()).wait()
    finally:
        REC.leave(tag)
    return {"reservation": f"h-{tag}"}


@tool(permissions=["t"], idempotent=True)
async def open_gates(tag: str, gates: list[str]) -> None:
    """Once the other steps are in flight, opens ``gates`` in that order, all at once, then refuses."""
    assert REC.in_flight is not None
    await REC.in_flight.wait()
    for name in gates:
        REC.gates.setdefault(name, asyncio.Event()).set()
    raise ToolError(f"{tag} refused", retryable=False)


class Tools:
    @hookimpl
    def agentkeel_register_tools(self, register: Any) -> None:
        for fn in (lookup, scale, add, effect, keyed_effect, guarded, limited, throttled, reserve, book, release,
                   refuse, gated, hold, open_gates):
            register(fn)


class Events:
    """An observer plugin: every event of every run."""

    def __init__(self) -> None:
        self.events: list[Event] = []

    @hookimpl
    def agentkeel_event(self, event: Event) -> None:
        self.events.append(event)

    def started(self) -> dict[int, list[int]]:
        return {e.data["step_id"]: e.data["alongside"] for e in self.events if e.kind == "step_started"}


def step(tool_name: str, tag: str, **args: Any) -> dict[str, Any]:
    depends = args.pop("depends_on", None)
    out: dict[str, Any] = {"description": tag, "tool_name": tool_name, "tool_args": {"tag": tag, **args}}
    if depends is not None:
        out["depends_on"] = depends
    return out


def wire(*steps: dict[str, Any]) -> dict[str, Any]:
    return {"reasoning": "parallel test", "steps": list(steps)}


def system(plan: Mapping[str, Any], *extra: object, **config: Any) -> AgentSystem:
    data = {"retry": {"base_delay_s": 0.0}, **config}
    return make_system(Tools(), ScriptedPlanner(plan), *extra, principals={"u": ["t"]}, config=data)


def request(run_id: str | None = None) -> AgentRequest:
    if run_id is None:
        return AgentRequest(message="m", user_id="u")
    return AgentRequest(message="m", user_id="u", run_id=run_id)


def lookups(n: int, delay: float = SLEEP) -> dict[str, Any]:
    return wire(*(step("lookup", f"s{i}", delay=delay) for i in range(1, n + 1)))


# --- 1. independent steps, max_parallel --------------------------------------------------------


async def test_independent_steps_overlap_up_to_the_default_max_parallel() -> None:
    global REC
    async with system(lookups(10)) as sys:
        REC = Recorder()
        response = await sys.run(request())
    assert response.status is RunStatus.SUCCEEDED, response.message
    assert [s.status for s in response.steps] == [StepStatus.SUCCEEDED] * 10
    assert [s.result["tag"] for s in response.steps] == [f"s{i}" for i in range(1, 11)]
    # all ten calls were in flight at once ([executor] max_parallel = 16 by default); how much
    # time that saves is measured in bench/parallel.py, not asserted here
    assert REC.peak == min(10, DEFAULT_MAX_PARALLEL)


async def test_max_parallel_bounds_the_overlap() -> None:
    async with system(lookups(10, 0.02), executor={"max_parallel": 3}) as sys:
        response = await sys.run(request())
    assert response.status is RunStatus.SUCCEEDED, response.message
    assert REC.peak == 3
    assert sorted(REC.started) == sorted(f"s{i}" for i in range(1, 11))


async def test_max_parallel_one_runs_the_steps_one_at_a_time_in_order() -> None:
    async with system(lookups(5, 0.01), executor={"max_parallel": 1}) as sys:
        response = await sys.run(request())
    assert response.status is RunStatus.SUCCEEDED, response.message
    assert REC.peak == 1
    assert REC.started == [f"s{i}" for i in range(1, 6)]
    assert all(REC.before(f"s{i}", f"s{i + 1}") for i in range(1, 5))


# --- 2. references make a graph ----------------------------------------------------------------


async def test_a_diamond_of_references_runs_the_middle_together_and_the_results_flow() -> None:
    plan = wire(
        step("lookup", "top", delay=0.02),
        step("scale", "left", x={"$ref": "/1/n"}, factor=3),
        step("scale", "right", x={"$ref": "/1/n"}, factor=5),
        step("add", "bottom", a={"$ref": "/2/n"}, b={"$ref": "/3/n"}, delay=0.01),
    )
    async with system(plan) as sys:
        response = await sys.run(request())
    assert response.status is RunStatus.SUCCEEDED, response.message
    assert [s.result for s in response.steps] == [{"tag": "top", "n": 2}, {"n": 6}, {"n": 10}, {"n": 16}]
    assert REC.overlap("left", "right")
    assert REC.before("top", "left") and REC.before("top", "right")
    assert REC.before("left", "bottom") and REC.before("right", "bottom")
    assert REC.peak == 2


# --- 3. "depends_on" ----------------------------------------------------------------------------


async def test_depends_on_makes_a_step_wait_without_reading_the_result() -> None:
    plan = wire(
        step("lookup", "first"),
        step("lookup", "after_first", delay=0.01, depends_on=[1]),
        step("lookup", "free"),
    )
    async with system(plan) as sys:
        response = await sys.run(request())
        state = sys.journal.load(response.run_id)
        shown = sys.show(response.run_id)
    assert response.status is RunStatus.SUCCEEDED, response.message
    assert REC.before("first", "after_first")
    assert REC.overlap("first", "free")
    # The plan keeps it, in memory and as journaled (SQLite), and rebuilds it.
    assert parse_plan(plan).to_dict()["steps"][1]["depends_on"] == [1]
    assert "depends_on" not in parse_plan(plan).to_dict()["steps"][2]
    journaled = state.run.plan
    assert journaled["steps"][1]["depends_on"] == [1]
    rebuilt = plan_from_dict(journaled)
    assert rebuilt.steps[1].after == frozenset({1}) and rebuilt.steps[1].depends_on == frozenset({1})
    assert rebuilt.to_dict() == journaled
    assert [s.status for s in shown.steps] == [StepStatus.SUCCEEDED] * 3


async def test_depends_on_survives_a_pause_and_resume_from_the_journal() -> None:
    plan = wire(
        step("lookup", "a", delay=0.01),
        step("lookup", "b", delay=0.03, depends_on=[1]),
        step("lookup", "c", delay=0.01, depends_on=[2]),
    )
    async with system(plan) as sys:
        req = request()

        def on_event(event: Event) -> None:
            if event.kind == "step_finished" and event.data["step"].step_id == 1:
                assert sys.request_stop(req.run_id, "pause", "paused by the test")

        paused = await sys.run(req, on_event=on_event)
        assert paused.status is RunStatus.RUNNING, paused.message
        assert REC.started == ["a"]
        resumed = await sys.resume(req.run_id)
    assert resumed.status is RunStatus.SUCCEEDED, resumed.message
    assert REC.started == ["a", "b", "c"]  # step 1 not run again
    assert REC.before("b", "c")  # the journaled plan still says 3 waits for 2


# --- 4. effects are ordered ---------------------------------------------------------------------


def _effect_plan(effect_tool: str) -> dict[str, Any]:
    return wire(
        step("lookup", "l1"),
        step("lookup", "l2"),
        step(effect_tool, "e3"),
        step("lookup", "l4"),
        step("lookup", "l5"),
    )


@pytest.mark.parametrize("effect_tool", ["effect", "keyed_effect"])
async def test_an_effect_waits_for_earlier_steps_and_later_steps_wait_for_it(effect_tool: str) -> None:
    events = Events()
    async with system(_effect_plan(effect_tool), events) as sys:
        response = await sys.run(request())
    assert response.status is RunStatus.SUCCEEDED, response.message
    # waves {1, 2}, {3}, {4, 5}
    assert REC.overlap("l1", "l2")
    assert REC.before("l1", "e3") and REC.before("l2", "e3")
    assert REC.before("e3", "l4") and REC.before("e3", "l5")
    assert REC.overlap("l4", "l5")
    assert events.started()[3] == []  # the effect ran alone


async def test_without_order_effects_the_effect_overlaps_the_lookups() -> None:
    async with system(_effect_plan("effect"), executor={"order_effects": False}) as sys:
        response = await sys.run(request())
    assert response.status is RunStatus.SUCCEEDED, response.message
    assert REC.peak == 5
    for tag in ("l1", "l2", "l4", "l5"):
        assert REC.overlap("e3", tag)


async def test_an_idempotent_tool_whose_fallback_is_not_counts_as_an_effect() -> None:
    plan = wire(step("lookup", "l1"), step("lookup", "l2"), step("guarded", "g3"), step("lookup", "l4"))
    async with system(plan) as sys:
        response = await sys.run(request())
    assert response.status is RunStatus.SUCCEEDED, response.message
    assert REC.overlap("l1", "l2")
    assert REC.before("l1", "g3") and REC.before("l2", "g3")
    assert REC.before("g3", "l4")


# --- 5. a failure in a wave ---------------------------------------------------------------------


async def test_a_failure_in_a_wave_awaits_its_siblings_starts_nothing_and_compensates_in_reverse() -> None:
    plan = wire(
        step("reserve", "slow", delay=0.15),
        step("refuse", "bad", delay=0.01),
        step("reserve", "quick", delay=0.06),
        step("reserve", "later", delay=0.01, depends_on=[1]),
    )
    async with system(plan) as sys:
        response = await sys.run(request())
        state = sys.journal.load(response.run_id)
        shown = sys.show(response.run_id)
    assert response.status is RunStatus.FAILED, response.message
    assert "step 2 (refuse)" in response.message
    # Both siblings still sleeping when step 2 failed were awaited to their end.
    assert REC.spans["bad"].end < REC.spans["quick"].end < REC.spans["slow"].end
    assert REC.finished == ["bad", "quick", "slow"]
    assert "later" not in REC.started  # the next wave never started
    statuses = {s.step_id: s.status for s in response.steps}
    assert statuses == {1: StepStatus.COMPENSATED, 2: StepStatus.FAILED, 3: StepStatus.COMPENSATED,
                        4: StepStatus.SKIPPED}
    assert "not run" in (response.steps[3].error or "")
    # Their outcomes were journaled; step 4 never was.
    for step_id in (1, 3):
        intent, outcome = state.forward(step_id)
        assert intent is not None and outcome is not None and outcome.status == "succeeded"
    failed = state.forward(2)[1]
    assert failed is not None and failed.status == "failed"
    assert state.forward(4) == (None, None)
    # Undone last-finished first: step 1 (finished last), then step 3.
    assert REC.released == ["slow", "quick"]
    compensations = [r.step_id for r in state.steps if r.kind == "compensation" and r.phase == "outcome"]
    assert compensations == [1, 3]
    assert {s.step_id: s.status for s in shown.steps}[1] is StepStatus.COMPENSATED


async def test_overlapping_effects_are_compensated_in_reverse_completion_order() -> None:
    """Effects (not idempotent) overlap only with ``order_effects = false``; undone last-finished
    first, whatever their step order."""
    plan = wire(
        step("book", "slow", delay=0.12),
        step("book", "mid", delay=0.06),
        step("book", "quick", delay=0.02),
        step("refuse", "bad", delay=0.09),
    )
    async with system(plan, executor={"order_effects": False}) as sys:
        response = await sys.run(request())
    assert response.status is RunStatus.FAILED, response.message
    assert REC.peak == 4
    assert REC.finished == ["quick", "mid", "bad", "slow"]
    assert REC.released == ["slow", "mid", "quick"]
    assert [s.status for s in response.steps] == [StepStatus.COMPENSATED] * 3 + [StepStatus.FAILED]


async def test_steps_finishing_in_the_same_tick_are_compensated_in_reverse_of_their_real_order() -> None:
    """Step 2 finishes before step 1 within one event-loop iteration (its gate opens first):
    step 1 finished last, so it is undone first, whatever the step ids."""
    REC.in_flight, REC.wait_for = asyncio.Event(), 2
    plan = wire(
        step("hold", "one", gate="g1"),
        step("hold", "two", gate="g2"),
        step("open_gates", "opener", gates=["g2", "g1"]),
    )
    async with system(plan) as sys:
        response = await sys.run(request())
    assert response.status is RunStatus.FAILED, response.message
    assert REC.finished == ["two", "one"]
    assert [s.status for s in response.steps] == [StepStatus.COMPENSATED, StepStatus.COMPENSATED,
                                                  StepStatus.FAILED]
    assert REC.released == ["one", "two"], "not the reverse of the order the steps finished"


# --- 6. per-tool max_concurrency ----------------------------------------------------------------


async def test_a_declared_max_concurrency_bounds_parallel_steps() -> None:
    plan = wire(*(step("limited", f"s{i}") for i in range(1, 7)))
    async with system(plan) as sys:
        response = await sys.run(request())
    assert response.status is RunStatus.SUCCEEDED, response.message
    assert REC.peak == 2
    assert len(REC.finished) == 6


async def test_max_concurrency_from_config_bounds_a_tool_that_declares_none() -> None:
    plan = wire(*(step("throttled", f"s{i}") for i in range(1, 7)))
    async with system(plan, tools={"throttled": {"max_concurrency": 2}}) as sys:
        assert sys.tools["throttled"].max_concurrency == 2
        response = await sys.run(request())
    assert response.status is RunStatus.SUCCEEDED, response.message
    assert REC.peak == 2


class PerRunPlanner:
    """Three ``limited`` steps per request, tagged by run so two runs' steps are told apart."""

    @hookimpl(tryfirst=True)
    def agentkeel_plan(self, request: AgentRequest, progress: Any = None) -> Any:
        if progress is not None:
            return None
        steps = (step("limited", f"{request.run_id}-{i}", delay=0.03) for i in range(1, 4))
        return parse_plan(wire(*steps), planner="per-run")


async def test_max_concurrency_is_shared_by_concurrent_runs() -> None:
    async with make_system(Tools(), PerRunPlanner(), principals={"u": ["t"]}) as sys:
        first, second = await asyncio.gather(sys.run(request("run-a")), sys.run(request("run-b")))
    assert first.status is RunStatus.SUCCEEDED and second.status is RunStatus.SUCCEEDED
    assert len(REC.finished) == 6
    assert REC.peak == 2
    # Both runs were in flight at once: the limit, not the runs, kept the overlap at 2.
    assert any(REC.overlap(f"run-a-{i}", f"run-b-{j}") for i in range(1, 4) for j in range(1, 4))


def test_max_concurrency_zero_is_refused_when_declared() -> None:
    with pytest.raises(ToolSpecError, match="zero_slots"):
        @tool(idempotent=True, max_concurrency=0)
        async def zero_slots() -> None:
            """Never runs."""


def test_max_concurrency_zero_is_refused_in_config() -> None:
    with pytest.raises(ConfigError, match="max_concurrency"):
        Config.from_dict({"principals": {}, "tools": {"throttled": {"max_concurrency": 0}}}, "<t>")


# --- 7. events say what runs alongside ----------------------------------------------------------


async def test_step_started_events_say_what_runs_alongside() -> None:
    events = Events()
    async with system(lookups(10, 0.02), events, executor={"max_parallel": 8}) as sys:
        response = await sys.run(request())
    assert response.status is RunStatus.SUCCEEDED, response.message
    started = events.started()
    assert sorted(started) == list(range(1, 11))
    assert any(started.values())
    for step_id, alongside in started.items():
        assert step_id not in alongside
        assert len(set(alongside)) == len(alongside), f"step {step_id}: {alongside} names a step twice"
        assert len(alongside) <= 7  # max_parallel = 8, itself excluded
    for step_id in range(1, 9):  # the first wave: each of steps 1-8 started alongside the other seven
        assert started[step_id] == [i for i in range(1, 9) if i != step_id], (step_id, started[step_id])


async def test_a_wave_of_two_names_each_other() -> None:
    events = Events()
    async with system(_effect_plan("effect"), events) as sys:
        response = await sys.run(request())
    assert response.status is RunStatus.SUCCEEDED, response.message
    assert events.started() == {1: [2], 2: [1], 3: [], 4: [5], 5: [4]}


async def test_a_chain_runs_nothing_alongside() -> None:
    plan = wire(
        step("lookup", "a", delay=0.01),
        step("scale", "b", x={"$ref": "/1/n"}, factor=2, delay=0.01),
        step("scale", "c", x={"$ref": "/2/n"}, factor=2, delay=0.01),
    )
    events = Events()
    async with system(plan, events) as sys:
        response = await sys.run(request())
    assert response.status is RunStatus.SUCCEEDED, response.message
    assert response.steps[2].result == {"n": 8}
    assert events.started() == {1: [], 2: [], 3: []}


# --- 8. deferred outcomes -----------------------------------------------------------------------


class SpyJournal:
    """A real ``MemoryJournal`` that also records the step writes made through it."""

    def __init__(self) -> None:
        self.inner = MemoryJournal()
        self.writes: list[tuple[str, list[tuple[int, str]]]] = []

    def intent(self, lease: Lease, record: StepRecord) -> None:
        self.writes.append(("intent", [(record.step_id, record.phase)]))
        self.inner.intent(lease, record)

    def outcome(self, lease: Lease, record: StepRecord) -> None:
        self.writes.append(("outcome", [(record.step_id, record.phase)]))
        self.inner.outcome(lease, record)

    def write_steps(self, lease: Lease, records: Sequence[StepRecord]) -> None:
        self.writes.append(("write_steps", [(r.step_id, r.phase) for r in records]))
        self.inner.write_steps(lease, records)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)


class Spying:
    def __init__(self) -> None:
        self.journal = SpyJournal()

    @hookimpl(tryfirst=True)
    def agentkeel_open_journal(self, config: Any) -> SpyJournal:
        return self.journal


async def test_each_step_leaves_one_intent_then_one_outcome_in_the_sqlite_journal() -> None:
    async with system(lookups(5, 0.01)) as sys:
        response = await sys.run(request())
        state = sys.journal.load(response.run_id)
    assert response.status is RunStatus.SUCCEEDED, response.message
    forward = [(r.step_id, r.phase) for r in state.steps if r.kind == "forward"]
    assert sorted(forward) == sorted((i, p) for i in range(1, 6) for p in ("intent", "outcome"))
    for i in range(1, 6):
        assert forward.index((i, "intent")) < forward.index((i, "outcome"))
        intent, outcome = state.forward(i)
        assert intent is not None and outcome is not None and outcome.status == "succeeded"


async def test_retry_safe_steps_with_nothing_to_undo_are_committed_together() -> None:
    spy = Spying()
    async with system(lookups(5, 0.01), spy, executor={"max_parallel": 1}) as sys:
        response = await sys.run(request())
    assert response.status is RunStatus.SUCCEEDED, response.message
    assert spy.journal.writes == [  # one commit, with the run's final status
        ("write_steps", [(i, p) for i in range(1, 6) for p in ("intent", "outcome")]),
    ]
    state = spy.journal.load(response.run_id)
    assert [(r.step_id, r.phase) for r in state.steps] == [
        (i, p) for i in range(1, 6) for p in ("intent", "outcome")]


async def test_a_retry_safe_step_with_a_rollback_commits_its_intent_before_its_call() -> None:
    spy = Spying()
    plan = wire(step("lookup", "l1", delay=0.0), step("reserve", "r2", delay=0.0), step("lookup", "l3", delay=0.0))
    async with system(plan, spy, executor={"max_parallel": 1}) as sys:
        response = await sys.run(request())
    assert response.status is RunStatus.SUCCEEDED, response.message
    assert spy.journal.writes == [
        # the lookup's records ride with the intent of reserve, which a rollback must be able to find
        ("write_steps", [(1, "intent"), (1, "outcome"), (2, "intent")]),
        ("write_steps", [(2, "outcome"), (3, "intent"), (3, "outcome")]),
    ]


async def test_the_outcome_of_a_step_that_is_not_retry_safe_is_written_at_once() -> None:
    spy = Spying()
    plan = wire(step("lookup", "l1", delay=0.01), step("effect", "e2", delay=0.01),
                step("lookup", "l3", delay=0.01))
    async with system(plan, spy) as sys:
        response = await sys.run(request())
    assert response.status is RunStatus.SUCCEEDED, response.message
    assert spy.journal.writes == [
        ("write_steps", [(1, "intent"), (1, "outcome"), (2, "intent")]),  # before the effect's call
        ("outcome", [(2, "outcome")]),  # not deferred: committed before step 3 starts
        ("write_steps", [(3, "intent"), (3, "outcome")]),
    ]


async def test_held_lease_defers_outcomes_into_the_next_write() -> None:
    spy = SpyJournal()
    lease = spy.create_run(run_id="r", user_id="u", session_id="s", message="m", principal="u", budget_usd=None,
                           plan={}, owner="me", ttl_s=30.0)

    def record(step_id: int, phase: str) -> StepRecord:
        return StepRecord(step_id, "forward", phase, "lookup", {}, f"r:{step_id}",
                          "succeeded" if phase == "outcome" else None)

    with HeldLease(spy, lease, 30.0) as held:
        held.intent(record(1, "intent"))
        held.outcome(record(1, "outcome"), defer=True)
        assert spy.writes == [("intent", [(1, "intent")])]  # nothing written yet
        held.intent(record(2, "intent"))
        held.outcome(record(2, "outcome"), defer=True)
        held.outcome(record(3, "outcome"), defer=True)
        held.flush()
        held.intent(record(4, "intent"))
        held.outcome(record(4, "outcome"))  # not retry-safe: at once
        held.outcome(record(5, "outcome"), defer=True)
    assert spy.writes == [
        ("intent", [(1, "intent")]),
        ("write_steps", [(1, "outcome"), (2, "intent")]),
        ("write_steps", [(2, "outcome"), (3, "outcome")]),
        ("intent", [(4, "intent")]),
        ("outcome", [(4, "outcome")]),
        ("write_steps", [(5, "outcome")]),  # flushed on exit
    ]
    assert [(r.step_id, r.phase) for r in spy.load("r").steps] == [
        (1, "intent"), (1, "outcome"), (2, "intent"), (2, "outcome"), (3, "outcome"), (4, "intent"),
        (4, "outcome"), (5, "outcome")]


# --- 9. a stop while a wave is in flight --------------------------------------------------------


async def _stop_mid_wave(kind: str) -> tuple[AgentSystem, Any, AgentRequest]:
    REC.gate, REC.in_flight, REC.wait_for = asyncio.Event(), asyncio.Event(), 3
    plan = wire(step("gated", "g1"), step("gated", "g2"), step("gated", "g3"),
                step("lookup", "after", delay=0.01, depends_on=[1]))
    sys = system(plan)
    await sys.start()
    req = request()
    task = asyncio.create_task(sys.run(req))
    await asyncio.wait_for(REC.in_flight.wait(), 5)
    if kind == "cancel":
        assert await sys.cancel(req.run_id, by="u", reason="cancelled by the test") is None  # served here
    else:
        assert sys.request_stop(req.run_id, "pause", "paused by the test")
    REC.gate.set()
    response = await asyncio.wait_for(task, 5)
    return sys, response, req


async def test_a_cancel_while_a_wave_is_in_flight_lets_it_finish_and_starts_nothing_more() -> None:
    sys, response, req = await _stop_mid_wave("cancel")
    try:
        state = sys.journal.load(req.run_id)
    finally:
        await sys.aclose()
    assert response.status is RunStatus.CANCELLED, response.message
    assert sorted(REC.finished) == ["g1", "g2", "g3"]
    assert "after" not in REC.started
    statuses = {s.step_id: s.status for s in response.steps}
    assert statuses[4] is StepStatus.SKIPPED
    assert all(statuses[i] is StepStatus.SUCCEEDED for i in (1, 2, 3))  # no rollback tool: they stand
    for step_id in (1, 2, 3):
        outcome = state.forward(step_id)[1]
        assert outcome is not None and outcome.status == "succeeded"
    assert state.forward(4) == (None, None)
    assert state.run.status == "cancelled"


async def test_a_pause_while_a_wave_is_in_flight_resumes_with_only_the_rest() -> None:
    sys, response, req = await _stop_mid_wave("pause")
    try:
        assert response.status is RunStatus.RUNNING, response.message
        assert "after" not in REC.started
        resumed = await sys.resume(req.run_id)
    finally:
        await sys.aclose()
    assert resumed.status is RunStatus.SUCCEEDED, resumed.message
    assert REC.started.count("g1") == 1 and sorted(REC.started) == ["after", "g1", "g2", "g3"]


def test_held_lease_holds_back_at_most_max_deferred_records() -> None:
    from agentkeel.runtime.lease import MAX_DEFERRED

    spy = SpyJournal()
    lease = spy.create_run(run_id="r", user_id="u", session_id="s", message="m", principal="u", budget_usd=None,
                           plan={}, owner="me", ttl_s=30.0)
    with HeldLease(spy, lease, 30.0) as held:
        for step_id in range(1, MAX_DEFERRED + 2):
            held.deferred_intent(StepRecord(step_id, "forward", "intent", "lookup", {}, f"r:{step_id}"))
        assert spy.writes == [("write_steps", [(i, "intent") for i in range(1, MAX_DEFERRED + 1)])]
    assert spy.writes[-1] == ("write_steps", [(MAX_DEFERRED + 1, "intent")])  # the rest, on exit
    assert [r.step_id for r in spy.load("r").steps] == list(range(1, MAX_DEFERRED + 2))
