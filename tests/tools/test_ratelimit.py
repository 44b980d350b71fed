"""Token buckets on a fake clock: burst, refill rate, waiting, timeouts, concurrency."""

from __future__ import annotations

import asyncio
import threading

import attrs
import pytest
from agentkeel import tool
from agentkeel.errors import RateLimitedError
from agentkeel.tools.decorator import spec_of
from agentkeel.tools.ratelimit import RateLimiterBoard, RateLimitStore, TokenBucket
from agentkeel.types import ToolSpec


class FakeTime:
    """A clock plus an asyncio sleep that advances it instead of waiting."""

    def __init__(self) -> None:
        self.now = 500.0
        self.slept: list[float] = []

    def clock(self) -> float:
        return self.now

    async def sleep(self, seconds: float) -> None:
        self.slept.append(seconds)
        self.now += seconds
        await asyncio.sleep(0)


@pytest.fixture
def fake() -> FakeTime:
    return FakeTime()


def bucket(fake: FakeTime, rate: float, burst: float) -> TokenBucket:
    return TokenBucket(rate, burst, name="search", clock=fake.clock, sleep=fake.sleep)


def test_burst_then_refill_at_rate(fake: FakeTime) -> None:
    b = bucket(fake, rate=2.0, burst=3)
    assert [b.try_acquire() for _ in range(4)] == [True, True, True, False]
    fake.now += 0.25
    assert not b.try_acquire()  # half a token
    fake.now += 0.25
    assert b.try_acquire()
    assert not b.try_acquire()


def test_refill_is_capped_at_burst(fake: FakeTime) -> None:
    b = bucket(fake, rate=4.0, burst=2)
    fake.now += 3600
    assert b.tokens == 2
    assert sum(b.try_acquire() for _ in range(10)) == 2


def test_sustained_rate_over_time(fake: FakeTime) -> None:
    b = bucket(fake, rate=4.0, burst=1)
    granted = 0
    for _ in range(640):  # 10 simulated seconds in 1/64 s steps (exact in binary), asking greedily
        fake.now += 1 / 64
        granted += b.try_acquire()
    assert granted == 40


async def test_acquire_returns_at_once_when_a_token_is_there(fake: FakeTime) -> None:
    b = bucket(fake, rate=1.0, burst=1)
    await b.acquire(timeout=0)
    assert fake.slept == []


async def test_acquire_waits_exactly_for_the_refill(fake: FakeTime) -> None:
    b = bucket(fake, rate=2.0, burst=1)
    assert b.try_acquire()
    await b.acquire(timeout=1.0)
    assert fake.slept == [0.5]


async def test_waiters_are_served_first_come_first_served(fake: FakeTime) -> None:
    waits: list[float] = []

    async def record(seconds: float) -> None:  # the clock stands still while they queue
        waits.append(seconds)

    b = TokenBucket(2.0, 1, clock=fake.clock, sleep=record)
    assert b.try_acquire()
    await asyncio.gather(*(b.acquire(timeout=10) for _ in range(3)))
    # Each reserved the next token in turn: they wait 0.5, 1.0 and 1.5 s.
    assert waits == [0.5, 1.0, 1.5]
    fake.now += 1.5
    assert b.tokens == 0.0
    assert not b.try_acquire()


async def test_acquire_refuses_when_the_wait_exceeds_the_timeout(fake: FakeTime) -> None:
    b = bucket(fake, rate=1.0, burst=1)
    assert b.try_acquire()
    with pytest.raises(RateLimitedError) as info:
        await b.acquire(timeout=0.5)
    assert fake.slept == []  # refused at once instead of sleeping in vain
    assert info.value.retryable is True
    assert info.value.retry_after_s == pytest.approx(1.0)  # type: ignore[attr-defined]
    assert "'search'" in str(info.value) and "rate_limit" in str(info.value)
    fake.now += 1.0
    assert b.try_acquire()  # the refused call took nothing


async def test_a_cancelled_waiter_gives_its_token_back(fake: FakeTime) -> None:
    blocked = asyncio.Event()

    async def never(seconds: float) -> None:
        blocked.set()
        await asyncio.Event().wait()

    b = TokenBucket(1.0, 1, clock=fake.clock, sleep=never)
    assert b.try_acquire()
    task = asyncio.create_task(b.acquire(timeout=5))
    await blocked.wait()
    assert b.tokens == -1.0
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert b.tokens == 0.0
    fake.now += 1.0
    assert b.try_acquire()


async def test_acquire_with_the_real_clock() -> None:
    b = TokenBucket(50.0, 1)
    for _ in range(3):
        await b.acquire(timeout=1.0)  # 2 waits of 20 ms


def test_threads_never_get_more_than_the_tokens_there_are(fake: FakeTime) -> None:
    b = bucket(fake, rate=1.0, burst=50)
    granted = [0] * 8
    barrier = threading.Barrier(8)

    def worker(i: int) -> None:
        barrier.wait()
        for _ in range(100):
            granted[i] += b.try_acquire()

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert sum(granted) == 50


def test_invalid_buckets_are_refused() -> None:
    with pytest.raises(ValueError):
        TokenBucket(0, 1)
    with pytest.raises(ValueError):
        TokenBucket(1, 0.5)
    with pytest.raises(ValueError):
        TokenBucket(float("inf"), 1)


@tool(allow_uncancellable=True)
def lookup(q: str) -> str:
    """Look something up."""
    return q


def limited(rate: float | None) -> ToolSpec:
    spec = spec_of(lookup)
    assert spec is not None
    return attrs.evolve(spec, rate_limit=rate)


async def test_board_limits_only_tools_with_a_rate_limit(fake: FakeTime) -> None:
    board = RateLimiterBoard(burst_s=1.0, clock=fake.clock, sleep=fake.sleep)
    assert isinstance(board, RateLimitStore)
    free = limited(None)
    assert board.bucket(free) is None
    assert all([await board.try_acquire(free) for _ in range(100)])

    two_per_s = limited(2.0)
    assert board.bucket(two_per_s) is board.bucket(two_per_s)
    assert [await board.try_acquire(two_per_s) for _ in range(3)] == [True, True, False]
    with pytest.raises(RateLimitedError):
        await board.acquire(two_per_s, timeout=0.1)
    await board.acquire(two_per_s, timeout=0.5)
    assert fake.slept == [0.5]


def test_board_burst_and_rate_changes(fake: FakeTime) -> None:
    board = RateLimiterBoard(burst_s=2.0, clock=fake.clock)
    slow = board.bucket(limited(0.25))
    assert slow is not None and slow.burst == 1.0  # never less than one call
    fast = board.bucket(limited(5.0))
    assert fast is not None and fast is not slow and fast.burst == 10.0
    assert board.try_acquire_now(limited(5.0))
