"""The default memory manager: recent conversation turns in ``<home>/agentkeel.db``.

Promises:

- ``agentkeel_load_context`` returns the last ``recent_turns`` messages (default
  10; ``[plugins.memory] recent_turns`` in the config, 0 turns memory off) of the
  request's (user_id, session_id), oldest first. A turn is one message, as in
  ``MemoryContext.turns``: ``{"role": "user" | "assistant", "content", "run_id"}``.
- ``agentkeel_save_turn`` stores the user's message and the assistant's turn of
  a finished run, with its run_id, status and timestamp, in one statement. The
  assistant's turn is the responder's answer followed by a compact, size-capped
  record of the facts the steps returned (``agentkeel.facts``), so a follow-up
  in the same session can use them (the status line when there is no answer).
- A user never sees another user's turns, nor a session another session's.
- Memory never fails a request: when the database cannot be opened, read or
  written, a warning goes to the ``agentkeel.memory`` logger and the request
  runs with an empty context (defect 11 of the chapter's sketch).

Connections are opened lazily, one per database path per plugin instance (one
instance per system), so the plugin follows ``$AGENTKEEL_HOME`` when it changes;
``agentkeel_shutdown`` closes them.
"""

from __future__ import annotations

import logging
import sqlite3
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

from agentkeel.config import Config
from agentkeel.errors import ConfigError, StoreError
from agentkeel.facts import facts
from agentkeel.markers import hookimpl
from agentkeel.stores import ConnectionCache, db_path
from agentkeel.types import AgentRequest, AgentResponse, MemoryContext

log = logging.getLogger("agentkeel.memory")

DEFAULT_RECENT_TURNS = 10
MAX_RECENT_TURNS = 10_000

_T = TypeVar("_T")

_SELECT_RECENT = """
    SELECT role, content, run_id FROM memory_turns
    WHERE user_id = ? AND session_id = ?
    ORDER BY id DESC LIMIT ?
"""
_INSERT_EXCHANGE = """
    INSERT INTO memory_turns (user_id, session_id, run_id, role, content, status, ts)
    VALUES (?, ?, ?, 'user', ?, ?, ?), (?, ?, ?, 'assistant', ?, ?, ?)
"""


MAX_FACT_CHARS = 2000


def assistant_turn(response: AgentResponse) -> str:
    """What memory keeps of a response: the answer, then the facts the steps returned."""
    text = response.answer or response.message
    found = facts(response.steps, max_chars=MAX_FACT_CHARS)
    return f"{text}\n(facts: {'; '.join(found)})" if found else text


def recent_turns(config: Config) -> int:
    """The configured number of turns to load; raises ``ConfigError`` when it is invalid."""
    value = config.section("plugins", "memory").get("recent_turns", DEFAULT_RECENT_TURNS)
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= MAX_RECENT_TURNS:
        raise ConfigError(
            f"invalid configuration in {config.source}: plugins.memory.recent_turns must be an "
            f"integer from 0 to {MAX_RECENT_TURNS}, got {value!r}"
        )
    return value


class SQLiteMemory:
    """The default memory plugin; one per system, with its own connections."""

    def __init__(self) -> None:
        self._connections = ConnectionCache()
        # The hooks run on the event loop thread, but nothing stops a host from calling
        # them from worker threads; one short lock keeps the connections safe.
        self._lock = threading.Lock()

    @hookimpl(trylast=True)
    def agentkeel_startup(self, config: Config) -> None:
        """Reject a bad ``recent_turns`` before the first request rather than on every one."""
        recent_turns(config)

    @hookimpl(trylast=True)
    def agentkeel_load_context(self, request: AgentRequest, config: Config) -> MemoryContext:
        try:
            limit = recent_turns(config)
        except ConfigError as exc:
            log.warning("%s; using %d", exc, DEFAULT_RECENT_TURNS)
            limit = DEFAULT_RECENT_TURNS
        if limit == 0:
            return MemoryContext()

        def load(conn: sqlite3.Connection) -> MemoryContext:
            rows = conn.execute(_SELECT_RECENT, (request.user_id, request.session_id, limit)).fetchall()
            return MemoryContext(
                turns=tuple(
                    {"role": role, "content": content, "run_id": run_id}
                    for role, content, run_id in reversed(rows)
                )
            )

        return self._guarded(config.home, "load the recent turns", load) or MemoryContext()

    @hookimpl
    def agentkeel_save_turn(self, request: AgentRequest, response: AgentResponse, config: Config) -> None:
        now = time.time()
        status = response.status.value
        content = assistant_turn(response)
        row_key = (request.user_id, request.session_id, request.run_id)

        def save(conn: sqlite3.Connection) -> bool:
            conn.execute(
                _INSERT_EXCHANGE,
                (*row_key, request.message, status, now, *row_key, content, status, now),
            )
            return True

        self._guarded(config.home, "save the turn", save)

    @hookimpl
    def agentkeel_shutdown(self) -> None:
        self.close_connections()

    def close_connections(self) -> None:
        """Close every cached connection; the next hook call reopens lazily."""
        with self._lock:
            self._connections.close_all()

    def _guarded(self, home: Path, what: str, action: Callable[[sqlite3.Connection], _T]) -> _T | None:
        """Run ``action`` on the connection for ``home``; on a store failure warn and return None."""
        try:
            with self._lock:
                return action(self._connections.get(home))
        except (sqlite3.Error, StoreError, OSError) as exc:
            with self._lock:
                self._connections.discard(home)  # a broken file is reopened (and re-checked) next time
            log.warning(
                "memory: could not %s in %s (%s: %s); the request goes on without memory. "
                "If the file is damaged, move it aside to start a fresh memory.",
                what,
                db_path(home),
                type(exc).__name__,
                exc,
            )
            return None
