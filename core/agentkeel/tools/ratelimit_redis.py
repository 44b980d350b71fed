"""Rate limits shared by every replica, in Redis (``[shared] redis_url``).

One limit per tool (``ToolSpec.rate_limit``, calls per second), with the same promises
as the in-process ``TokenBucket``: a burst of ``max(1, rate * burst_s)`` calls after a
quiet period, then ``rate`` calls per second, first come first served; ``acquire``
waits for its turn, or raises ``RateLimitedError`` at once when the wait would exceed
its timeout; a waiter that is cancelled gives its turn back.

It is GCRA (the generic cell rate algorithm: a token bucket kept as one number, the
theoretical arrival time of the next call) in a Lua script, so taking a turn is one
atomic step on the Redis server for all replicas together, on the server's clock.
``acquire_key`` limits anything else by name (an API key, a model) the same way.

When Redis cannot be reached, ``fail_mode`` decides: ``"refuse"`` (the default: the
call is refused, naming the store, rather than overrun the limit) or ``"allow"``.
"""

from __future__ import annotations

import asyncio
import math
from typing import Any

from agentkeel.errors import RateLimitedError
from agentkeel.types import ToolSpec

# KEYS[1]: the limit's key. ARGV: interval (1/rate), tau (burst * interval), timeout (-1: none).
# Returns {1, wait} (the turn is taken; sleep wait seconds first) or {0, wait} (refused).
_TAKE = """
local t = redis.call('TIME')
local now = tonumber(t[1]) + tonumber(t[2]) / 1e6
local interval = tonumber(ARGV[1])
local tau = tonumber(ARGV[2])
local timeout = tonumber(ARGV[3])
local tat = tonumber(redis.call('GET', KEYS[1]) or '0')
if tat < now then tat = now end
local new_tat = tat + interval
local wait = new_tat - now - tau
if wait < 0 then wait = 0 end
if timeout >= 0 and wait > timeout then
  return {0, tostring(wait)}
end
redis.call('SET', KEYS[1], tostring(new_tat), 'PX', math.ceil((new_tat - now) * 1000) + 1000)
return {1, tostring(wait)}
"""

# Give a turn back (a cancelled waiter): the arrival time moves back by one interval.
_GIVE_BACK = """
local tat = tonumber(redis.call('GET', KEYS[1]) or '0')
if tat > 0 then
  local ttl = redis.call('PTTL', KEYS[1])
  if ttl < 1 then ttl = 1000 end
  redis.call('SET', KEYS[1], tostring(tat - tonumber(ARGV[1])), 'PX', ttl)
end
return 1
"""


class RedisRateLimitStore:
    """Rate limits of every tool, shared through one Redis (implements ``RateLimitStore``)."""

    def __init__(
        self,
        url: str,
        *,
        burst_s: float = 1.0,
        prefix: str = "agentkeel:rate:",
        fail_mode: str = "refuse",
        client: Any = None,
    ) -> None:
        if burst_s <= 0:
            raise ValueError("burst_s must be positive")
        if fail_mode not in ("refuse", "allow"):
            raise ValueError(f"fail_mode must be 'refuse' or 'allow', got {fail_mode!r}")
        import redis.asyncio as aioredis

        self.url = url
        self.burst_s = burst_s
        self.prefix = prefix
        self.fail_mode = fail_mode
        self._redis = client if client is not None else aioredis.Redis.from_url(
            url, socket_connect_timeout=2.0, socket_timeout=2.0, retry_on_timeout=False)
        self._take = self._redis.register_script(_TAKE)
        self._give_back = self._redis.register_script(_GIVE_BACK)

    async def acquire(self, tool: ToolSpec, timeout: float | None = None) -> None:
        if tool.rate_limit is None:
            return
        await self.acquire_key(f"tool:{tool.name}", tool.rate_limit, timeout, what=f"tool {tool.name!r}",
                               advice=f"raise [tools.{tool.name}] rate_limit")

    async def try_acquire(self, tool: ToolSpec) -> bool:
        try:
            await self.acquire(tool, 0.0)
        except RateLimitedError:
            return False
        return True

    async def acquire_key(self, name: str, rate_per_s: float, timeout: float | None = None, *,
                          what: str = "", advice: str = "retry later") -> None:
        """Take a turn of the limit ``name`` (``rate_per_s`` calls per second), waiting up to ``timeout``."""
        if rate_per_s <= 0 or not math.isfinite(rate_per_s):
            raise ValueError(f"rate_per_s must be a positive number, got {rate_per_s!r}")
        import redis

        interval = 1.0 / rate_per_s
        tau = max(1.0, rate_per_s * self.burst_s) * interval
        key = self.prefix + name
        label = what or repr(name)
        try:
            taken, wait = await self._take(keys=[key], args=[interval, tau, -1 if timeout is None else timeout])
        except (redis.ConnectionError, redis.TimeoutError, OSError) as exc:
            if self.fail_mode == "allow":
                return
            raise RateLimitedError(
                f"{label} is not called: the shared rate limit store (Redis) cannot be reached ({exc}); "
                "[shared] fail_mode = \"refuse\" refuses calls rather than overrun their limits",
                retryable=True, retry_after_s=1.0) from exc
        wait_s = float(wait)
        if not int(taken):
            raise RateLimitedError(
                f"{label} is rate limited to {rate_per_s:g} calls/s across all replicas: the next call could "
                f"start in {wait_s:.2f}s, longer than the {timeout:g}s allowed to wait; retry later or {advice}",
                retryable=True, retry_after_s=wait_s)
        if wait_s <= 0:
            return
        try:
            await asyncio.sleep(wait_s)
        except BaseException:
            try:
                await asyncio.shield(self._give_back(keys=[key], args=[interval]))
            except (redis.ConnectionError, redis.TimeoutError, OSError):
                pass  # the turn expires with the key
            raise

    async def aclose(self) -> None:
        await self._redis.aclose()
