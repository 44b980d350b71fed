"""``[shared] redis_url``: two systems (replicas) share their tools' breakers through a real
Redis, so failures seen by one open the breaker for the other."""

from __future__ import annotations

from typing import Any

from agentkeel import AgentRequest, RunStatus, ToolError, hookimpl, tool
from agentkeel.testing import ScriptedPlanner, make_system


@tool(permissions=["read"], idempotent=True)
def flaky_service() -> dict[str, Any]:
    """Always down."""
    raise ToolError("the service is down", retryable=True)


class Tools:
    @hookimpl
    def agentkeel_register_tools(self, register: Any) -> None:
        register(flaky_service)


PLAN = {"reasoning": "call the service", "steps": [{"tool_name": "flaky_service", "tool_args": {}, "description": "call it"}]}


def _system(redis_url: str) -> Any:
    return make_system(Tools(), ScriptedPlanner(PLAN), principals={"u": ["read"]},
                       config={"shared": {"redis_url": redis_url}, "breaker": {"failure_threshold": 2,
                                                                               "reset_after_s": 60},
                               "retry": {"max_attempts": 1}, "recovery": {"max_replans": 0},
                               "journal": {"backend": "memory"}})


async def test_failures_on_one_replica_open_the_breaker_on_the_other(redis_url: str) -> None:
    async with _system(redis_url) as a, _system(redis_url) as b:
        for _ in range(2):
            failed = await a.run(AgentRequest(message="go", user_id="u"))
            assert failed.status is RunStatus.FAILED
            assert "the service is down" in (failed.steps[0].error or "")
        refused = await b.run(AgentRequest(message="go", user_id="u"))
        assert refused.status is RunStatus.FAILED
        assert "circuit breaker is open" in (refused.steps[0].error or "")
        assert b.breakers.snapshot() == {}  # the in-process board was not used
