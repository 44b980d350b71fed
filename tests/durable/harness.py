"""Crash harness for durable runs: real effects, real processes, SIGKILL at chosen points.

Child side (what runs inside ``python -m tests.durable.harness``):

- Harness tools with real effects in the demo shop database (``agentkeel_support``):
  ``h_lookup`` (idempotent), ``h_refund`` (takes the idempotency key, which the
  shop honours; compensated by ``h_cancel``), ``h_cancel`` (idempotent),
  ``h_email`` (never twice: no key) and ``h_gate`` (idempotent; with
  ``HARNESS_GATE`` set it waits until that file exists). Every call appends rows
  to a call log (its own SQLite file, ``HARNESS_CALL_LOG``) naming the tool, the
  step tag (``"s<step>"``), the process label (``HARNESS_LABEL``) and pid.
- Crash points, ``HARNESS_CRASH="<when>:<step>"``: ``start`` (step 1 authorized,
  before its intent), ``before``/``after`` (inside the tool, just before / just
  after the real effect), ``finished`` (outcome journaled, ``step_finished``),
  ``comp_before``/``comp_after`` (inside the compensator) and ``compensated``
  (compensation journaled); for plans with later revisions (a round, or a
  replan after a bounce), ``planning:<revision>`` (the planner was asked for that
  revision, nothing of it is journaled yet) and ``planned:<revision>`` (the
  revision is journaled, none of its steps started). The process SIGKILLs itself there.
- Parallel plans: ``HARNESS_EXECUTOR`` (JSON, e.g. ``{"max_parallel": 4, "order_effects": false}``)
  is merged into the ``[executor]`` config. Steps of one wave (started together, see
  ``waves``) can be made to meet at chosen points with ``HARNESS_WAVE_WAIT``: every
  forward tool waits, after logging "before", until the siblings it was started
  alongside (the ``step_started`` event) have logged "before" too (a barrier); then,
  when ``HARNESS_CRASH`` names a forward point of a sibling, the siblings are held
  (until the process dies) where the mode says: ``before`` (before their effect),
  ``after`` (effect done, outcome not journaled) or ``finished`` (the crash step waits
  until they are all ``step_finished``); ``started`` is the barrier alone.
  ``HARNESS_WAVE_ORDER=reverse`` makes the steps of a wave finish last step first
  (each waits, after its effect, for its later siblings to finish), so completion
  order is not step order. A wait that times out logs a ``wave_timeout`` row.
- ``main``: ``run RUN_ID`` (plan from ``HARNESS_PLAN``), ``resume RUN_ID`` (settling
  the in-doubt steps of ``HARNESS_RESOLVE="3=done,5=not-done"``) or ``rollback
  RUN_ID``; prints one JSON line (status, message, step statuses). Exit codes:
  0 answered, 3 refused (``LeaseHeldError``), 4 another agentkeel error.

Parent side: ``Paths``; ``run_child`` runs one child to its end, forked from a
forkserver that has agentkeel imported (a child starts in milliseconds, not the
~1s an interpreter needs to import) or, with ``fresh=True``, as a new
``python -m tests.durable.harness``; ``drive`` runs a plan, then resumes while
processes die; ``settle`` plays the operator of an in-doubt run; and
``check_invariants`` checks the promises of issue 4.
"""

from __future__ import annotations

import argparse
import asyncio
import concurrent.futures
import json
import multiprocessing
import multiprocessing.forkserver
import os
import signal
import sqlite3
import subprocess
import sys
import threading
import time
import traceback
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from agentkeel import tool
from agentkeel.config import DEFAULT_MAX_PARALLEL
from agentkeel.errors import AgentkeelError, LeaseHeldError, ToolError
from agentkeel.markers import hookimpl
from agentkeel.runtime.system import AgentSystem
from agentkeel.types import AgentRequest, AgentResponse, Event, Principal, ToolSpec
from agentkeel_support.tools import cancel_refund, issue_refund, lookup_order, send_email

REPO_ROOT = Path(__file__).resolve().parents[2]
CALL_LOG_ENV = "HARNESS_CALL_LOG"
CRASH_ENV = "HARNESS_CRASH"
LABEL_ENV = "HARNESS_LABEL"
GATE_ENV = "HARNESS_GATE"
PLAN_ENV = "HARNESS_PLAN"
TTL_ENV = "HARNESS_LEASE_TTL"
RESOLVE_ENV = "HARNESS_RESOLVE"
EXECUTOR_ENV = "HARNESS_EXECUTOR"
WAVE_WAIT_ENV = "HARNESS_WAVE_WAIT"
WAVE_ORDER_ENV = "HARNESS_WAVE_ORDER"
WAVE_MODES = ("started", "before", "after", "finished")
WAVE_TIMEOUT_S = 12.0  # per tool call, all waits together; below the tools' 30 s timeout
FORWARD_POINTS = ("before", "after", "finished")
USER = "h"
PERMISSIONS = ("read", "refunds", "email")
GATE_WAIT_S = 50.0
CHILD_TIMEOUT_S = 120.0
EXIT_REFUSED = 3
EXIT_ERROR = 4

# Step kinds a plan is made of. "bounce" is an email the shop refuses (late failure).
KINDS = ("lookup", "refund", "email", "bounce", "gate")
NEVER_TWICE = ("email", "bounce")  # h_email: neither idempotent nor takes the key
EFFECTS = ("refund", "email", "bounce")  # kinds whose tool is not idempotent: ordered by ``order_effects``
ORDER_IDS = ("1001", "1003", "ORD-123")
CUSTOMERS = {"1001": "alice@example.com", "1003": "carol@example.com", "ORD-123": "erin@example.com"}
BOUNCE_TO = "frank@mail.invalid"


# --- child side: call log and crash points -----------------------------------------------------------


def _log_db(path: str | os.PathLike[str]) -> sqlite3.Connection:
    conn = sqlite3.connect(path, timeout=30.0, isolation_level=None, check_same_thread=False)
    conn.execute("PRAGMA journal_mode = WAL")
    conn.execute("PRAGMA synchronous = NORMAL")  # a commit survives SIGKILL; power loss is not tested
    conn.execute(
        "CREATE TABLE IF NOT EXISTS calls (seq INTEGER PRIMARY KEY AUTOINCREMENT, label TEXT, pid INTEGER, "
        "tool TEXT, tag TEXT, phase TEXT, detail TEXT, ts REAL)"
    )
    return conn


_log_conn: tuple[int, str, sqlite3.Connection] | None = None
_log_lock = threading.Lock()


def log_call(tool_name: str, tag: str, phase: str, detail: str = "") -> None:
    """Append one row to the call log; committed before returning (survives SIGKILL)."""
    global _log_conn
    path = os.environ.get(CALL_LOG_ENV)
    if not path:
        raise ToolError(f"{CALL_LOG_ENV} is not set: the harness tools need a call log", retryable=False)
    with _log_lock:
        if _log_conn is None or _log_conn[:2] != (os.getpid(), path):
            _log_conn = (os.getpid(), path, _log_db(path))  # one per process and file
        _log_conn[2].execute(
            "INSERT INTO calls (label, pid, tool, tag, phase, detail, ts) VALUES (?, ?, ?, ?, ?, ?, ?)",
            (os.environ.get(LABEL_ENV, ""), os.getpid(), tool_name, tag, phase, detail, time.time()),
        )


def crash_if(when: str, step: int) -> None:
    """SIGKILL this process when ``HARNESS_CRASH`` names this point."""
    if os.environ.get(CRASH_ENV) == f"{when}:{step}":
        log_call("-", f"s{step}", "crash", when)
        os.kill(os.getpid(), signal.SIGKILL)


def _step_of(tag: str) -> int:
    return int(tag[1:])


class _Wave:
    """What this process knows of the steps in flight: who was started alongside whom (the
    ``step_started`` events) and which points each step reached ("before", "held", "finished")."""

    def __init__(self) -> None:
        self.pid = os.getpid()
        self.cond = threading.Condition()
        self.alongside: dict[int, frozenset[int]] = {}
        self.reached: dict[int, set[str]] = {}

    def started(self, step: int, alongside: Sequence[int]) -> None:
        with self.cond:
            self.alongside[step] = frozenset(alongside)

    def siblings(self, step: int) -> frozenset[int]:
        with self.cond:
            return self.alongside.get(step, frozenset())

    def mark(self, step: int, point: str) -> None:
        with self.cond:
            self.reached.setdefault(step, set()).add(point)
            self.cond.notify_all()

    def wait(self, tool_name: str, tag: str, steps: frozenset[int], points: frozenset[str], deadline: float,
             what: str) -> None:
        """Wait until each of ``steps`` reached one of ``points``; on timeout log ``wave_timeout``."""
        if not steps:
            return
        with self.cond:
            met = self.cond.wait_for(lambda: all(self.reached.get(s, set()) & points for s in steps),
                                     timeout=max(0.0, deadline - time.monotonic()))
        if not met:
            log_call(tool_name, tag, "wave_timeout", f"{what}: {sorted(steps)}")


_wave_state: _Wave | None = None
_wave_lock = threading.Lock()


def _wave() -> _Wave:
    global _wave_state
    with _wave_lock:
        if _wave_state is None or _wave_state.pid != os.getpid():
            _wave_state = _Wave()  # one per process
        return _wave_state


def _forward_crash() -> tuple[str, int] | None:
    """``HARNESS_CRASH`` when it names a forward point (before, after, finished) of a step."""
    when, _, step = os.environ.get(CRASH_ENV, "").partition(":")
    return (when, int(step)) if when in FORWARD_POINTS else None


def _hold(tool_name: str, tag: str, deadline: float) -> None:
    """Stay in flight until this process dies at its crash point (or the deadline passes)."""
    log_call(tool_name, tag, "held")
    _wave().mark(_step_of(tag), "held")
    time.sleep(max(0.0, deadline - time.monotonic()))
    log_call(tool_name, tag, "wave_timeout", "held, but the crash never came")


def _wave_before(tool_name: str, tag: str, deadline: float) -> None:
    """A forward tool, having logged "before": the barrier, then hold or wait (``HARNESS_WAVE_WAIT``)."""
    step, wave = _step_of(tag), _wave()
    wave.mark(step, "before")
    mode = os.environ.get(WAVE_WAIT_ENV)
    if not mode:
        return
    siblings = wave.siblings(step)
    wave.wait(tool_name, tag, siblings, frozenset({"before"}), deadline, "siblings never started")
    crash = _forward_crash()
    if crash is None or crash[1] not in siblings | {step}:
        return
    if crash[1] == step:  # the crash step: the siblings get where the mode says first
        if mode in ("before", "after"):
            wave.wait(tool_name, tag, siblings, frozenset({"held"}), deadline, "siblings never held")
        elif mode == "finished":
            wave.wait(tool_name, tag, siblings, frozenset({"finished"}), deadline, "siblings never finished")
    elif mode == "before":
        _hold(tool_name, tag, deadline)


def _wave_after(tool_name: str, tag: str, deadline: float) -> None:
    """A forward tool after its effect (and crash point): hold (mode ``after``), then, with
    ``HARNESS_WAVE_ORDER=reverse``, let every later sibling finish first."""
    step, wave = _step_of(tag), _wave()
    siblings = wave.siblings(step)
    crash = _forward_crash()
    if os.environ.get(WAVE_WAIT_ENV) == "after" and crash is not None and crash[1] in siblings:
        _hold(tool_name, tag, deadline)
    if os.environ.get(WAVE_ORDER_ENV) == "reverse":
        later = frozenset(s for s in siblings if s > step and (crash is None or s != crash[1]))
        wave.wait(tool_name, tag, later, frozenset({"finished", "held"}), deadline, "later siblings never finished")


def _effect(
    tool_name: str, tag: str, effect: Callable[[], dict[str, Any]], compensation: bool = False
) -> dict[str, Any]:
    """Run ``effect`` between crash points, logging before and after it (and, for a forward
    tool, meeting the siblings of its wave: ``_wave_before`` / ``_wave_after``)."""
    step = _step_of(tag)
    deadline = time.monotonic() + WAVE_TIMEOUT_S
    log_call(tool_name, tag, "before")
    if not compensation:
        _wave_before(tool_name, tag, deadline)
    crash_if("comp_before" if compensation else "before", step)
    try:
        result = effect()
    except BaseException as exc:
        log_call(tool_name, tag, "after", f"error: {exc}")
        crash_if("comp_after" if compensation else "after", step)
        if not compensation:
            _wave_after(tool_name, tag, deadline)
        raise
    log_call(tool_name, tag, "after", "ok " + str(result.get("refund_id") or result.get("email_id") or ""))
    crash_if("comp_after" if compensation else "after", step)
    if not compensation:
        _wave_after(tool_name, tag, deadline)
    return result


@tool(permissions=["read"], idempotent=True)
def h_lookup(order_id: str, tag: str) -> dict[str, Any]:
    """Look an order up in the shop (reads only)."""
    return _effect("h_lookup", tag, lambda: lookup_order(order_id))


@tool(permissions=["refunds"], rollback="h_cancel")
def h_refund(order_id: str, amount: float, tag: str, idempotency_key: str | None = None) -> dict[str, Any]:
    """Refund part of an order; the shop honours the idempotency key."""
    return _effect("h_refund", tag, lambda: issue_refund(order_id, amount, idempotency_key=idempotency_key))


@tool(permissions=["refunds"], idempotent=True)
def h_cancel(
    order_id: str,
    tag: str,
    refund_id: str | None = None,
    amount: float | None = None,
    idempotency_key: str | None = None,
) -> dict[str, Any]:
    """Cancel the refund of a harness step (the compensator of ``h_refund``)."""
    return _effect(
        "h_cancel", tag, lambda: cancel_refund(order_id, refund_id, amount, idempotency_key), compensation=True
    )


@tool(permissions=["email"], allow_uncancellable=True)
def h_email(to: str, subject: str, tag: str) -> dict[str, Any]:
    """Send an email; the subject is prefixed with the step tag so the shop row names its step."""
    return _effect("h_email", tag, lambda: send_email(to, f"[{tag}] {subject}", "sent by the crash harness"))


@tool(permissions=["read"], idempotent=True, timeout=GATE_WAIT_S + 10)
def h_gate(tag: str) -> dict[str, Any]:
    """With ``HARNESS_GATE`` set, wait until that file exists (the test opens it)."""
    log_call("h_gate", tag, "before")
    gate = os.environ.get(GATE_ENV)
    if gate:
        log_call("h_gate", tag, "waiting")
        deadline = time.monotonic() + GATE_WAIT_S
        while not os.path.exists(gate):
            if time.monotonic() > deadline:
                raise ToolError(f"gate {gate} was never opened", retryable=False)
            time.sleep(0.01)
    log_call("h_gate", tag, "after", "ok")
    return {"opened": True}


TOOLS = (h_lookup, h_refund, h_cancel, h_email, h_gate)
FORWARD_TOOL = {"lookup": "h_lookup", "refund": "h_refund", "email": "h_email", "bounce": "h_email",
                "gate": "h_gate"}


class HarnessPlugin:
    """Registers the harness tools and crashes at the step-boundary points of ``HARNESS_CRASH``."""

    @hookimpl
    def agentkeel_register_tools(self, register: Callable[[Any], None]) -> None:
        for fn in TOOLS:
            register(fn)

    @hookimpl
    def agentkeel_authorize(self, principal: Principal, tool: ToolSpec, args: Mapping[str, Any] | None) -> None:
        if args is not None and tool.name != "h_cancel" and args.get("tag") == "s1":
            crash_if("start", 1)
        # abstain: the default permissions plugin decides

    @hookimpl
    def agentkeel_event(self, event: Event) -> None:
        if event.kind == "step_started":
            _wave().started(event.data["step_id"], event.data.get("alongside", ()))
        elif event.kind == "step_finished":
            _wave().mark(event.data["step"].step_id, "finished")
            crash_if("finished", event.data["step"].step_id)
        elif event.kind == "step_compensated":
            crash_if("compensated", event.data["step_id"])
        elif event.kind == "plan_ready":
            crash_if("planned", event.data["revision"])


def _harness_planner(wire: Mapping[str, Any], later: Sequence[Mapping[str, Any]]) -> Any:
    """A scripted planner (``later``: the revisions after the first) that crashes at ``planning:N``."""
    from agentkeel.testing import ScriptedPlanner

    class HarnessPlanner(ScriptedPlanner):
        @hookimpl(tryfirst=True)
        def agentkeel_plan(self, tools: Mapping[str, Any], progress: Any = None) -> Any:
            if progress is not None:
                crash_if("planning", progress.revision)
            return super().agentkeel_plan(tools=tools, progress=progress)

    return HarnessPlanner(wire, later)


# --- plans -----------------------------------------------------------------------------------------


def plan_step(step: int, kind: str) -> dict[str, Any]:
    """The wire-format step ``step`` (1-based) of kind ``kind``; arguments depend only on both."""
    tag = f"s{step}"
    order = ORDER_IDS[step % len(ORDER_IDS)]
    if kind == "lookup":
        return {"description": f"look up {order}", "tool_name": "h_lookup",
                "tool_args": {"order_id": order, "tag": tag}}
    if kind == "refund":  # small distinct amounts: never more than an order's total
        amount = round(1.0 + step / 100, 2)
        return {"description": f"refund {amount} on {order}", "tool_name": "h_refund",
                "tool_args": {"order_id": order, "amount": amount, "tag": tag}}
    if kind in ("email", "bounce"):
        to = BOUNCE_TO if kind == "bounce" else CUSTOMERS[order]
        return {"description": f"email {to}", "tool_name": "h_email",
                "tool_args": {"to": to, "subject": f"about order {order}", "tag": tag}}
    if kind == "gate":
        return {"description": "wait for the test", "tool_name": "h_gate", "tool_args": {"tag": tag}}
    raise ValueError(f"unknown step kind {kind!r}; use one of {KINDS}")


def wire_plan(kinds: Sequence[str], first: int = 1, observe: bool = False) -> dict[str, Any]:
    wire: dict[str, Any] = {"reasoning": "crash harness plan",
                            "steps": [plan_step(i, k) for i, k in enumerate(kinds, start=first)]}
    if observe:
        wire["observe"] = True
    return wire


@dataclass(frozen=True)
class Revised:
    """A plan in two revisions: ``first``, then ``then`` (steps numbered after it).

    ``reason="round"``: ``first`` is a round (``observe``) and ``then`` the next one.
    ``reason="replan"``: ``first`` ends with a bounce, and ``then`` is the replan
    after it. ``kinds`` are the steps of both, in run order (step ids 1..n)."""

    first: tuple[str, ...]
    then: tuple[str, ...]
    reason: str

    @property
    def kinds(self) -> tuple[str, ...]:
        return (*self.first, *self.then)

    def wires(self) -> dict[str, Any]:
        return {"plan": wire_plan(self.first, observe=self.reason == "round"),
                "later": [wire_plan(self.then, first=len(self.first) + 1)]}


def crash_points(kinds: Sequence[str]) -> list[str]:
    """Every step boundary, both sides of every effect, and (with a bounce) every point of the rollback."""
    points = ["start:1"]
    for step in range(1, len(kinds) + 1):
        points += [f"before:{step}", f"after:{step}", f"finished:{step}"]
    if "bounce" in kinds:
        for step, kind in enumerate(kinds, start=1):
            if kind == "refund":
                points += [f"comp_before:{step}", f"comp_after:{step}", f"compensated:{step}"]
    return points


# --- child entry point ---------------------------------------------------------------------------


def build_system(wire: Mapping[str, Any] | None = None) -> AgentSystem:
    """An ``AgentSystem`` with the harness tools and a scripted planner for ``wire`` (a
    plan, or ``{"plan", "later"}``: later revisions too; a resume gets the later ones)."""
    from agentkeel.testing import make_system

    plugins: list[object] = [HarnessPlugin()]
    if wire is not None:
        later = wire.get("later", ())
        plugins.append(_harness_planner(wire.get("plan", wire), later))
    config: dict[str, Any] = {"retry": {"base_delay_s": 0.0, "max_delay_s": 0.0}}
    if os.environ.get(TTL_ENV):
        config["journal"] = {"lease_ttl_s": float(os.environ[TTL_ENV])}
    if os.environ.get(EXECUTOR_ENV):
        config["executor"] = dict(json.loads(os.environ[EXECUTOR_ENV]))
    return make_system(*plugins, principals={USER: PERMISSIONS}, config=config)


def response_summary(response: AgentResponse) -> dict[str, Any]:
    return {
        "run_id": response.run_id,
        "status": response.status.value,
        "message": response.message,
        "steps": {str(s.step_id): s.status.value for s in response.steps},
    }


async def serve(mode: str, run_id: str) -> AgentResponse:
    """Do ``mode`` (run, resume or rollback) for ``run_id`` in this process.

    A resume settles the in-doubt steps named by ``HARNESS_RESOLVE`` (``"3=done,5=not-done"``).
    """
    wire = json.loads(Path(os.environ[PLAN_ENV]).read_text())
    if os.environ.get(WAVE_WAIT_ENV) or os.environ.get(WAVE_ORDER_ENV):
        # a whole wave may be in its tools' threads at once, some held there: enough threads for all
        asyncio.get_running_loop().set_default_executor(
            concurrent.futures.ThreadPoolExecutor(max_workers=32, thread_name_prefix="harness-tool"))
    if mode != "run" and "later" not in wire:
        wire = None  # a plain plan is never planned again: a resume needs no planner
    async with build_system(wire) as system:
        if mode == "run":
            return await system.run(AgentRequest(message="crash harness", user_id=USER, run_id=run_id))
        if mode == "resume":
            resolve = {int(k): v == "done" for k, _, v in
                       (item.partition("=") for item in os.environ.get(RESOLVE_ENV, "").split(",") if item)}
            return await system.resume(run_id, resolve or None)
        return await system.rollback(run_id)


def answer(mode: str, run_id: str) -> tuple[int, dict[str, Any]]:
    """Serve ``mode`` for ``run_id``: (exit code, the JSON answer)."""
    try:
        response = asyncio.run(serve(mode, run_id))
    except LeaseHeldError as exc:
        return EXIT_REFUSED, {"refused": str(exc)}
    except AgentkeelError as exc:
        return EXIT_ERROR, {"error": type(exc).__name__, "message": str(exc)}
    return 0, response_summary(response)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tests.durable.harness")
    parser.add_argument("mode", choices=("run", "resume", "rollback"))
    parser.add_argument("run_id")
    args = parser.parse_args(argv)
    code, result = answer(args.mode, args.run_id)
    print(json.dumps(result), flush=True)
    return code


def forked_child(mode: str, run_id: str, env: dict[str, str], answer_file: str) -> None:
    """Target of a forkserver child: ``main`` with ``env`` as the whole environment."""
    os.environ.clear()
    os.environ.update(env)
    try:
        code, result = answer(mode, run_id)
    except BaseException:  # noqa: BLE001 - reported to the parent, which fails the test with it
        result, code = {"error": "crash", "message": traceback.format_exc()}, 1
    Path(answer_file).write_text(json.dumps(result))
    sys.exit(code)


# --- parent side -----------------------------------------------------------------------------------


@dataclass(frozen=True)
class Paths:
    """Where one scenario keeps its state."""

    root: Path
    home: Path
    shop_db: Path

    @classmethod
    def under(cls, root: Path, home: Path | None = None, shop_db: Path | None = None) -> Paths:
        root.mkdir(parents=True, exist_ok=True)
        return cls(root, home or root / "home", shop_db or root / "shop.db")

    @property
    def call_log(self) -> Path:
        return self.root / "calls.db"

    @property
    def plan_file(self) -> Path:
        return self.root / "plan.json"

    @property
    def options_file(self) -> Path:
        """The scenario's executor config and wave waits (``write_options``), given to every child."""
        return self.root / "options.json"

    def write_options(self, executor: Mapping[str, Any] | None = None, wave_wait: str | None = None,
                      wave_order: str | None = None) -> None:
        if wave_wait is not None and wave_wait not in WAVE_MODES:
            raise ValueError(f"unknown wave wait {wave_wait!r}; use one of {WAVE_MODES}")
        if wave_order not in (None, "reverse"):
            raise ValueError(f"unknown wave order {wave_order!r}")
        options = {EXECUTOR_ENV: json.dumps(dict(executor)) if executor is not None else None,
                   WAVE_WAIT_ENV: wave_wait, WAVE_ORDER_ENV: wave_order}
        options = {k: v for k, v in options.items() if v is not None}
        if options:
            self.options_file.write_text(json.dumps(options))
        else:
            self.options_file.unlink(missing_ok=True)

    def env(self, label: str, crash: str | None = None, gate: Path | None = None,
            ttl: float | None = None, resolve: Mapping[int, bool] | None = None) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if not k.startswith("HARNESS_")}
        env.update({"AGENTKEEL_HOME": str(self.home), "AGENTKEEL_SHOP_DB": str(self.shop_db),
                    CALL_LOG_ENV: str(self.call_log), LABEL_ENV: label, PLAN_ENV: str(self.plan_file),
                    "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO_ROOT), env.get("PYTHONPATH")]))})
        for key in ("AGENTKEEL_CONFIG", "AGENTKEEL_LOAD_PLUGINS", "AGENTKEEL_DISABLE_PLUGINS"):
            env.pop(key, None)
        if crash:
            env[CRASH_ENV] = crash
        if gate is not None:
            env[GATE_ENV] = str(gate)
        if ttl is not None:
            env[TTL_ENV] = str(ttl)
        if resolve:
            env[RESOLVE_ENV] = ",".join(f"{k}={'done' if v else 'not-done'}" for k, v in resolve.items())
        if self.options_file.exists():
            env.update(json.loads(self.options_file.read_text()))
        return env

    def write_plan(self, kinds: Sequence[str] | Revised) -> None:
        wire = kinds.wires() if isinstance(kinds, Revised) else wire_plan(kinds)
        self.plan_file.write_text(json.dumps(wire))


@dataclass
class Child:
    """A finished child process: killed (returncode -9), or what it answered."""

    label: str
    pid: int
    crash: str | None
    returncode: int
    out: str
    err: str = ""
    resolved: dict[int, bool] = field(default_factory=dict)  # in-doubt steps it was told to settle

    @property
    def killed(self) -> bool:
        return self.returncode == -signal.SIGKILL

    @property
    def answer(self) -> dict[str, Any]:
        lines = [line for line in self.out.splitlines() if line.startswith("{")]
        assert lines, f"child {self.label} gave no answer (rc {self.returncode}):\n{self.out}\n{self.err}"
        parsed: dict[str, Any] = json.loads(lines[-1])
        return parsed


def start_child(paths: Paths, mode: str, run_id: str, label: str, crash: str | None = None,
                **env_options: Any) -> subprocess.Popen[str]:
    """``python -m tests.durable.harness MODE RUN_ID``: a fresh interpreter (slow, ~1s to import)."""
    return subprocess.Popen(
        [sys.executable, "-m", "tests.durable.harness", mode, run_id],
        cwd=REPO_ROOT, env=paths.env(label, crash, **env_options), text=True,
        stdout=subprocess.PIPE, stderr=subprocess.PIPE,
    )


def finish_child(proc: subprocess.Popen[str], label: str, crash: str | None = None) -> Child:
    try:
        out, err = proc.communicate(timeout=CHILD_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        proc.kill()
        out, err = proc.communicate()
        raise AssertionError(f"child {label} did not finish in {CHILD_TIMEOUT_S}s:\n{out}\n{err}") from None
    return Child(label, proc.pid, crash, proc.returncode, out, err)


_PRELOAD = ["tests.durable.harness", "agentkeel.runtime.system", "agentkeel.testing", "agentkeel.journal.sqlite",
            "agentkeel.cost.pricing", "agentkeel.memory.sqlite",
            "agentkeel.sandbox.docker.plugin", "agentkeel.planner.llm",
            "pytest"]  # a child started under the ``pytest`` script re-imports it as its main module


def _forkserver() -> Any:
    """The forkserver context, started with the agentkeel modules imported (children start in ms)."""
    ctx = multiprocessing.get_context("forkserver")
    ctx.set_forkserver_preload(_PRELOAD)
    saved = os.environ.get("PYTHONPATH")
    os.environ["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO_ROOT), saved]))
    try:  # the server imports the preload in a fresh interpreter: it needs the repo on its path
        multiprocessing.forkserver.ensure_running()
    finally:
        if saved is None:
            del os.environ["PYTHONPATH"]
        else:
            os.environ["PYTHONPATH"] = saved
    return ctx


class ForkedChild:
    """A child forked from the forkserver: a real process, started without paying for imports."""

    def __init__(self, paths: Paths, mode: str, run_id: str, label: str, crash: str | None = None,
                 **env_options: Any) -> None:
        self.label, self.crash = label, crash
        self.answer_file = paths.root / f"answer-{label}.json"
        self.answer_file.unlink(missing_ok=True)
        env = paths.env(label, crash, **env_options)
        self.process = _forkserver().Process(
            target=forked_child, args=(mode, run_id, env, str(self.answer_file)), name=f"harness-{label}"
        )
        self.process.start()

    @property
    def pid(self) -> int:
        pid: int = self.process.pid
        return pid

    def finish(self, timeout: float = CHILD_TIMEOUT_S) -> Child:
        self.process.join(timeout)
        if self.process.exitcode is None:
            self.process.kill()
            self.process.join()
            raise AssertionError(f"child {self.label} did not finish in {timeout}s")
        out = self.answer_file.read_text() if self.answer_file.exists() else ""
        return Child(self.label, self.pid, self.crash, self.process.exitcode, out)


def run_child(paths: Paths, mode: str, run_id: str, label: str, crash: str | None = None, *,
              fresh: bool = False, **env_options: Any) -> Child:
    """Run one child to its end: forked from the forkserver, or with ``fresh`` a new interpreter."""
    if fresh:
        child = finish_child(start_child(paths, mode, run_id, label, crash, **env_options), label, crash)
    else:
        child = ForkedChild(paths, mode, run_id, label, crash, **env_options).finish()
    child.resolved = dict(env_options.get("resolve") or {})
    return child


@dataclass
class History:
    """What happened to one run: each process, and what the journal held before each resume."""

    run_id: str
    kinds: tuple[str, ...]
    children: list[Child] = field(default_factory=list)
    replanned: bool = False
    """The plan's bounce is replaced by a replan (``Revised(reason="replan")``): the run succeeds."""
    done_before: dict[str, tuple[frozenset[int], frozenset[int]]] = field(default_factory=dict)
    executor: dict[str, Any] | None = None
    """The ``[executor]`` config every process ran with (``HARNESS_EXECUTOR``); None: the defaults,
    checked with the sequential model (``expected_end``)."""
    wave_wait: str | None = None
    """``HARNESS_WAVE_WAIT`` of every process: where a crash step's siblings were when it fired."""

    @property
    def triggered(self) -> list[tuple[str, int]]:
        """The crash points that fired, in order, as (when, step)."""
        return [(when, step) for when, step in self.events() if when not in ("done", "not-done")]

    def events(self) -> list[tuple[str, int]]:
        """Crashes that fired and operator resolutions (``"done"``/``"not-done"``), in order."""
        out: list[tuple[str, int]] = []
        for child in self.children:
            out += [("done" if happened else "not-done", step) for step, happened in child.resolved.items()]
            if child.killed:
                assert child.crash, f"child {child.label} was killed without a crash point:\n{child.err}"
                when, step = child.crash.split(":")
                out.append((when, int(step)))
        return out

    def resolutions(self, step: int) -> list[bool]:
        return [happened for child in self.children for s, happened in child.resolved.items() if s == step]


def load_state(paths: Paths, run_id: str) -> Any:
    from agentkeel.journal.sqlite import SQLiteJournal

    journal = SQLiteJournal(paths.home)
    try:
        return journal.load(run_id)
    finally:
        journal.close()


def done_steps(state: Any) -> tuple[frozenset[int], frozenset[int]]:
    """(steps whose latest attempt has an outcome, steps whose compensation succeeded) in ``state``.

    An operator's "it did not happen" (an outcome with status ``pending``) is not an outcome:
    that step is meant to run again.
    """
    ids = {r.step_id for r in state.steps}
    forward = {i for i in ids if (o := state.forward(i)[1]) is not None and o.status != "pending"}
    undone = {i for i in ids if (o := state.compensation(i)[1]) is not None and o.status == "succeeded"}
    return frozenset(forward), frozenset(undone)


def drive(paths: Paths, run_id: str, kinds: Sequence[str] | Revised, crashes: Sequence[str | None],
          first_mode: str = "run", history: History | None = None, fresh: bool = False,
          resolve: Mapping[int, bool] | None = None, *, executor: Mapping[str, Any] | None = None,
          wave_wait: str | None = None, wave_order: str | None = None) -> History:
    """Run (or resume / roll back) ``run_id`` with ``crashes[0]``, then resume with the next crash
    points while processes die, and once more without one; every survivor must answer.
    ``resolve`` is given to the first process (a resume settling in-doubt steps). ``executor``,
    ``wave_wait`` and ``wave_order`` (a run only) hold for every process of the run."""
    if first_mode == "run":
        if executor is not None:
            if isinstance(kinds, Revised):
                raise ValueError("the parallel model (waves) covers single-revision plans only")
            waves(tuple(kinds), executor)  # a plan the model covers
        paths.write_plan(kinds)
        paths.write_options(executor, wave_wait, wave_order)
    elif executor is not None or wave_wait is not None or wave_order is not None:
        raise ValueError("executor and wave options are given to the run, and kept for its resumes")
    if isinstance(kinds, Revised):
        history = history or History(run_id, kinds.kinds, replanned=kinds.reason == "replan")
    else:
        history = history or History(run_id, tuple(kinds), wave_wait=wave_wait,
                                     executor=dict(executor) if executor is not None else None)
    index = 0
    mode = first_mode
    while True:
        crash = crashes[index] if index < len(crashes) else None
        label = f"p{len(history.children)}"
        if mode != "run":
            history.done_before[label] = done_steps(load_state(paths, run_id))
        child = run_child(paths, mode, run_id, label, crash, fresh=fresh, resolve=resolve)
        resolve = None
        history.children.append(child)
        if not child.killed:
            assert child.returncode == 0, f"child {label} failed (rc {child.returncode}):\n{child.out}\n{child.err}"
            assert "status" in child.answer, child.answer
            return history
        index += 1
        mode = "resume"
        assert index < 20, "a run kept crashing"


def read_calls(paths: Paths) -> list[dict[str, Any]]:
    if not paths.call_log.exists():
        return []
    conn = _log_db(paths.call_log)
    conn.row_factory = sqlite3.Row
    try:
        return [dict(r) for r in conn.execute("SELECT * FROM calls ORDER BY seq")]
    finally:
        conn.close()


def read_shop(paths: Paths) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """(refund rows, email rows) of the shop database."""
    from agentkeel_support.shop import connect

    with connect(paths.shop_db) as conn:
        refunds = [dict(r) for r in conn.execute("SELECT * FROM refunds ORDER BY created_at, refund_id")]
        emails = [dict(r) for r in conn.execute("SELECT * FROM emails")]
    return refunds, emails


# --- invariants -----------------------------------------------------------------------------------


def expected_end(
    kinds: Sequence[str], events: Sequence[tuple[str, int]], replanned: bool = False
) -> tuple[str, int | None]:
    """(final run status, in-doubt step) implied by the plan and ``History.events()``.

    A crash inside a never-twice step (before or after its effect) leaves it in doubt
    until an operator settles it; otherwise the run succeeds, or fails and is rolled
    back when it holds a bounce.
    """
    doubt: int | None = None
    for when, step in events:
        if when in ("done", "not-done"):
            assert step == doubt, f"step {step} was resolved but step {doubt} was in doubt"
            doubt = None
        elif when in ("before", "after") and kinds[step - 1] in NEVER_TWICE:
            assert doubt is None, f"step {step} crashed while step {doubt} was in doubt"
            doubt = step
    if doubt is not None:
        return "in_doubt", doubt
    return ("failed" if "bounce" in kinds and not replanned else "succeeded"), None


def waves(kinds: Sequence[str], executor: Mapping[str, Any]) -> list[tuple[int, ...]]:
    """The waves a harness plan runs in with ``executor`` (an ``[executor]`` config): the levels of
    the executor's graph (``PlanExecutor.graph``). Harness steps hold no references, so only
    ``order_effects`` orders them: with it, a step of a kind in ``EFFECTS`` is a wave of its own
    and the steps between two of them one wave; without it, the whole plan is one wave. Every
    step of a wave becomes ready at the same moment, so all start together (the model asks for
    waves no larger than ``max_parallel``, and a bounce, if any, last: as the plans here have it)."""
    order_effects = bool(executor.get("order_effects", True))
    max_parallel = int(executor.get("max_parallel", DEFAULT_MAX_PARALLEL))
    if "bounce" in kinds and (kinds.count("bounce") > 1 or kinds[-1] != "bounce"):
        raise ValueError(f"the parallel model needs a plan's bounce to be its last step: {kinds}")
    level: dict[int, int] = {}
    last_effect: int | None = None
    since: list[int] = []  # steps after the last effect
    for step, kind in enumerate(kinds, start=1):
        if kind not in KINDS:
            raise ValueError(f"unknown step kind {kind!r}; use one of {KINDS}")
        deps: set[int] = set()
        if order_effects:
            if last_effect is not None:
                deps.add(last_effect)
            if kind in EFFECTS:
                deps.update(since)
                last_effect, since = step, []
            else:
                since.append(step)
        level[step] = 1 + max((level[d] for d in deps), default=-1)
    out = [tuple(s for s in level if level[s] == i) for i in range(max(level.values(), default=-1) + 1)]
    for wave in out:
        if len(wave) > max_parallel:
            raise ValueError(f"wave {wave} is larger than max_parallel = {max_parallel}: the model needs it to "
                             "start at once")
    return out


@dataclass(frozen=True)
class WaveCrash:
    """A process killed at a forward point: ``launched``, the steps of the crash step's wave it ran."""

    label: str
    when: str
    step: int
    launched: tuple[int, ...]


@dataclass(frozen=True)
class ParallelEnd:
    """What ``parallel_end`` expects: the final status, the never-twice steps left in doubt (the
    run names the first; the others wait behind it) and the crashes inside a wave."""

    status: str
    doubts: tuple[int, ...]
    crashes: tuple[WaveCrash, ...]


def parallel_end(history: History) -> ParallelEnd:
    """``expected_end`` for a run of ``history.executor``: steps run in ``waves``.

    Each process starts a wave's steps that have no outcome yet (``History.done_before``), in step
    order, up to the first never-twice step in doubt (a resume stops there: it neither runs that
    step nor any after it). A crash at a forward point of step N leaves in doubt the never-twice
    steps of N's wave that were in flight: N itself at ``before``/``after``, as in a sequential run,
    and its siblings as ``HARNESS_WAVE_WAIT`` held them (``before``, ``after``: in flight;
    ``finished``: their outcomes journaled). Without a wave wait, a never-twice sibling of a crash
    step may or may not have finished: such a case is refused, not guessed. The operator settles
    the first step in doubt (``settle``); a resume then stops at the next one.
    """
    kinds = history.kinds
    assert history.executor is not None
    levels = waves(kinds, history.executor)
    level_of = {s: i for i, wave in enumerate(levels) for s in wave}
    doubts: set[int] = set()
    crashes: list[WaveCrash] = []
    for child in history.children:
        done = set(history.done_before.get(child.label, (frozenset(), frozenset()))[0])
        for step, happened in child.resolved.items():
            assert doubts and step == min(doubts), f"step {step} was resolved but the first in doubt was {doubts}"
            doubts.discard(step)
            if happened:
                done.add(step)
        if not child.killed:
            continue
        assert child.crash, f"child {child.label} was killed without a crash point:\n{child.err}"
        when, _, at = child.crash.partition(":")
        if when not in FORWARD_POINTS:
            # start:1 fires as step 1 is authorized: its task is the first of its wave to run, so
            # nothing runs alongside it yet; the rollback points come after every forward step.
            continue
        crash_step = int(at)
        wave = levels[level_of[crash_step]]
        stop = min((d for d in doubts if d in wave), default=None)
        launched = tuple(s for s in wave if s not in done and s not in doubts and (stop is None or s < stop))
        assert crash_step in launched, (
            f"{child.label} crashed at {child.crash}, but the model says it ran only {launched} of wave {wave}")
        crashes.append(WaveCrash(child.label, when, crash_step, launched))
        for step in launched:
            if kinds[step - 1] not in NEVER_TWICE:
                continue  # retry-safe: no outcome only means it runs again
            if step == crash_step:
                in_flight = when in ("before", "after")
            elif history.wave_wait in ("before", "after"):
                in_flight = True
            elif history.wave_wait == "finished":
                in_flight = False
            else:
                raise AssertionError(
                    f"never-twice step {step} ran alongside crash step {crash_step}: whether it was still in "
                    f"flight is a race; give the case HARNESS_WAVE_WAIT before, after or finished")
            if in_flight:
                doubts.add(step)
    if doubts:
        return ParallelEnd("in_doubt", tuple(sorted(doubts)), tuple(crashes))
    status = "failed" if "bounce" in kinds and not history.replanned else "succeeded"
    return ParallelEnd(status, (), tuple(crashes))


def _parallel_expectations(kinds: Sequence[str], levels: Sequence[tuple[int, ...]], status: str,
                           doubts: Sequence[int]) -> dict[int, str]:
    """For each step, what the journal must hold at the end (invariant 4 of a parallel run):
    "outcome", "doubt" (intent, no outcome), "maybe" (intent; an outcome or none) or "none".

    A run that ended (succeeded, or failed at its last-step bounce) has every outcome. A run
    in doubt stopped in the wave of its first in-doubt step D: every earlier wave has outcomes,
    no later wave ran; in D's wave, the steps before D ran to an outcome (in this process or
    an earlier one), the other doubts wait, and a retry-safe step after D was in flight at the
    crash: its outcome may have been journaled (or lost with it, to run again later)."""
    ids = range(1, len(kinds) + 1)
    if status != "in_doubt":
        return dict.fromkeys(ids, "outcome")
    first = doubts[0]
    level_of = {s: i for i, wave in enumerate(levels) for s in wave}
    assert {level_of[d] for d in doubts} == {level_of[first]}, f"steps {doubts} in doubt in different waves"
    out: dict[int, str] = {}
    for step in ids:
        if level_of[step] != level_of[first]:
            out[step] = "outcome" if level_of[step] < level_of[first] else "none"
        elif step in doubts:
            out[step] = "doubt"
        elif step < first or kinds[step - 1] in NEVER_TWICE:  # a never-twice step not in doubt: finished
            out[step] = "outcome"
        else:
            out[step] = "maybe"
    return out


def expected_final(history: History) -> tuple[str, tuple[int, ...]]:
    """(final run status, steps in doubt: the run names the first) of ``history``, by the
    sequential model (``expected_end``) or, with ``history.executor``, the parallel one."""
    if history.executor is None:
        status, doubt = expected_end(history.kinds, history.events(), history.replanned)
        return status, (doubt,) if doubt is not None else ()
    end = parallel_end(history)
    return end.status, end.doubts


def settle(paths: Paths, history: History, crashes: Sequence[str | None] = ()) -> History:
    """The operator's part of an in-doubt run: look in the shop whether the step's email went
    out, say so (``resume --resolve STEP=done|not-done``), and continue (crashing at ``crashes``).
    With several steps in doubt (a parallel wave), the one the run names: the first."""
    status, doubts = expected_final(history)
    doubt = doubts[0] if doubts else None
    assert status == "in_doubt" and doubt is not None, status
    sent = any(e["subject"].startswith(f"[s{doubt}] ") for e in read_shop(paths)[1])
    return drive(paths, history.run_id, history.kinds, crashes, first_mode="resume", history=history,
                 resolve={doubt: sent})


def check_invariants(paths: Paths, history: History) -> Any:
    """Check every promise for the run of ``history``; returns its final journal state.

    1. never-twice effects (emails) happened once per succeeded step, never twice, and
       only the steps left in doubt (the one an ``in_doubt`` status names, and with a
       parallel wave the others waiting behind it) have an unknown effect (0 or 1);
    2. one refund per idempotency key of a succeeded refund step, none for others (but
       a refund in flight at a crash that the run, stopped in doubt, has not run again
       may have one, and only one);
    3. no step whose outcome was journaled is run again by a later process;
    4. no step lost: every step up to where the run ended has an outcome, none after (by
       step id for a sequential run; for a parallel one by waves, ``_parallel_expectations``);
    5. journal and shop agree (refund ids, email ids, compensated <-> cancelled);
    6. a failed run was rolled back in the reverse of the order its forward outcomes were
       journaled (a step a crash interrupted first): last step first, for a sequential run;
    7. (parallel) at each crash inside a wave, the wave's steps were in flight where
       ``HARNESS_WAVE_WAIT`` put them, and no wave wait timed out.
    """
    run_id, kinds = history.run_id, history.kinds
    state = load_state(paths, run_id)
    run = state.run
    refunds, emails = read_shop(paths)
    calls = read_calls(paths)
    ids = range(1, len(kinds) + 1)
    crashes: tuple[WaveCrash, ...] = ()
    if history.executor is None:
        status, doubt = expected_end(kinds, history.events(), history.replanned)
        doubts: tuple[int, ...] = (doubt,) if doubt is not None else ()
        end = doubt or (kinds.index("bounce") + 1 if "bounce" in kinds and not history.replanned else len(kinds))
        expect = {step: "outcome" if step < end or (step == end and doubt is None)
                  else "doubt" if step == doubt else "none" for step in ids}
    else:
        parallel = parallel_end(history)
        status, doubts, crashes = parallel.status, parallel.doubts, parallel.crashes
        doubt = doubts[0] if doubts else None
        expect = _parallel_expectations(kinds, waves(kinds, history.executor), status, doubts)
    last = history.children[-1]
    where = f"run {run_id} kinds={kinds} executor={history.executor} events={history.events()}: "
    assert run.status == status, where + f"status {run.status!r} ({run.detail}), expected {status!r}"
    assert last.answer["status"] == run.status, where + f"the last process answered {last.answer}"
    assert run.owner == "", where + f"lease still held by {run.owner}"
    if doubt is not None:
        assert f"step {doubt} (h_email)" in run.detail, where + run.detail
    for record in state.steps:
        assert record.idempotency_key == f"{run_id}:{record.step_id}", where + repr(record)
    succeeded_refunds: set[str] = set()
    maybe_refunds: set[str] = set()
    for step, kind in enumerate(kinds, start=1):
        tag, key = f"s{step}", f"{run_id}:{step}"
        intent, outcome = state.forward(step)
        _, undo = state.compensation(step)
        mine = [c for c in calls if c["tag"] == tag and c["tool"] == FORWARD_TOOL[kind]]
        # 4: no step lost, none run past the end
        want = "failed" if kind == "bounce" else "succeeded"
        if expect[step] == "outcome":
            assert outcome is not None and outcome.status == want, where + f"step {step}: {outcome}"
        elif expect[step] == "doubt":
            assert intent is not None and outcome is None, where + f"step {step} should be in doubt"
        elif expect[step] == "maybe":
            assert intent is not None and (outcome is None or outcome.status == want), (
                where + f"step {step} was in flight at a crash: {intent} {outcome}")
        else:
            assert intent is None and outcome is None and not mine, where + f"step {step} ran after the end"
        # 3: no completed step re-executed by a later process
        for label, (forward_done, undone_before) in history.done_before.items():
            assert step not in forward_done or not [c for c in mine if c["label"] == label], (
                where + f"step {step} had an outcome before {label} started, and {label} ran it again")
            assert step not in undone_before or not [
                c for c in calls if c["tag"] == tag and c["tool"] == "h_cancel" and c["label"] == label
            ], where + f"the compensation of step {step} was journaled before {label}, which ran it again"
        effects = [c for c in mine if c["phase"] == "after" and c["detail"].startswith("ok")]
        if kind in NEVER_TWICE:  # 1
            rows = [e for e in emails if e["subject"].startswith(f"[{tag}] ")]
            reruns = history.resolutions(step).count(False)  # an operator said "it did not happen"
            assert len([c for c in mine if c["phase"] == "before"]) <= 1 + reruns, where + f"step {step} rerun"
            assert len(rows) == len(effects) <= 1, where + f"step {step}: {rows} vs {effects}"
            if outcome is not None and outcome.status == "succeeded" and outcome.result is None:
                assert outcome.error and outcome.error.startswith("resolved by an operator"), where + f"{outcome}"
                assert len(rows) == 1, where + f"step {step} was settled as done, but its emails are {rows}"
            elif outcome is not None and outcome.status == "succeeded":
                assert len(rows) == 1 and rows[0]["email_id"] == outcome.result["email_id"], (
                    where + f"step {step} succeeded, but its emails are {rows}")
            elif step not in doubts:
                assert not rows, where + f"step {step} has no succeeded outcome but sent {rows}"
        elif kind == "refund":  # 2 and 5
            rows = [r for r in refunds if r["idempotency_key"] == key]
            if outcome is not None:
                assert len(rows) == 1 and rows[0]["refund_id"] == outcome.result["refund_id"], (
                    where + f"step {step} succeeded, but the refunds with key {key} are {rows}")
                succeeded_refunds.add(rows[0]["refund_id"])
                cancelled = undo is not None and undo.status == "succeeded"
                assert rows[0]["status"] == ("cancelled" if cancelled else "issued"), where + f"{rows} {undo}"
                assert cancelled == (run.status == "failed"), where + f"step {step} compensation: {undo}"
            elif expect[step] == "maybe":  # in flight at a crash; it runs again (same key) once the doubt is settled
                assert len(rows) <= 1 and all(r["status"] == "issued" for r in rows), (
                    where + f"step {step} was in flight at a crash, and the refunds with key {key} are {rows}")
                maybe_refunds.update(r["refund_id"] for r in rows)
            else:
                assert not rows, where + f"step {step} never finished but refunded {rows}"
        undos = [r for r in state.steps if r.step_id == step and r.kind == "compensation" and r.phase == "outcome"]
        assert len([r for r in undos if r.status == "succeeded"]) <= 1, where + f"step {step} undone twice"
    # 5: nothing in the shop that the journal does not account for
    assert {r["refund_id"] for r in refunds} == succeeded_refunds | maybe_refunds, where + f"stray refunds {refunds}"
    tagged = {e["subject"].split("]")[0] + "]" for e in emails}
    assert tagged <= {f"[s{i}]" for i, k in enumerate(kinds, 1) if k in NEVER_TWICE}, where + f"{emails}"
    if run.status == "failed":  # 6: rolled back, the last step to finish first
        order = [r.step_id for r in state.steps if r.kind == "compensation" and r.phase == "intent"]
        firsts = list(dict.fromkeys(order))
        assert firsts == expected_compensation_order(state, firsts), (
            where + f"compensated in order {order}, forward outcomes journaled in order "
            f"{forward_completion_order(state)}")
        assert not [r for r in refunds if r["status"] == "issued"], where + f"refunds left {refunds}"
    # 7: the waves were in flight as the case says (the crash proved what it was meant to)
    timeouts = [c for c in calls if c["phase"] == "wave_timeout"]
    assert not timeouts, where + f"a wave wait timed out: {timeouts}"
    for crash in crashes if history.wave_wait is not None else ():
        for step in crash.launched:
            phases = [c["phase"] for c in calls if c["label"] == crash.label and c["tag"] == f"s{step}"
                      and c["tool"] == FORWARD_TOOL[kinds[step - 1]]]
            what = where + f"{crash.label} crashed at {crash.when}:{crash.step} in wave {crash.launched}: step {step} "
            assert "before" in phases, what + f"was not in flight ({phases})"
            if step == crash.step:
                continue
            if history.wave_wait == "before":
                assert "held" in phases and "after" not in phases, what + f"was not held before its effect ({phases})"
            elif history.wave_wait == "after":
                assert "after" in phases and "held" in phases, what + f"was not held after its effect ({phases})"
            elif history.wave_wait == "finished":
                assert "after" in phases and "held" not in phases, what + f"did not finish ({phases})"
    return state


def forward_completion_order(state: Any) -> list[int]:
    """Forward steps in the order their outcomes were journaled (the first that is not an
    operator's "it did not happen": that step ran again, and finished when it did)."""
    return list(dict.fromkeys(r.step_id for r in state.steps
                              if r.kind == "forward" and r.phase == "outcome" and r.status != "pending"))


def expected_compensation_order(state: Any, compensated: Sequence[int]) -> list[int]:
    """The order in which the steps ``compensated`` must have been compensated: the reverse of
    ``forward_completion_order``, a step with no outcome (a crash interrupted it: it finished
    last) first, by descending id. For a sequential run: descending step id."""
    finished = forward_completion_order(state)
    unfinished = sorted((s for s in compensated if s not in finished), reverse=True)
    return unfinished + [s for s in reversed(finished) if s in compensated]


async def assert_resume_changes_nothing(paths: Paths, run_id: str, setenv: Callable[[str, str], None]) -> None:
    """Resuming a finished or in-doubt run again, in this process, runs nothing and writes no step.

    ``setenv`` (e.g. ``monkeypatch.setenv``) points this process at the scenario's state.
    """
    for name, value in paths.env("in-process").items():
        if name.startswith(("AGENTKEEL_", "HARNESS_")):
            setenv(name, value)
    calls, shop, state = read_calls(paths), read_shop(paths), load_state(paths, run_id)
    async with build_system() as system:
        response = await system.resume(run_id)
        shown = system.show(run_id)
    assert response.status.value == state.run.status == shown.status.value
    assert read_calls(paths) == calls
    assert read_shop(paths) == shop
    assert load_state(paths, run_id).steps == state.steps
    if state.run.status == "failed":
        refunds = [s for s in shown.steps if s.tool_name == "h_refund"]
        assert all(s.status.value == "compensated" for s in refunds), shown.steps


if __name__ == "__main__":
    sys.exit(main())
