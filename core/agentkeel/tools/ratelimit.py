"""Per-tool rate limits: token buckets.

A ``TokenBucket(rate_per_s, burst)`` holds up to ``burst`` tokens and refills
at ``rate_per_s``; every call takes one. ``try_acquire`` answers at once.
``acquire(timeout)`` waits for a token, first come first served: a waiter
reserves its token when it arrives (the balance may go negative) and sleeps
until the refill covers it. If the wait would exceed ``timeout`` it raises
``RateLimitedError`` at once instead of sleeping in vain; a waiter that is
cancelled gives its token back.

Buckets are safe under concurrent asyncio tasks and threads. The clock and the
sleep are injectable so tests need no real time. ``RateLimiterBoard`` holds
one bucket per tool from ``ToolSpec.rate_limit`` (calls per second); the
``RateLimitStore`` protocol is what the tool router uses, so a store shared
between replicas (Redis) can replace it.
"""

from __future__ import annotations

import asyncio
import math
import threading
import time
from collections.abc import Awaitable, Callable
from typing import Protocol, runtime_checkable

from agentkeel.errors import RateLimitedError
from agentkeel.types import ToolSpec

Clock = Callable[[], float]
Sleep = Callable[[float], Awaitable[None]]


class TokenBucket:
    """A token bucket (see module docs). ``name`` only appears in error messages."""

    def __init__(
        self,
        rate_per_s: float,
        burst: float = 1.0,
        *,
        name: str = "",
        clock: Clock = time.monotonic,
        sleep: Sleep = asyncio.sleep,
    ) -> None:
        if rate_per_s <= 0 or not math.isfinite(rate_per_s):
            raise ValueError(f"rate_per_s must be a positive number, got {rate_per_s!r}")
        if burst < 1:
            raise ValueError(f"burst must be at least 1 (one call), got {burst!r}")
        self.rate_per_s = float(rate_per_s)
        self.burst = float(burst)
        self.name = name
        self._clock = clock
        self._sleep = sleep
        self._lock = threading.Lock()
        self._tokens = self.burst
        self._updated = clock()

    @property
    def tokens(self) -> float:
        """Tokens available now (negative while waiters hold reservations)."""
        with self._lock:
            self._refill()
            return self._tokens

    def try_acquire(self) -> bool:
        """Take a token if one is available now; never waits."""
        with self._lock:
            self._refill()
            if self._tokens >= 1.0:
                self._tokens -= 1.0
                return True
            return False

    async def acquire(self, timeout: float | None = None) -> None:
        """Take a token, waiting up to ``timeout`` seconds (None: as long as it takes).

        Raises ``RateLimitedError`` when no token can be had within ``timeout``.
        """
        with self._lock:
            self._refill()
            wait = (1.0 - self._tokens) / self.rate_per_s if self._tokens < 1.0 else 0.0
            if timeout is not None and wait > timeout:
                raise self._refusal(wait, timeout)
            self._tokens -= 1.0
        if wait <= 0:
            return
        try:
            await self._sleep(wait)
        except BaseException:
            self._give_back()
            raise

    def _give_back(self) -> None:
        with self._lock:
            self._refill()
            self._tokens = min(self.burst, self._tokens + 1.0)

    def _refill(self) -> None:
        now = self._clock()
        elapsed = now - self._updated
        if elapsed > 0:
            self._tokens = min(self.burst, self._tokens + elapsed * self.rate_per_s)
            self._updated = now

    def _refusal(self, wait: float, timeout: float) -> RateLimitedError:
        error = RateLimitedError(
            f"tool {self.name!r} is rate limited to {self.rate_per_s:g} calls/s: the next call could start "
            f"in {wait:.2f}s, longer than the {timeout:g}s allowed to wait; retry later or raise "
            f"[tools.{self.name or 'NAME'}] rate_limit",
            retryable=True,
            retry_after_s=wait,
        )
        return error


@runtime_checkable
class RateLimitStore(Protocol):
    """Where rate limits live: in-process (``RateLimiterBoard``) or shared between replicas."""

    async def acquire(self, tool: ToolSpec, timeout: float | None = None) -> None: ...

    async def try_acquire(self, tool: ToolSpec) -> bool: ...


class RateLimiterBoard:
    """One ``TokenBucket`` per tool with a ``rate_limit``; tools without one are never limited.

    ``burst_s`` sets the burst: a tool limited to ``r`` calls/s may make
    ``max(1, r * burst_s)`` calls at once after a quiet period. A tool whose
    ``rate_limit`` changes (a config override) gets a fresh bucket.
    """

    def __init__(self, *, burst_s: float = 1.0, clock: Clock = time.monotonic, sleep: Sleep = asyncio.sleep) -> None:
        if burst_s <= 0:
            raise ValueError("burst_s must be positive")
        self.burst_s = burst_s
        self._clock = clock
        self._sleep = sleep
        self._buckets: dict[str, TokenBucket] = {}
        self._lock = threading.Lock()

    def bucket(self, tool: ToolSpec) -> TokenBucket | None:
        """The tool's bucket, or None when it has no rate limit."""
        rate = tool.rate_limit
        if rate is None:
            return None
        bucket = self._buckets.get(tool.name)
        if bucket is not None and bucket.rate_per_s == rate:
            return bucket
        with self._lock:
            bucket = self._buckets.get(tool.name)
            if bucket is None or bucket.rate_per_s != rate:
                bucket = TokenBucket(
                    rate, max(1.0, rate * self.burst_s), name=tool.name, clock=self._clock, sleep=self._sleep
                )
                self._buckets[tool.name] = bucket
            return bucket

    def try_acquire_now(self, tool: ToolSpec) -> bool:
        """Synchronous ``try_acquire`` for callers that want to skip the coroutine."""
        bucket = self.bucket(tool)
        return bucket is None or bucket.try_acquire()

    async def try_acquire(self, tool: ToolSpec) -> bool:
        return self.try_acquire_now(tool)

    async def acquire(self, tool: ToolSpec, timeout: float | None = None) -> None:
        bucket = self.bucket(tool)
        if bucket is not None:
            await bucket.acquire(timeout)
