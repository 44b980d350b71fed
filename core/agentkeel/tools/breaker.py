"""Per-tool circuit breakers: stop calling a tool that keeps failing, then probe it.

A breaker is *closed* (calls pass) until ``failure_threshold`` consecutive
failures open it. While *open* every call is refused with ``CircuitOpenError``
saying when to retry. ``reset_after_s`` after opening it is *half-open* and
admits exactly one probe; everyone else is still refused. The probe's success
closes the breaker, its failure opens it again for another ``reset_after_s``.

Guarantees:

- Exactly one probe per half-open period, under concurrent asyncio tasks and
  threads alike (a ``threading.Lock`` guards the state; nothing awaits under it).
- Outcomes of calls admitted before the breaker last changed state are stale:
  a slow call that was let in while closed cannot close a breaker that has
  since opened, nor re-open a half-open one.
- A probe whose caller never reports back (it was cancelled, or crashed) does
  not wedge the breaker: its slot is freed by ``release`` or, failing that,
  after ``probe_timeout_s`` (default ``reset_after_s``).

``admit`` and ``record_*`` take a few microseconds; they are on the per-step hot
path. ``BreakerBoard`` holds one breaker per tool; the ``BreakerStore`` protocol
is what the tool router uses, so a store shared between replicas (Redis) can
replace the in-process board.
"""

from __future__ import annotations

import enum
import threading
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Protocol, runtime_checkable

from agentkeel.errors import CircuitOpenError

if TYPE_CHECKING:
    from agentkeel.config import Config

Clock = Callable[[], float]


class BreakerState(str, enum.Enum):
    CLOSED = "closed"
    OPEN = "open"
    HALF_OPEN = "half_open"


class Admission:
    """Proof that a call was admitted; hand it back to ``record_success``/``record_failure``."""

    __slots__ = ("generation", "probe")

    def __init__(self, generation: int, probe: bool) -> None:
        self.generation = generation
        self.probe = probe

    def __repr__(self) -> str:
        return f"Admission(generation={self.generation}, probe={self.probe})"


class CircuitBreaker:
    """One tool's breaker (see module docs). Thread-safe and asyncio-safe."""

    def __init__(
        self,
        name: str = "",
        *,
        failure_threshold: int = 5,
        reset_after_s: float = 30.0,
        probe_timeout_s: float | None = None,
        clock: Clock = time.monotonic,
    ) -> None:
        if failure_threshold < 1:
            raise ValueError("failure_threshold must be at least 1")
        if reset_after_s <= 0:
            raise ValueError("reset_after_s must be positive")
        self.name = name
        self.failure_threshold = failure_threshold
        self.reset_after_s = reset_after_s
        self.probe_timeout_s = probe_timeout_s if probe_timeout_s is not None else reset_after_s
        self._clock = clock
        self._lock = threading.Lock()
        self._state = BreakerState.CLOSED
        self._failures = 0
        self._generation = 0  # bumped on every state change; stale admissions are ignored
        self._opened_at = 0.0
        self._probe_since: float | None = None
        self._closed_token: Admission | None = Admission(0, False)
        """While closed: the admission of every call (read without the lock: one attribute read)."""

    @property
    def state(self) -> BreakerState:
        """The state now (an open breaker past ``reset_after_s`` reads as half-open)."""
        with self._lock:
            if self._state is BreakerState.OPEN and self._clock() - self._opened_at >= self.reset_after_s:
                return BreakerState.HALF_OPEN
            return self._state

    @property
    def consecutive_failures(self) -> int:
        return self._failures

    def admit(self) -> Admission:
        """Admit one call or raise ``CircuitOpenError`` (its ``retry_after_s`` says how long to wait)."""
        closed = self._closed_token
        if closed is not None:
            return closed
        with self._lock:
            state = self._state
            if state is BreakerState.CLOSED:
                return Admission(self._generation, False)
            now = self._clock()
            if state is BreakerState.OPEN:
                wait = self._opened_at + self.reset_after_s - now
                if wait > 0:
                    raise self._refusal(wait, "open")
                self._state = BreakerState.HALF_OPEN
                self._generation += 1
                self._probe_since = None
            if self._probe_since is not None and now - self._probe_since < self.probe_timeout_s:
                raise self._refusal(self._probe_since + self.probe_timeout_s - now, "half-open, probe in flight")
            self._probe_since = now
            self._generation += 1  # an abandoned probe's late answer no longer counts
            return Admission(self._generation, True)

    def record_success(self, token: Admission) -> None:
        """The admitted call succeeded: closes a half-open breaker, resets the failure count."""
        if token is self._closed_token and not self._failures:
            return  # closed, nothing counted: nothing to change
        with self._lock:
            if token.generation != self._generation:
                return
            if self._state is BreakerState.HALF_OPEN:
                if token.probe:
                    self._close()
                return
            self._failures = 0

    def record_failure(self, token: Admission) -> None:
        """The admitted call failed: counts toward opening; a failed probe re-opens."""
        with self._lock:
            if token.generation != self._generation:
                return
            if self._state is BreakerState.HALF_OPEN:
                if token.probe:
                    self._open()
                return
            self._failures += 1
            if self._failures >= self.failure_threshold:
                self._open()

    def release(self, token: Admission) -> None:
        """The admitted call ended without an outcome (cancelled): free the probe slot."""
        with self._lock:
            if token.probe and token.generation == self._generation and self._state is BreakerState.HALF_OPEN:
                self._probe_since = None

    def reset(self) -> None:
        """Force the breaker closed (operator action)."""
        with self._lock:
            self._close()

    def _open(self) -> None:
        self._closed_token = None
        self._state = BreakerState.OPEN
        self._opened_at = self._clock()
        self._failures = 0
        self._probe_since = None
        self._generation += 1

    def _close(self) -> None:
        self._state = BreakerState.CLOSED
        self._failures = 0
        self._probe_since = None
        self._generation += 1
        self._closed_token = Admission(self._generation, False)

    def _refusal(self, wait_s: float, why: str) -> CircuitOpenError:
        error = CircuitOpenError(
            f"tool {self.name!r} is unavailable: its circuit breaker is {why} after repeated failures; "
            f"retry in {wait_s:.1f}s or use a fallback tool",
            retryable=False,
            retry_after_s=wait_s,
        )
        return error


@runtime_checkable
class BreakerStore(Protocol):
    """Where breakers live: in-process (``BreakerBoard``) or shared between replicas.

    Tokens are opaque: pass what ``admit`` returned to exactly one of
    ``record_success``, ``record_failure`` or ``release``.
    """

    async def admit(self, tool: str) -> object: ...

    async def record_success(self, tool: str, token: object) -> None: ...

    async def record_failure(self, tool: str, token: object) -> None: ...

    async def release(self, tool: str, token: object) -> None: ...

    async def state(self, tool: str) -> BreakerState: ...


class BreakerBoard:
    """One in-process ``CircuitBreaker`` per tool name, created on first use.

    The async methods implement ``BreakerStore``; ``get`` gives synchronous
    access to a tool's breaker for callers that want to skip the coroutine.
    """

    def __init__(
        self,
        *,
        failure_threshold: int = 5,
        reset_after_s: float = 30.0,
        probe_timeout_s: float | None = None,
        clock: Clock = time.monotonic,
    ) -> None:
        self.failure_threshold = failure_threshold
        self.reset_after_s = reset_after_s
        self.probe_timeout_s = probe_timeout_s
        self._clock = clock
        self._breakers: dict[str, CircuitBreaker] = {}
        self._lock = threading.Lock()

    @classmethod
    def from_config(cls, config: Config, *, clock: Clock = time.monotonic) -> BreakerBoard:
        """Thresholds from ``[breaker]``: ``failure_threshold`` and ``reset_after_s``."""
        return cls(failure_threshold=config.failure_threshold, reset_after_s=config.reset_after_s, clock=clock)

    def get(self, tool: str) -> CircuitBreaker:
        breaker = self._breakers.get(tool)
        if breaker is not None:
            return breaker
        with self._lock:
            breaker = self._breakers.get(tool)
            if breaker is None:
                breaker = CircuitBreaker(
                    tool,
                    failure_threshold=self.failure_threshold,
                    reset_after_s=self.reset_after_s,
                    probe_timeout_s=self.probe_timeout_s,
                    clock=self._clock,
                )
                self._breakers[tool] = breaker
            return breaker

    def snapshot(self) -> dict[str, BreakerState]:
        """The state of every breaker created so far."""
        return {name: breaker.state for name, breaker in list(self._breakers.items())}

    async def admit(self, tool: str) -> Admission:
        return self.get(tool).admit()

    async def record_success(self, tool: str, token: object) -> None:
        self.get(tool).record_success(_admission(token))

    async def record_failure(self, tool: str, token: object) -> None:
        self.get(tool).record_failure(_admission(token))

    async def release(self, tool: str, token: object) -> None:
        self.get(tool).release(_admission(token))

    async def state(self, tool: str) -> BreakerState:
        return self.get(tool).state


def _admission(token: object) -> Admission:
    if not isinstance(token, Admission):
        raise TypeError(f"expected the Admission returned by admit(), got {token!r}")
    return token
