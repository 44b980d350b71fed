"""The tool router: the one place a tool is called, forward or compensating.

For each call attempt, in order: the budget reservation of the tool's price,
the rate limit, the breaker's admission, the journal intent (before the tool
can have any effect), the ``agentkeel_call_tool`` hook around the sandbox
backend, then settlement. Failures come back as ``CallFailure`` saying whether
trying again could help and whether the tool may have run.

This is on the per-step path benchmarked in ``bench/overhead.py``; keep it lean.
When no plugin wraps or replaces ``agentkeel_call_tool``, the sandbox is called
directly (the hook would only add dispatch).
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Coroutine, Mapping
from typing import TYPE_CHECKING, Any

from agentkeel.errors import SandboxError, ToolError, ToolTimeoutError
from agentkeel.journal.base import StepRecord
from agentkeel.markers import hookimpl
from agentkeel.sandbox.protocol import SandboxBackend, ToolCall
from agentkeel.tools.breaker import BreakerBoard, BreakerStore, CircuitBreaker
from agentkeel.tools.decorator import IDEMPOTENCY_KEY_ARG, RUN_ARG
from agentkeel.tools.ratelimit import RateLimitStore
from agentkeel.types import CostRecord, ToolSpec

if TYPE_CHECKING:
    from agentkeel.context import RunContext

CallHook = Callable[[ToolCall, SandboxBackend, "RunContext"], Awaitable[Any]]
WriteIntent = Callable[[StepRecord], None]


class CallFailure(Exception):
    """One call attempt failed. ``retryable``: could trying again help? ``sent``: did the
    call reach the sandbox (so the tool may have run)? ``timed_out``: it was sent and
    given up at its deadline, so whether (or when) it takes effect is unknown."""

    def __init__(self, message: str, *, retryable: bool, sent: bool, timed_out: bool = False) -> None:
        super().__init__(message)
        self.retryable = retryable
        self.sent = sent
        self.timed_out = timed_out


@hookimpl(trylast=True)
def agentkeel_call_tool(call: ToolCall, sandbox: SandboxBackend) -> Awaitable[Any]:
    """The default: run the call in its sandbox."""
    return sandbox.run(call)


def idempotency_key(run_id: str, step_id: int) -> str:
    return f"{run_id}:{step_id}"


class ToolRouter:
    """Calls tools for one system: its sandboxes, breakers and rate limits."""

    def __init__(
        self,
        sandboxes: Mapping[str, SandboxBackend],
        breakers: BreakerBoard,
        rate_limits: RateLimitStore,
        call_hook: CallHook | None = None,
        shared_breakers: BreakerStore | None = None,
    ) -> None:
        self.sandboxes = sandboxes
        self.breakers = breakers
        self.rate_limits = rate_limits
        self.call_hook = call_hook
        self.shared_breakers = shared_breakers
        """Breakers shared by replicas (Redis): used instead of ``breakers`` when set."""
        self._slots: dict[str, tuple[int, asyncio.Semaphore]] = {}

    async def call(
        self,
        run: RunContext,
        spec: ToolSpec,
        args: Mapping[str, Any],
        *,
        step_id: int,
        kind: str,
        attempt: int,
        intent: WriteIntent,
    ) -> Any:
        """Make one attempt; the tool's result, or ``CallFailure``.

        ``BudgetExceededError`` (the tool's price does not fit) and journal errors
        propagate: nothing was sent. ``intent`` journals the intent record. A tool
        with ``max_concurrency`` waits for a free slot first (shared by every run).
        """
        if spec.max_concurrency is None:
            return await self._call(run, spec, args, step_id=step_id, kind=kind, attempt=attempt, intent=intent)
        async with self._slot(spec.name, spec.max_concurrency):
            return await self._call(run, spec, args, step_id=step_id, kind=kind, attempt=attempt, intent=intent)

    def _slot(self, name: str, limit: int) -> asyncio.Semaphore:
        held = self._slots.get(name)
        if held is None or held[0] != limit:
            held = self._slots[name] = (limit, asyncio.Semaphore(limit))
        return held[1]

    async def _call(
        self,
        run: RunContext,
        spec: ToolSpec,
        args: Mapping[str, Any],
        *,
        step_id: int,
        kind: str,
        attempt: int,
        intent: WriteIntent,
    ) -> Any:
        key = idempotency_key(run.run_id, step_id)
        reservation = run.budget.reserve(spec.cost_usd, f"tool {spec.name}", purpose="tool",
                                         reason="tool") if spec.cost_usd else None
        shared = self.shared_breakers
        breaker: CircuitBreaker | _Shared = self.breakers.get(spec.name) if shared is None else _Shared(shared,
                                                                                                      spec.name)
        sent = False
        watched = breaker if run.observers is not None and isinstance(breaker, CircuitBreaker) else None
        before = watched.state if watched is not None else None
        try:
            if spec.rate_limit is not None:
                await self.rate_limits.acquire(spec, spec.timeout)
            token: Any = breaker.admit() if isinstance(breaker, CircuitBreaker) else await breaker.admit()
            try:
                intent(StepRecord(step_id, kind, "intent", spec.name, args, key))
            except BaseException:
                breaker.release(token)
                raise
            call_args = {**args, IDEMPOTENCY_KEY_ARG: key} if spec.accepts_key else args
            if spec.accepts_run:
                call_args = {**call_args, RUN_ARG: run}
            call = ToolCall(spec, call_args, spec.timeout, run.run_id, step_id, kind, attempt)
            sandbox = self.sandboxes[spec.isolation]
            sent = True
            try:
                if self.call_hook is None:
                    result = await sandbox.run(call)
                else:
                    result = await self.call_hook(call, sandbox, run)
            except ToolError as exc:
                # A refusal (bad input, business rule) means the tool is up; only transient failures count.
                if exc.retryable:
                    breaker.record_failure(token)
                else:
                    breaker.record_success(token)
                raise
            except Exception:
                breaker.record_failure(token)
                raise
            except BaseException:  # cancelled: the call proved nothing either way
                breaker.release(token)
                raise
            breaker.record_success(token)
        except (ToolError, SandboxError) as exc:
            self._settle(run, reservation, spec, step_id, sent)
            raise CallFailure(str(exc), retryable=isinstance(exc, ToolError) and exc.retryable, sent=sent,
                              timed_out=sent and isinstance(exc, ToolTimeoutError)) from exc
        except BaseException:
            self._settle(run, reservation, spec, step_id, sent)
            raise
        finally:
            if watched is not None and watched.state is not before:
                assert before is not None
                run.observe("breaker_state", tool=spec.name, previous=before.value, state=watched.state.value)
        self._settle(run, reservation, spec, step_id, True)
        if isinstance(breaker, _Shared):
            await breaker.flush()  # its outcome reaches the shared store before the step goes on
        return result

    @staticmethod
    def _settle(run: RunContext, reservation: Any, spec: ToolSpec, step_id: int, sent: bool) -> None:
        """A call that was sent may have been billed; one refused before sending was not."""
        if reservation is None:
            return
        if not sent:
            reservation.release()
            return
        record = CostRecord(kind="tool", cost_usd=spec.cost_usd, tool=spec.name, step_id=step_id, purpose="tool",
                            reason="tool")
        reservation.settle(spec.cost_usd, record)
        run.costs.append(record)


class _Shared:
    """A shared breaker store seen through the in-process breaker's synchronous calls: each
    outcome is sent to the store as a task (so the call path keeps its shape); ``flush``
    awaits them on the way out."""

    __slots__ = ("name", "pending", "store")

    def __init__(self, store: BreakerStore, name: str) -> None:
        self.store = store
        self.name = name
        self.pending: list[asyncio.Task[None]] = []

    async def admit(self) -> object:
        return await self.store.admit(self.name)

    def _send(self, coro: Coroutine[Any, Any, None]) -> None:
        self.pending.append(asyncio.ensure_future(coro))

    def release(self, token: object) -> None:
        self._send(self.store.release(self.name, token))

    def record_success(self, token: object) -> None:
        self._send(self.store.record_success(self.name, token))

    def record_failure(self, token: object) -> None:
        self._send(self.store.record_failure(self.name, token))

    async def flush(self) -> None:
        for task in self.pending:
            await task
