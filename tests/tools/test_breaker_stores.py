"""The breaker conformance suite against the in-process board and against Redis (a real
server on a loopback port), plus what only a shared store can show: replicas in separate
processes see one breaker, and exactly one probe passes among them; and what happens when
Redis cannot be reached."""

from __future__ import annotations

import asyncio
import multiprocessing
from collections.abc import AsyncIterator, Callable
from typing import Any

import pytest
from agentkeel.errors import CircuitOpenError
from agentkeel.testing.services import free_port
from agentkeel.tools.breaker import BreakerBoard, BreakerState, BreakerStore
from agentkeel.tools.breaker_redis import RedisBreakerStore

from tests.tools.breaker_conformance import BreakerStoreConformance


class TestBreakerBoard(BreakerStoreConformance):
    @pytest.fixture
    def make_store(self) -> Callable[..., BreakerStore]:
        return lambda **kwargs: BreakerBoard(**kwargs)


class TestRedisBreakerStore(BreakerStoreConformance):
    @pytest.fixture
    async def make_store(self, redis_url: str) -> AsyncIterator[Callable[..., BreakerStore]]:
        made: list[RedisBreakerStore] = []

        def make(**kwargs: Any) -> BreakerStore:
            made.append(RedisBreakerStore(redis_url, **kwargs))
            return made[-1]

        yield make
        for store in made:
            await store.aclose()

    async def test_two_replicas_share_one_breaker(self, make_store: Callable[..., BreakerStore]) -> None:
        a, b = make_store(failure_threshold=2, reset_after_s=5), make_store(failure_threshold=2, reset_after_s=5)
        token = await a.admit("t")
        await a.record_failure("t", token)
        token = await b.admit("t")
        await b.record_failure("t", token)  # two failures, on two replicas: open for both
        assert await a.state("t") is BreakerState.OPEN
        with pytest.raises(CircuitOpenError):
            await b.admit("t")


def _replica(url: str, barrier: Any, calls: int, results: Any) -> None:
    async def main() -> int:
        store = RedisBreakerStore(url, failure_threshold=1, reset_after_s=0.5)
        barrier.wait()

        async def one() -> int:
            try:
                token = await store.admit("flaky")
            except CircuitOpenError:
                return 0
            return 1 if token.probe else 0

        admitted = sum(await asyncio.gather(*(one() for _ in range(calls))))
        await store.aclose()
        return admitted

    results.put(asyncio.run(main()))


async def test_50_calls_on_3_replica_processes_let_exactly_one_probe_through(redis_url: str) -> None:
    opener = RedisBreakerStore(redis_url, failure_threshold=1, reset_after_s=0.5)
    token = await opener.admit("flaky")
    await opener.record_failure("flaky", token)  # open
    await asyncio.sleep(0.6)  # past the reset time: half-open for everyone
    context = multiprocessing.get_context("spawn")
    barrier = context.Barrier(3)
    results = context.Queue()
    calls = (17, 17, 16)
    processes = [context.Process(target=_replica, args=(redis_url, barrier, n, results)) for n in calls]
    for p in processes:
        p.start()
    for p in processes:
        p.join(60)
        assert p.exitcode == 0
    probes = [results.get(timeout=5) for _ in processes]
    assert sum(probes) == 1, probes
    assert await opener.state("flaky") is BreakerState.HALF_OPEN
    await opener.aclose()


async def test_unreachable_redis_refuses_by_default_and_allows_when_told() -> None:
    url = f"redis://127.0.0.1:{free_port()}/0"
    refusing = RedisBreakerStore(url)
    with pytest.raises(CircuitOpenError, match="cannot be reached"):
        await refusing.admit("t")
    allowing = RedisBreakerStore(url, fail_mode="allow")
    token = await allowing.admit("t")
    await allowing.record_success("t", token)  # nothing to record, nothing raised
    await refusing.aclose()
    await allowing.aclose()
    with pytest.raises(ValueError, match="fail_mode"):
        RedisBreakerStore(url, fail_mode="maybe")
