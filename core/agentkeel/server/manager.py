"""Runs in the background: admission, a bounded number in flight, events kept for
streaming, cancel, and draining on shutdown.

``RunManager.submit`` admits a request or refuses it with ``Overloaded`` (the
caller answers 429 with ``Retry-After``): at most ``max_inflight`` runs execute at
once and at most ``max_queue`` wait for a slot. Each admitted run is a ``LiveRun``
holding its numbered events; ``follow(after=N)`` yields every event after ``N``
and then the new ones as they happen, so a client that reconnects with
``Last-Event-ID`` misses nothing. Finished runs stay for ``retain`` more runs (a
client may still join their stream); after that their state is the journal's.

``drain`` is the graceful shutdown: no new runs are admitted, queued runs are
cancelled before they start (nothing of them ran), running runs are paused at
their next step boundary (they stay ``running`` in the journal, resumable), and
whatever still runs at the deadline is cancelled as after a crash (a step in
flight is then re-run by key or left in doubt, by the usual resume rules).
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
import math
import time
from collections.abc import AsyncIterator, Callable, Mapping
from typing import TYPE_CHECKING, Any

import attrs

from agentkeel.errors import AgentkeelError
from agentkeel.server.events import NumberedEvent, numbered
from agentkeel.types import AgentRequest, AgentResponse, Event

if TYPE_CHECKING:
    from agentkeel.runtime.system import AgentSystem

log = logging.getLogger("agentkeel.server")

Listener = Callable[["LiveRun", Event], None]


class Overloaded(Exception):
    """No slot and no room in the queue (or the server is draining): try again later."""

    def __init__(self, message: str, retry_after_s: int) -> None:
        super().__init__(message)
        self.retry_after_s = retry_after_s


@attrs.define(eq=False)
class LiveRun:
    """One run this replica serves or served recently: its events and its outcome."""

    run_id: str
    principal: str
    kind: str
    """``"run"``, ``"resume"``, ``"rollback"`` or ``"cancel"``: what the task does."""
    submitted_at: float = attrs.field(factory=time.time)
    state: str = "queued"
    """``queued`` (waiting for a slot), ``running``, ``finished``."""
    events: list[NumberedEvent] = attrs.field(factory=list)
    response: AgentResponse | None = None
    error: str | None = None
    exception: BaseException | None = attrs.field(default=None, repr=False)
    """What the task raised (a bug, a configuration error, a run held elsewhere), if anything."""
    task: asyncio.Task[None] | None = attrs.field(default=None, repr=False)
    _wake: asyncio.Event = attrs.field(factory=asyncio.Event, repr=False)
    _done: asyncio.Event = attrs.field(factory=asyncio.Event, repr=False)

    @property
    def finished(self) -> bool:
        return self._done.is_set()

    def append(self, event: Event) -> None:
        self.events.append(numbered(len(self.events) + 1, event))
        wake, self._wake = self._wake, asyncio.Event()
        wake.set()

    def finish(self) -> None:
        self._done.set()
        self._wake.set()

    async def wait(self) -> AgentResponse | None:
        await self._done.wait()
        return self.response

    async def follow(self, after: int = 0, heartbeat_s: float | None = None) -> AsyncIterator[NumberedEvent | None]:
        """Every event numbered above ``after``, then each new one, until the run finishes;
        None every ``heartbeat_s`` without an event (a stream's keep-alive)."""
        index = max(0, after)
        while True:
            while index < len(self.events):
                yield self.events[index]
                index += 1
            if self.finished:
                return
            try:
                await asyncio.wait_for(self._wake.wait(), heartbeat_s)
            except TimeoutError:
                yield None


@attrs.define
class RunManager:
    """Admits, runs and follows the requests of one replica (see the module docs)."""

    system: AgentSystem
    max_inflight: int = 8
    max_queue: int = 64
    retain: int = 1000
    listener: Listener | None = None
    """Called with every event of every run (the metrics)."""
    runs: collections.OrderedDict[str, LiveRun] = attrs.field(factory=collections.OrderedDict)
    draining: bool = False
    _slots: asyncio.Semaphore | None = None
    _durations: collections.deque[float] = attrs.field(factory=lambda: collections.deque(maxlen=50))
    _counts: dict[str, int] = attrs.field(factory=lambda: {"queued": 0, "running": 0, "finished": 0})
    _finished: collections.deque[LiveRun] = attrs.field(factory=collections.deque)
    """The finished runs still kept, oldest first."""

    def __attrs_post_init__(self) -> None:
        if self.max_inflight < 1:
            raise ValueError(f"[server] max_inflight must be at least 1, got {self.max_inflight}")
        if self.max_queue < 0:
            raise ValueError(f"[server] max_queue must not be negative, got {self.max_queue}")

    # --- counts ---------------------------------------------------------------------

    @property
    def queued(self) -> int:
        return self._counts["queued"]

    @property
    def inflight(self) -> int:
        return self._counts["running"]

    def _move(self, live: LiveRun, state: str) -> None:
        self._counts[live.state] -= 1
        live.state = state
        self._counts[state] += 1

    def retry_after_s(self) -> int:
        """A client's wait before trying again: the queue's length in typical run times."""
        typical = sorted(self._durations)[len(self._durations) // 2] if self._durations else 1.0
        waves = (self.queued + self.max_inflight) / self.max_inflight
        return max(1, min(60, math.ceil(typical * waves)))

    # --- admission ------------------------------------------------------------------

    def get(self, run_id: str) -> LiveRun | None:
        return self.runs.get(run_id)

    def submit(self, request: AgentRequest) -> LiveRun:
        """Admit a new request; ``Overloaded`` when there is no room."""
        return self._admit(request.run_id, request.user_id, "run",
                           lambda on_event: self.system.run(request, on_event=on_event))

    def submit_resume(self, run_id: str, principal: str, resolve: Mapping[int, bool] | None = None) -> LiveRun:
        return self._admit(run_id, principal, "resume",
                           lambda on_event: self.system.resume(run_id, resolve, on_event=on_event))

    def submit_rollback(self, run_id: str, principal: str) -> LiveRun:
        return self._admit(run_id, principal, "rollback", lambda _on_event: self.system.rollback(run_id))

    def submit_cancel(self, run_id: str, principal: str, reason: str) -> LiveRun:
        """Cancel a run no process is serving (the journal's: waiting, in doubt, abandoned)."""

        async def cancel(on_event: Callable[[Event], None]) -> AgentResponse:
            response = await self.system.cancel(run_id, by=principal, reason=reason, on_event=on_event)
            # None only for a run this system serves, which this task (admitted under the run's id) rules out
            return response if response is not None else self.system.show(run_id)

        return self._admit(run_id, principal, "cancel", cancel)

    def _admit(self, run_id: str, principal: str, kind: str,
               work: Callable[[Callable[[Event], None]], Any]) -> LiveRun:
        if self.draining:
            raise Overloaded("the server is shutting down and takes no new runs", 5)
        current = self.runs.get(run_id)
        if current is not None and not current.finished:
            raise RunBusy(f"run {run_id} is already being served here ({current.kind}, {current.state})")
        if self.inflight + self.queued >= self.max_inflight + self.max_queue:
            raise Overloaded(f"{self.inflight} runs in flight and {self.queued} queued, the most this server "
                             f"takes ([server] max_inflight = {self.max_inflight}, max_queue = "
                             f"{self.max_queue})", self.retry_after_s())
        if self._slots is None:
            self._slots = asyncio.Semaphore(self.max_inflight)
        live = LiveRun(run_id, principal, kind)
        self.runs[run_id] = live
        self.runs.move_to_end(run_id)
        self._counts["queued"] += 1
        live.task = asyncio.get_running_loop().create_task(self._drive(live, work), name=f"agentkeel-{kind}-{run_id}")
        return live

    async def _drive(self, live: LiveRun, work: Callable[[Callable[[Event], None]], Any]) -> None:
        assert self._slots is not None
        listener = self.listener

        def on_event(event: Event) -> None:
            live.append(event)
            if listener is not None:
                listener(live, event)

        try:
            async with self._slots:
                self._move(live, "running")
                started = time.perf_counter()
                live.response = await work(on_event)
                self._durations.append(time.perf_counter() - started)
        except asyncio.CancelledError:
            live.error = "the server stopped while the run was in flight; it can be resumed"
            raise
        except AgentkeelError as exc:  # the run is held elsewhere, unknown, or cannot be resumed
            live.error, live.exception = str(exc), exc
        except Exception as exc:  # a bug or a configuration error: logged, and the client hears of it
            live.error, live.exception = f"{type(exc).__name__}: {exc}", exc
            log.exception("run %s (%s) raised", live.run_id, live.kind)
        finally:
            if live.response is not None and (not live.events or live.events[-1].kind != "run_finished"):
                on_event(Event("run_finished", live.run_id, {"response": live.response}))
            elif live.response is None:
                on_event(Event("run_error", live.run_id, {"error": live.error or "the run did not finish"}))
            self._move(live, "finished")
            live.finish()
            self._forget_old(live)

    def _forget_old(self, live: LiveRun) -> None:
        """Keep the newest ``retain`` finished runs (a run served again is kept under its new task)."""
        self._finished.append(live)
        while len(self._finished) > self.retain:
            old = self._finished.popleft()
            if self.runs.get(old.run_id) is old:  # not replaced by a later task for the same run
                del self.runs[old.run_id]
                self._counts["finished"] -= 1

    # --- takeover ---------------------------------------------------------------------

    async def sweep(self) -> list[str]:
        """Take over runs nobody holds (a replica died, or paused them on its way out), as
        many as there is room for: each is resumed here by the usual rules (completed steps
        are not run again; an interrupted retry-safe step is re-run with its key; any other
        ends ``in_doubt``). Another replica taking one first is no error. The ids taken."""
        if self.draining:
            return []
        room = self.max_inflight + self.max_queue - self.inflight - self.queued
        if room <= 0:
            return []
        taken = []
        for record in self.system.journal.abandoned_runs(time.time(), limit=room):
            current = self.runs.get(record.run_id)
            if current is not None and not current.finished:
                continue
            try:
                self.submit_resume(record.run_id, record.user_id)
            except (Overloaded, RunBusy):
                break
            self.system.audit.record(run_id=record.run_id, principal=record.user_id, action="takeover", tool="",
                                     decision="allow", reason=f"nobody held the run (was {record.owner or 'released'})",
                                     arg_keys=())
            taken.append(record.run_id)
        if taken:
            self.system.stores.flush()
            log.info("took over %d abandoned runs: %s", len(taken), ", ".join(taken))
        return taken

    async def sweep_forever(self, interval_s: float) -> None:
        """``sweep`` every ``interval_s`` until the server drains."""
        while not self.draining:
            await asyncio.sleep(interval_s)
            try:
                await self.sweep()
            except Exception:  # a store hiccup: the next sweep tries again
                log.exception("the takeover sweep failed")

    # --- cancel and drain -------------------------------------------------------------

    def stop(self, run_id: str, reason: str) -> LiveRun | None:
        """Cancel a run this replica has admitted: a queued one never starts, a running one
        stops at its next step boundary. None when it is not (or no longer) served here."""
        live = self.runs.get(run_id)
        if live is None or live.finished or live.kind not in ("run", "resume"):
            return None
        self.system.request_stop(run_id, "cancel", reason, pending=True)
        return live

    async def drain(self, deadline_s: float) -> None:
        """Stop taking runs, pause the running ones at their next step, wait up to ``deadline_s``,
        then cancel what is left (see the module docs)."""
        self.draining = True
        for live in list(self.runs.values()):
            if live.finished:
                continue
            if live.state == "queued" and live.kind == "run":
                self.system.request_stop(live.run_id, "cancel", "the server shut down before the run started; "
                                         "submit it again", pending=True)
            else:
                self.system.request_stop(live.run_id, "pause", "the server is shutting down", pending=True)
        tasks = [r.task for r in self.runs.values() if r.task is not None and not r.task.done()]
        if not tasks:
            return
        _, pending = await asyncio.wait(tasks, timeout=max(0.0, deadline_s))
        for task in pending:
            task.cancel()
        for task in pending:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
        if pending:
            log.warning("%d runs were still in flight at the shutdown deadline and were interrupted; "
                        "`agentkeel resume` continues them", len(pending))


class RunBusy(Exception):  # answered with 409
    """The run is already being served by this replica."""
