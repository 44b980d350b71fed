"""The ``RateLimitStore`` conformance suite: what every rate limit backend promises (the
in-process ``RateLimiterBoard`` and the Redis-shared ``RedisRateLimitStore``), in real time."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable

import pytest

from agentkeel.errors import RateLimitedError
from agentkeel.tools.ratelimit import RateLimitStore
from agentkeel.types import ToolSpec

Make = Callable[..., RateLimitStore]


def spec(name: str = "t", rate: float | None = 20.0) -> ToolSpec:
    return ToolSpec(name=name, description="", fn=lambda: None, args_schema={"type": "object"}, rate_limit=rate)


class RateLimitStoreConformance:
    """Subclasses provide ``make_store(burst_s=...)``."""

    async def test_a_burst_then_the_rate(self, make_store: Make) -> None:
        store = make_store(burst_s=0.1)  # burst max(1, 20 * 0.1) = 2
        tool = spec(rate=20.0)
        assert await store.try_acquire(tool) and await store.try_acquire(tool)
        assert not await store.try_acquire(tool)
        started = time.monotonic()
        for _ in range(4):
            await store.acquire(tool, timeout=5)
        took = time.monotonic() - started
        assert took >= 0.15, took  # 4 more calls at 20/s waited (about 0.2 s)

    async def test_a_wait_longer_than_the_timeout_is_refused_at_once(self, make_store: Make) -> None:
        store = make_store(burst_s=0.05)
        tool = spec(rate=2.0)
        await store.acquire(tool, timeout=0)
        started = time.monotonic()
        with pytest.raises(RateLimitedError) as info:
            await store.acquire(tool, timeout=0.1)
        assert time.monotonic() - started < 0.3  # refused, not after sleeping its 0.4 s wait
        assert 0.3 < info.value.retry_after_s <= 0.5
        assert info.value.retryable

    async def test_a_tool_without_a_limit_is_never_limited(self, make_store: Make) -> None:
        store = make_store()
        tool = spec(rate=None)
        assert all([await store.try_acquire(tool) for _ in range(100)])

    async def test_limits_are_per_tool(self, make_store: Make) -> None:
        store = make_store(burst_s=0.05)
        assert await store.try_acquire(spec("a", 1.0))
        assert not await store.try_acquire(spec("a", 1.0))
        assert await store.try_acquire(spec("b", 1.0))

    async def test_a_cancelled_waiter_gives_its_turn_back(self, make_store: Make) -> None:
        store = make_store(burst_s=0.05)
        tool = spec(rate=2.0)  # one call every 0.5 s
        await store.acquire(tool, timeout=0)
        waiter = asyncio.ensure_future(store.acquire(tool, timeout=5))  # waits ~0.5 s
        await asyncio.sleep(0.05)
        waiter.cancel()
        with pytest.raises(asyncio.CancelledError):
            await waiter
        started = time.monotonic()
        await store.acquire(tool, timeout=5)  # takes the cancelled waiter's turn, not the one after it
        assert time.monotonic() - started < 0.9  # the next free turn, not the one after it (~1 s)
