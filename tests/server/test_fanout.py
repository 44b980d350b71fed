"""Run events shared through Redis streams: what one replica publishes another follows, from
any event on (``Last-Event-ID``), in order, ending at the run's final event."""

from __future__ import annotations

import asyncio

from agentkeel.server.events import numbered
from agentkeel.server.fanout import RedisFanout
from agentkeel.types import Event


def _event(n: int, kind: str) -> Event:
    return Event(kind, "r1", {"n": n})


async def test_a_run_published_by_one_replica_is_followed_on_another(redis_url: str) -> None:
    a, b = RedisFanout(redis_url), RedisFanout(redis_url)
    kinds = ["run_started", "plan_ready", "step_started", "step_finished", "answer", "run_finished"]

    async def publish() -> None:
        for i, kind in enumerate(kinds, start=1):
            a.publish("r1", numbered(i, _event(i, kind)))
            await asyncio.sleep(0.02)

    publisher = asyncio.ensure_future(publish())
    await asyncio.sleep(0.03)  # the follower joins while the run goes on
    seen = [e async for e in b.follow("r1", 0, heartbeat_s=0.5) if e is not None]
    await publisher
    assert [e.id for e in seen] == [1, 2, 3, 4, 5, 6]
    assert [e.kind for e in seen] == kinds
    replay = [e async for e in b.follow("r1", 3, heartbeat_s=0.5) if e is not None]  # Last-Event-ID: 3
    assert [e.id for e in replay] == [4, 5, 6]
    assert replay[-1].body == numbered(6, _event(6, "run_finished")).body
    assert await b.exists("r1") and not await b.exists("r2")
    await a.aclose()
    await b.aclose()


async def test_a_new_attempt_starts_the_stream_afresh_and_quiet_streams_beat(redis_url: str) -> None:
    a, b = RedisFanout(redis_url), RedisFanout(redis_url)
    for i, kind in enumerate(["run_started", "run_finished"], start=1):
        a.publish("r1", numbered(i, _event(i, kind)))
    await a.flush()
    a.publish("r1", numbered(1, _event(1, "run_started")))  # a resume of the run
    await a.flush()
    follow = b.follow("r1", 0, heartbeat_s=0.2)
    first = await follow.__anext__()
    assert first is not None and first.kind == "run_started"
    assert await follow.__anext__() is None  # nothing new for 0.2 s: a keep-alive
    a.publish("r1", numbered(2, _event(2, "run_finished")))
    last = await follow.__anext__()
    assert last is not None and (last.id, last.kind) == (2, "run_finished")
    await a.aclose()
    await b.aclose()
