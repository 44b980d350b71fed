"""The rate limit conformance suite against the in-process board and Redis (a real server on
a loopback port), plus: replicas in separate processes share one limit; Redis unreachable."""

from __future__ import annotations

import asyncio
import multiprocessing
import time
from collections.abc import AsyncIterator, Callable
from typing import Any

import pytest

from agentkeel.errors import RateLimitedError
from agentkeel.testing.services import free_port
from agentkeel.tools.ratelimit import RateLimiterBoard, RateLimitStore
from agentkeel.tools.ratelimit_redis import RedisRateLimitStore
from tests.tools.ratelimit_conformance import RateLimitStoreConformance, spec


class TestRateLimiterBoard(RateLimitStoreConformance):
    @pytest.fixture
    def make_store(self) -> Callable[..., RateLimitStore]:
        return lambda **kwargs: RateLimiterBoard(**kwargs)


class TestRedisRateLimitStore(RateLimitStoreConformance):
    @pytest.fixture
    async def make_store(self, redis_url: str) -> AsyncIterator[Callable[..., RateLimitStore]]:
        made: list[RedisRateLimitStore] = []

        def make(**kwargs: Any) -> RateLimitStore:
            made.append(RedisRateLimitStore(redis_url, **kwargs))
            return made[-1]

        yield make
        for store in made:
            await store.aclose()


def _replica(url: str, barrier: Any, results: Any) -> None:
    async def main() -> list[float]:
        store = RedisRateLimitStore(url, burst_s=0.1)
        tool = spec("shared", 20.0)
        barrier.wait()
        done: list[float] = []
        deadline = time.time() + 1.0
        while time.time() < deadline:
            try:
                await store.acquire(tool, timeout=0.2)
                done.append(time.time())
            except RateLimitedError:
                pass
        await store.aclose()
        return done

    results.put(asyncio.run(main()))


def test_three_replica_processes_share_one_limit(redis_url: str) -> None:
    context = multiprocessing.get_context("spawn")
    barrier = context.Barrier(3)
    results = context.Queue()
    processes = [context.Process(target=_replica, args=(redis_url, barrier, results)) for _ in range(3)]
    for p in processes:
        p.start()
    calls = sorted(t for _ in processes for t in results.get(timeout=60))
    for p in processes:
        p.join(30)
        assert p.exitcode == 0
    # 20 calls/s with a burst of 2, shared: over any one-second window at most 20 + 2 calls,
    # whatever the number of replicas (each alone would have made about as many).
    assert 15 <= len(calls) <= 24, len(calls)
    worst = max(sum(1 for t in calls if start <= t < start + 1.0) for start in calls)
    assert worst <= 22, worst


async def test_unreachable_redis_refuses_by_default_and_allows_when_told() -> None:
    url = f"redis://127.0.0.1:{free_port()}/0"
    refusing = RedisRateLimitStore(url)
    with pytest.raises(RateLimitedError, match="cannot be reached"):
        await refusing.acquire(spec(), timeout=1)
    allowing = RedisRateLimitStore(url, fail_mode="allow")
    await allowing.acquire(spec(), timeout=1)
    await refusing.aclose()
    await allowing.aclose()
