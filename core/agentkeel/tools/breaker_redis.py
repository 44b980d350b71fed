"""Circuit breakers shared by every replica, in Redis (``[shared] redis_url``).

The same state machine as ``agentkeel.tools.breaker.CircuitBreaker`` (closed → open after
``failure_threshold`` consecutive failures → half-open after ``reset_after_s``, with
exactly one probe → closed or open again), kept in one Redis hash per tool and moved
only by Lua scripts. A script runs atomically on the server, so the check and the
change of state are one step for all replicas together: after the reset time, of any
number of concurrent callers on any number of replicas, exactly one is admitted as the
probe. Time is the Redis server's (``TIME``), so replicas' clocks do not matter.

Tokens carry the breaker's generation, bumped on every change of state, so a late
answer from a call admitted before the breaker last changed (a slow call, an abandoned
probe) changes nothing. A probe whose replica died frees its slot after
``probe_timeout_s``.

When Redis cannot be reached, ``fail_mode`` decides: ``"refuse"`` (the default: the
call is refused with ``CircuitOpenError``, naming the store; nothing overruns a tool
that may be down) or ``"allow"`` (the call goes ahead, unprotected).
"""

from __future__ import annotations

from typing import Any

from agentkeel.errors import CircuitOpenError
from agentkeel.tools.breaker import BreakerState

FAIL_MODES = ("refuse", "allow")

# KEYS[1] the tool's hash. ARGV: threshold, reset_after_s, probe_timeout_s.
# Returns {admitted (1/0), generation, probe (1/0), wait_s (string), why}.
_ADMIT = """
local t = redis.call('TIME')
local now = tonumber(t[1]) + tonumber(t[2]) / 1e6
local reset = tonumber(ARGV[2])
local probe_timeout = tonumber(ARGV[3])
local h = redis.call('HMGET', KEYS[1], 'state', 'gen', 'opened_at', 'probe_since')
local state = h[1] or 'closed'
local gen = tonumber(h[2] or '0')
if state == 'closed' then
  return {1, gen, 0, '0', ''}
end
if state == 'open' then
  local wait = tonumber(h[3]) + reset - now
  if wait > 0 then
    return {0, gen, 0, tostring(wait), 'open'}
  end
  state = 'half_open'
  gen = gen + 1
  redis.call('HSET', KEYS[1], 'state', state, 'gen', gen)
  redis.call('HDEL', KEYS[1], 'probe_since')
  h[4] = false
end
local since = h[4] and tonumber(h[4]) or nil
if since ~= nil and now - since < probe_timeout then
  return {0, gen, 0, tostring(since + probe_timeout - now), 'half-open, probe in flight'}
end
gen = gen + 1
redis.call('HSET', KEYS[1], 'probe_since', tostring(now), 'gen', gen)
return {1, gen, 1, '0', ''}
"""

# ARGV: outcome ('success' | 'failure' | 'release'), generation, probe (1/0), threshold.
_RECORD = """
local h = redis.call('HMGET', KEYS[1], 'state', 'gen', 'failures')
local state = h[1] or 'closed'
local gen = tonumber(h[2] or '0')
if tonumber(ARGV[2]) ~= gen then
  return 0
end
local outcome = ARGV[1]
local probe = ARGV[3] == '1'
if outcome == 'release' then
  if probe and state == 'half_open' then
    redis.call('HDEL', KEYS[1], 'probe_since')
  end
  return 1
end
local t = redis.call('TIME')
local now = tonumber(t[1]) + tonumber(t[2]) / 1e6
if state == 'half_open' then
  if not probe then
    return 1
  end
  if outcome == 'success' then
    redis.call('HSET', KEYS[1], 'state', 'closed', 'failures', 0, 'gen', gen + 1)
  else
    redis.call('HSET', KEYS[1], 'state', 'open', 'opened_at', tostring(now), 'failures', 0, 'gen', gen + 1)
  end
  redis.call('HDEL', KEYS[1], 'probe_since')
  return 1
end
if outcome == 'success' then
  redis.call('HSET', KEYS[1], 'failures', 0)
  return 1
end
local failures = tonumber(h[3] or '0') + 1
if failures >= tonumber(ARGV[4]) then
  redis.call('HSET', KEYS[1], 'state', 'open', 'opened_at', tostring(now), 'failures', 0, 'gen', gen + 1)
  redis.call('HDEL', KEYS[1], 'probe_since')
else
  redis.call('HSET', KEYS[1], 'failures', failures)
end
return 1
"""

_STATE = """
local h = redis.call('HMGET', KEYS[1], 'state', 'opened_at')
local state = h[1] or 'closed'
if state == 'open' then
  local t = redis.call('TIME')
  local now = tonumber(t[1]) + tonumber(t[2]) / 1e6
  if now - tonumber(h[2]) >= tonumber(ARGV[1]) then
    return 'half_open'
  end
end
return state
"""


class RedisToken:
    """What ``admit`` returned: the generation it was admitted in, and whether it is the probe."""

    __slots__ = ("generation", "probe")

    def __init__(self, generation: int, probe: bool) -> None:
        self.generation = generation
        self.probe = probe

    def __repr__(self) -> str:
        return f"RedisToken(generation={self.generation}, probe={self.probe})"


_UNPROTECTED = RedisToken(-1, False)
"""The token of a call let through while Redis was unreachable (``fail_mode = "allow"``)."""


class RedisBreakerStore:
    """Breakers of every tool, shared through one Redis (implements ``BreakerStore``)."""

    def __init__(
        self,
        url: str,
        *,
        failure_threshold: int = 5,
        reset_after_s: float = 30.0,
        probe_timeout_s: float | None = None,
        prefix: str = "agentkeel:breaker:",
        fail_mode: str = "refuse",
        client: Any = None,
    ) -> None:
        if failure_threshold < 1:
            raise ValueError("failure_threshold must be at least 1")
        if reset_after_s <= 0:
            raise ValueError("reset_after_s must be positive")
        if fail_mode not in FAIL_MODES:
            raise ValueError(f"fail_mode must be one of {', '.join(FAIL_MODES)}, got {fail_mode!r}")
        import redis.asyncio as aioredis

        self.url = url
        self.failure_threshold = failure_threshold
        self.reset_after_s = reset_after_s
        self.probe_timeout_s = probe_timeout_s if probe_timeout_s is not None else reset_after_s
        self.prefix = prefix
        self.fail_mode = fail_mode
        self._redis = client if client is not None else aioredis.Redis.from_url(
            url, socket_connect_timeout=2.0, socket_timeout=2.0, retry_on_timeout=False)
        self._admit = self._redis.register_script(_ADMIT)
        self._record = self._redis.register_script(_RECORD)
        self._state = self._redis.register_script(_STATE)

    def _key(self, tool: str) -> str:
        return f"{self.prefix}{tool}"

    async def admit(self, tool: str) -> RedisToken:
        """Admit one call or raise ``CircuitOpenError`` (with ``retry_after_s``)."""
        import redis

        try:
            admitted, generation, probe, wait, why = await self._admit(
                keys=[self._key(tool)], args=[self.failure_threshold, self.reset_after_s, self.probe_timeout_s])
        except (redis.ConnectionError, redis.TimeoutError, OSError) as exc:
            if self.fail_mode == "allow":
                return _UNPROTECTED
            raise CircuitOpenError(
                f"tool {tool!r} is not called: the shared breaker store (Redis) cannot be reached ({exc}); "
                "[shared] fail_mode = \"refuse\" refuses calls rather than run them unprotected",
                retryable=False, retry_after_s=1.0) from exc
        if int(admitted):
            return RedisToken(int(generation), bool(int(probe)))
        wait_s = float(wait)
        reason = why.decode() if isinstance(why, bytes) else str(why)
        raise CircuitOpenError(
            f"tool {tool!r} is unavailable: its circuit breaker is {reason} after repeated failures; "
            f"retry in {wait_s:.1f}s or use a fallback tool", retryable=False, retry_after_s=wait_s)

    async def _outcome(self, tool: str, token: object, outcome: str) -> None:
        if not isinstance(token, RedisToken):
            raise TypeError(f"expected the RedisToken returned by admit(), got {token!r}")
        if token is _UNPROTECTED:
            return
        import redis

        try:
            await self._record(keys=[self._key(tool)],
                               args=[outcome, token.generation, 1 if token.probe else 0, self.failure_threshold])
        except (redis.ConnectionError, redis.TimeoutError, OSError):
            pass  # the outcome is lost with the store; a probe's slot frees itself after probe_timeout_s

    async def record_success(self, tool: str, token: object) -> None:
        await self._outcome(tool, token, "success")

    async def record_failure(self, tool: str, token: object) -> None:
        await self._outcome(tool, token, "failure")

    async def release(self, tool: str, token: object) -> None:
        await self._outcome(tool, token, "release")

    async def state(self, tool: str) -> BreakerState:
        raw = await self._state(keys=[self._key(tool)], args=[self.reset_after_s])
        return BreakerState(raw.decode() if isinstance(raw, bytes) else str(raw))

    async def reset(self, tool: str) -> None:
        """Force a tool's breaker closed (operator action)."""
        await self._redis.delete(self._key(tool))

    async def aclose(self) -> None:
        await self._redis.aclose()
