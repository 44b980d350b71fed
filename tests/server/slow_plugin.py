"""A plugin for the service tests: tools that take a while and leave a trace, so a test
can cancel or stop a server in the middle of a run and see what ran and what was undone.

``slow_mark`` (takes the idempotency key, compensated by ``slow_undo``) appends
``do <key>`` to the file ``$SLOW_LOG`` after sleeping ``seconds``; ``slow_undo``
appends ``undo <key>``. The template ``slow N x S`` plans N such steps of S seconds.
``slow_email`` (not idempotent, no key: never run twice) appends ``email <tag>``; the
template ``email N x S as TAG`` plans N of them.
"""

from __future__ import annotations

import asyncio
import os
from pathlib import Path
from typing import Any

from agentkeel import tool
from agentkeel.markers import hookimpl
from agentkeel.planner.plan import PlanTemplate

LOG_ENV = "SLOW_LOG"


def _log(line: str) -> None:
    path = os.environ.get(LOG_ENV)
    if path:
        with Path(path).open("a", encoding="utf-8") as f:
            f.write(line + "\n")


@tool(permissions=["read"], idempotent=False, rollback="slow_undo", timeout=60.0)
async def slow_mark(tag: str, seconds: float, idempotency_key: str) -> dict[str, Any]:
    """Sleep ``seconds``, then record that step ``tag`` took effect."""
    await asyncio.sleep(seconds)
    _log(f"do {idempotency_key}")
    return {"tag": tag}


@tool(permissions=["read"], idempotent=True, timeout=10.0)
def slow_undo(tag: str, seconds: float = 0.0, idempotency_key: str | None = None) -> dict[str, Any]:
    """Undo ``slow_mark``: record it."""
    del seconds
    _log(f"undo {idempotency_key}")
    return {"undone": tag}


@tool(permissions=["read"], idempotent=False, timeout=60.0)
async def slow_email(tag: str, seconds: float) -> dict[str, Any]:
    """Sleep ``seconds``, then record an email that cannot be taken back (no key: never twice)."""
    await asyncio.sleep(seconds)
    _log(f"email {tag}")
    return {"sent": tag}


def _steps(n: int) -> tuple[dict[str, Any], ...]:
    return tuple({"tool_name": "slow_mark", "tool_args": {"tag": f"s{i}", "seconds": "{seconds}"},
                  "description": f"slow step {i}"} for i in range(1, n + 1))


@hookimpl
def agentkeel_register_tools(register: Any) -> None:
    register(slow_mark)
    register(slow_undo)
    register(slow_email)


@hookimpl
def agentkeel_register_plan_templates(register: Any) -> None:
    for n in (2, 3):
        steps = tuple({"tool_name": "slow_email", "tool_args": {"tag": "{tag}-" + str(i), "seconds": "{seconds}"},
                       "description": f"email {i}"} for i in range(1, n + 1))
        register(PlanTemplate(pattern=rf"email {n} x (?P<seconds>\d+(?:\.\d+)?) as (?P<tag>[a-z0-9]+)",
                              steps=steps, name=f"email:{n}", answer=f"Sent {n} emails."))
    for n in (1, 2, 3, 4, 6):
        register(PlanTemplate(pattern=rf"slow {n} x (?P<seconds>\d+(?:\.\d+)?)", steps=_steps(n),
                              name=f"slow:{n}", answer=f"Did {n} slow steps."))
