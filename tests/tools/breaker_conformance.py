"""The ``BreakerStore`` conformance suite: what every breaker backend promises (the
in-process ``BreakerBoard`` and the Redis-shared ``RedisBreakerStore``). Real time, short
reset periods: the Redis backend runs on the Redis server's clock."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any

import pytest
from agentkeel.errors import CircuitOpenError
from agentkeel.tools.breaker import BreakerState, BreakerStore

RESET_S = 0.3
THRESHOLD = 3

Make = Callable[..., BreakerStore]


async def _fail(store: BreakerStore, tool: str, n: int) -> None:
    for _ in range(n):
        token = await store.admit(tool)
        await store.record_failure(tool, token)


async def _try_admit(store: BreakerStore, tool: str) -> Any:
    try:
        return await store.admit(tool)
    except CircuitOpenError:
        return None


class BreakerStoreConformance:
    """Subclasses provide ``make_store(failure_threshold=..., reset_after_s=..., probe_timeout_s=...)``."""

    async def test_closed_until_the_threshold_then_open(self, make_store: Make) -> None:
        store = make_store(failure_threshold=THRESHOLD, reset_after_s=RESET_S)
        await _fail(store, "t", THRESHOLD - 1)
        assert await store.state("t") is BreakerState.CLOSED
        ok = await store.admit("t")
        await store.record_success("t", ok)  # a success resets the count
        await _fail(store, "t", THRESHOLD - 1)
        assert await store.state("t") is BreakerState.CLOSED
        await _fail(store, "t", 1)
        assert await store.state("t") is BreakerState.OPEN
        with pytest.raises(CircuitOpenError) as info:
            await store.admit("t")
        assert 0 < info.value.retry_after_s <= RESET_S + 0.05
        assert await store.state("other") is BreakerState.CLOSED  # per tool

    async def test_exactly_one_probe_after_the_reset_time(self, make_store: Make) -> None:
        store = make_store(failure_threshold=1, reset_after_s=RESET_S)
        await _fail(store, "t", 1)
        await asyncio.sleep(RESET_S + 0.05)
        assert await store.state("t") is BreakerState.HALF_OPEN
        tokens = await asyncio.gather(*(_try_admit(store, "t") for _ in range(40)))
        admitted = [t for t in tokens if t is not None]
        assert len(admitted) == 1
        await store.record_success("t", admitted[0])
        assert await store.state("t") is BreakerState.CLOSED
        assert await _try_admit(store, "t") is not None

    async def test_a_failed_probe_opens_again(self, make_store: Make) -> None:
        store = make_store(failure_threshold=1, reset_after_s=RESET_S)
        await _fail(store, "t", 1)
        await asyncio.sleep(RESET_S + 0.05)
        probe = await store.admit("t")
        await store.record_failure("t", probe)
        assert await store.state("t") is BreakerState.OPEN
        assert await _try_admit(store, "t") is None

    async def test_a_stale_outcome_changes_nothing(self, make_store: Make) -> None:
        store = make_store(failure_threshold=2, reset_after_s=RESET_S)
        slow = await store.admit("t")  # admitted while closed
        await _fail(store, "t", 2)  # then the breaker opens
        await store.record_success("t", slow)  # the slow call's late success
        assert await store.state("t") is BreakerState.OPEN

    async def test_release_frees_the_probe_slot(self, make_store: Make) -> None:
        store = make_store(failure_threshold=1, reset_after_s=RESET_S)
        await _fail(store, "t", 1)
        await asyncio.sleep(RESET_S + 0.05)
        probe = await store.admit("t")
        assert await _try_admit(store, "t") is None
        await store.release("t", probe)  # cancelled: no outcome
        again = await _try_admit(store, "t")
        assert again is not None
        await store.record_success("t", again)
        assert await store.state("t") is BreakerState.CLOSED

    async def test_an_abandoned_probe_frees_its_slot_after_the_probe_timeout(self, make_store: Make) -> None:
        store = make_store(failure_threshold=1, reset_after_s=RESET_S, probe_timeout_s=0.2)
        await _fail(store, "t", 1)
        await asyncio.sleep(RESET_S + 0.05)
        abandoned = await store.admit("t")
        assert await _try_admit(store, "t") is None
        await asyncio.sleep(0.25)
        second = await _try_admit(store, "t")
        assert second is not None
        await store.record_success("t", abandoned)  # the abandoned probe's late answer no longer counts
        assert await store.state("t") is BreakerState.HALF_OPEN
        await store.record_success("t", second)
        assert await store.state("t") is BreakerState.CLOSED
