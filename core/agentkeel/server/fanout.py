"""Run events shared by every replica, in Redis streams (``[shared] redis_url``), so a client
connected to replica A can follow a run that replica B executes.

The replica serving a run appends each of its numbered events to the Redis stream
``agentkeel:events:<run id>`` (one publisher task per replica, so the stream holds the
events in their order); the stream expires ``ttl_s`` after its last event. Any replica
follows it with ``XREAD`` from the entry after the client's ``Last-Event-ID``: the event
numbers are the replica's own and travel in the entries, so a client that reconnects
to another replica misses nothing and sees nothing twice.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator
from typing import Any

from agentkeel.server.events import NumberedEvent

log = logging.getLogger("agentkeel.server")

FINAL = ("run_finished", "run_error")
MAX_EVENTS = 100_000


class RedisFanout:
    """Publish a replica's run events, follow any replica's (see the module docs)."""

    def __init__(self, url: str, *, prefix: str = "agentkeel:events:", ttl_s: int = 86400,
                 client: Any = None) -> None:
        import redis.asyncio as aioredis

        self.url = url
        self.prefix = prefix
        self.ttl_s = ttl_s
        self._redis = client if client is not None else aioredis.Redis.from_url(
            url, socket_connect_timeout=2.0, socket_timeout=None)
        self._queue: asyncio.Queue[tuple[str, NumberedEvent] | None] = asyncio.Queue()
        self._task: asyncio.Task[None] | None = None

    def _key(self, run_id: str) -> str:
        return self.prefix + run_id

    def publish(self, run_id: str, event: NumberedEvent) -> None:
        """Queue ``event`` of ``run_id`` for the stream (in order; never blocks the run)."""
        if self._task is None or self._task.done():
            self._task = asyncio.get_running_loop().create_task(self._publisher(), name="agentkeel-fanout")
        self._queue.put_nowait((run_id, event))

    async def _publisher(self) -> None:
        import redis

        while (item := await self._queue.get()) is not None:
            run_id, event = item
            key = self._key(run_id)
            try:
                async with self._redis.pipeline(transaction=True) as pipe:
                    if event.id == 1:  # a new attempt at the run (a resume): its stream starts afresh
                        pipe.delete(key)
                    pipe.xadd(key, {"id": event.id, "kind": event.kind, "body": event.body}, maxlen=MAX_EVENTS,
                              approximate=True)
                    pipe.expire(key, self.ttl_s)
                    await pipe.execute()
            except (redis.ConnectionError, redis.TimeoutError, OSError) as exc:
                # Followers on this replica still get every event; others miss this one until Redis is back.
                log.warning("could not publish event %d of run %s to Redis: %s", event.id, run_id, exc)

    async def flush(self) -> None:
        """Wait until every queued event is published (tests, shutdown)."""
        while not self._queue.empty() and self._task is not None and not self._task.done():
            await asyncio.sleep(0.01)

    async def ping(self) -> None:
        await self._redis.ping()

    async def exists(self, run_id: str) -> bool:
        return bool(await self._redis.exists(self._key(run_id)))

    async def follow(self, run_id: str, after: int = 0, heartbeat_s: float = 15.0
                     ) -> AsyncIterator[NumberedEvent | None]:
        """The run's events numbered above ``after``, then the new ones, until its final event;
        None after ``heartbeat_s`` without one."""
        key = self._key(run_id)
        cursor = "0-0"
        block_ms = max(1, int(heartbeat_s * 1000))
        while True:
            reply: Any = await self._redis.xread({key: cursor}, count=500, block=block_ms)
            if not reply:
                yield None
                continue
            for _stream, entries in reply:
                for entry_id, fields in entries:
                    cursor = entry_id.decode() if isinstance(entry_id, bytes) else str(entry_id)
                    number = int(fields[b"id"])
                    if number <= after:
                        continue
                    kind = fields[b"kind"].decode()
                    yield NumberedEvent(number, kind, fields[b"body"].decode())
                    if kind in FINAL:
                        return

    async def aclose(self) -> None:
        if self._task is not None and not self._task.done():
            await self.flush()
            self._queue.put_nowait(None)
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await asyncio.wait_for(self._task, 5)
        await self._redis.aclose()
