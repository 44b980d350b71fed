"""Circuit breaker: transitions on a fake clock, exactly one half-open probe under concurrency."""

from __future__ import annotations

import asyncio
import threading
import time

import pytest
from agentkeel.config import Config
from agentkeel.errors import CircuitOpenError, ToolError
from agentkeel.tools.breaker import Admission, BreakerBoard, BreakerState, BreakerStore, CircuitBreaker


class FakeClock:
    def __init__(self, now: float = 1000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


def open_breaker(breaker: CircuitBreaker) -> None:
    for _ in range(breaker.failure_threshold):
        breaker.record_failure(breaker.admit())
    assert breaker.state is BreakerState.OPEN


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture
def breaker(clock: FakeClock) -> CircuitBreaker:
    return CircuitBreaker("flaky", failure_threshold=3, reset_after_s=10.0, clock=clock)


def test_opens_after_threshold_consecutive_failures(breaker: CircuitBreaker) -> None:
    breaker.record_failure(breaker.admit())
    breaker.record_failure(breaker.admit())
    assert breaker.state is BreakerState.CLOSED
    breaker.record_failure(breaker.admit())
    assert breaker.state is BreakerState.OPEN


def test_success_resets_the_consecutive_count(breaker: CircuitBreaker) -> None:
    for _ in range(5):
        breaker.record_failure(breaker.admit())
        breaker.record_failure(breaker.admit())
        breaker.record_success(breaker.admit())
    assert breaker.state is BreakerState.CLOSED
    assert breaker.consecutive_failures == 0


def test_open_refuses_with_time_until_retry(breaker: CircuitBreaker, clock: FakeClock) -> None:
    open_breaker(breaker)
    clock.advance(4.0)
    with pytest.raises(CircuitOpenError) as info:
        breaker.admit()
    assert info.value.retry_after_s == pytest.approx(6.0)  # type: ignore[attr-defined]
    assert "'flaky'" in str(info.value) and "6.0s" in str(info.value)
    assert isinstance(info.value, ToolError) and info.value.retryable is False


def test_half_open_after_reset_then_probe_success_closes(breaker: CircuitBreaker, clock: FakeClock) -> None:
    open_breaker(breaker)
    clock.advance(10.0)
    assert breaker.state is BreakerState.HALF_OPEN
    probe = breaker.admit()
    assert probe.probe
    with pytest.raises(CircuitOpenError, match="probe in flight"):
        breaker.admit()
    breaker.record_success(probe)
    assert breaker.state is BreakerState.CLOSED
    assert not breaker.admit().probe


def test_probe_failure_reopens_for_another_period(breaker: CircuitBreaker, clock: FakeClock) -> None:
    open_breaker(breaker)
    clock.advance(10.0)
    breaker.record_failure(breaker.admit())
    assert breaker.state is BreakerState.OPEN
    clock.advance(9.9)
    with pytest.raises(CircuitOpenError):
        breaker.admit()
    clock.advance(0.1)
    assert breaker.admit().probe


def test_stale_outcomes_do_not_move_the_breaker(breaker: CircuitBreaker, clock: FakeClock) -> None:
    slow = breaker.admit()  # let in while closed, answers after the breaker opened
    open_breaker(breaker)
    breaker.record_success(slow)
    assert breaker.state is BreakerState.OPEN
    clock.advance(10.0)
    probe = breaker.admit()
    breaker.record_failure(slow)  # a stale failure must not re-open the half-open breaker
    assert breaker.state is BreakerState.HALF_OPEN
    breaker.record_success(probe)
    assert breaker.state is BreakerState.CLOSED


def test_released_probe_frees_the_slot(breaker: CircuitBreaker, clock: FakeClock) -> None:
    open_breaker(breaker)
    clock.advance(10.0)
    probe = breaker.admit()
    breaker.release(probe)  # e.g. the probing task was cancelled
    second = breaker.admit()
    assert second.probe
    breaker.record_success(probe)  # the released probe's answer no longer counts
    assert breaker.state is BreakerState.HALF_OPEN
    breaker.record_success(second)
    assert breaker.state is BreakerState.CLOSED


def test_abandoned_probe_expires(clock: FakeClock) -> None:
    breaker = CircuitBreaker("t", failure_threshold=1, reset_after_s=5.0, probe_timeout_s=2.0, clock=clock)
    breaker.record_failure(breaker.admit())
    clock.advance(5.0)
    lost = breaker.admit()
    clock.advance(1.9)
    with pytest.raises(CircuitOpenError):
        breaker.admit()
    clock.advance(0.1)
    replacement = breaker.admit()
    assert replacement.probe
    breaker.record_failure(lost)
    assert breaker.state is BreakerState.HALF_OPEN


def test_reset_forces_closed(breaker: CircuitBreaker) -> None:
    open_breaker(breaker)
    breaker.reset()
    assert breaker.state is BreakerState.CLOSED
    breaker.admit()


def test_invalid_settings_are_refused() -> None:
    with pytest.raises(ValueError):
        CircuitBreaker(failure_threshold=0)
    with pytest.raises(ValueError):
        CircuitBreaker(reset_after_s=0)


async def test_half_open_admits_exactly_one_of_50_tasks(breaker: CircuitBreaker, clock: FakeClock) -> None:
    open_breaker(breaker)
    clock.advance(10.0)
    start = asyncio.Event()
    everyone_tried = asyncio.Event()
    admitted: list[Admission] = []
    refused = 0

    async def caller() -> None:
        nonlocal refused
        await start.wait()
        try:
            token = breaker.admit()
        except CircuitOpenError:
            refused += 1
            token = None
        else:
            admitted.append(token)
        if len(admitted) + refused == 50:
            everyone_tried.set()
        if token is None:
            return
        await everyone_tried.wait()  # the probe stays in flight until every other task has arrived
        breaker.record_success(token)

    tasks = [asyncio.create_task(caller()) for _ in range(50)]
    await asyncio.sleep(0)
    start.set()
    await asyncio.gather(*tasks)
    assert len(admitted) == 1 and refused == 49
    assert breaker.state is BreakerState.CLOSED


def test_half_open_admits_exactly_one_of_8_threads(clock: FakeClock) -> None:
    breaker = CircuitBreaker("t", failure_threshold=1, reset_after_s=1.0, clock=clock)
    rounds = 200
    barrier = threading.Barrier(8)
    wins = [0] * rounds
    lock = threading.Lock()

    def worker() -> None:
        for round_no in range(rounds):
            barrier.wait()  # all 8 hit admit() together
            try:
                token = breaker.admit()
            except CircuitOpenError:
                token = None
            if token is not None:
                with lock:
                    wins[round_no] += 1
            barrier.wait()  # everyone has tried; the winner's probe fails, the breaker re-opens
            if token is not None:
                breaker.record_failure(token)
                clock.advance(1.0)
            barrier.wait()

    breaker.record_failure(breaker.admit())
    clock.advance(1.0)
    threads = [threading.Thread(target=worker) for _ in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=30)
    assert wins == [1] * rounds


def test_closed_breaker_counts_failures_from_threads() -> None:
    breaker = CircuitBreaker("t", failure_threshold=10_000)
    per_thread = 1000

    def worker() -> None:
        for _ in range(per_thread):
            breaker.record_failure(breaker.admit())

    threads = [threading.Thread(target=worker) for _ in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert breaker.consecutive_failures == 8 * per_thread


async def test_board_creates_one_breaker_per_tool_from_config(clock: FakeClock) -> None:
    config = Config.from_dict({"breaker": {"failure_threshold": 2, "reset_after_s": 7.5}})
    board = BreakerBoard.from_config(config, clock=clock)
    assert isinstance(board, BreakerStore)
    assert board.get("a") is board.get("a")
    assert board.get("a").failure_threshold == 2 and board.get("a").reset_after_s == 7.5
    for _ in range(2):
        await board.record_failure("a", await board.admit("a"))
    assert await board.state("a") is BreakerState.OPEN
    assert await board.state("b") is BreakerState.CLOSED  # one tool's failures do not trip another's
    with pytest.raises(CircuitOpenError):
        await board.admit("a")
    clock.advance(7.5)
    probe = await board.admit("a")
    await board.record_success("a", probe)
    assert board.snapshot() == {"a": BreakerState.CLOSED, "b": BreakerState.CLOSED}
    with pytest.raises(TypeError):
        await board.record_success("a", "not a token")


def test_hot_path_cost_is_printed() -> None:
    breaker = CircuitBreaker("t")
    n = 100_000
    started = time.perf_counter()
    for _ in range(n):
        breaker.record_success(breaker.admit())
    per_call_us = (time.perf_counter() - started) / n * 1e6
    print(f"\nbreaker admit+record_success: {per_call_us:.2f} us")
