"""The default memory manager: profile, retrieved memories, a running summary and the
recent turns of a session, within ``[memory] context_tokens`` (``agentkeel.memory.assemble``).

Promises:

- ``agentkeel_load_context`` returns what ``assemble`` builds for the request from
  the store, with its report (``MemoryContext.report``: what was included,
  dropped or summarised, and why). Names of registered tools the principal may
  not call are withheld from it.
- ``agentkeel_save_turn`` stores the user's message and the assistant's turn of a
  finished run (one transaction), and, when it succeeded (or degraded), a
  retrievable record of it, as
  ``[memory] write`` says: "answers" keeps the answer, "facts" the compact,
  size-capped facts the steps returned (``agentkeel.facts``); ``write = []``
  stores nothing. A record is cut at ``max_record_bytes``.
- ``[memory] ttl_days`` (0: keep forever) deletes older rows of every user, at
  most once an hour, when memory is read.
- A user never sees another user's turns, records or profile, nor a session
  another session's turns.
- Memory never fails a request: when the store cannot be opened, read or
  written, a warning goes to the ``agentkeel.memory`` logger and the request runs
  with an empty context (defect 11 of the chapter's sketch).

The store (``[memory] backend``: "sqlite" in ``<home>/agentkeel.db``, or "memory",
which follows ``[journal] backend`` by default; with ``[store] url`` set, the shared
PostgreSQL database, ``agentkeel.memory.pg_store``) is opened lazily, one per home per
plugin instance (one instance per system), so the plugin follows
``$AGENTKEEL_HOME`` when it changes; ``agentkeel_shutdown`` closes them.
"""

from __future__ import annotations

import functools
import logging
import sqlite3
import threading
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, TypeVar

from agentkeel.config import Config
from agentkeel.context import RunContext
from agentkeel.cost.tokens import Tokenizer, known_tokenizer
from agentkeel.errors import ConfigError, StoreError, ToolError
from agentkeel.facts import facts
from agentkeel.markers import hookimpl
from agentkeel.memory.assemble import MemorySettings, assemble
from agentkeel.memory.embed import Embedder, OpenAIEmbedder
from agentkeel.memory.store import MemoryStore
from agentkeel.memory.store import check_fact as check_fact_args
from agentkeel.memory.summarise import LLMSummariser, summary_mode
from agentkeel.memory.vectors import numpy_module
from agentkeel.stores import db_path
from agentkeel.tools.decorator import tool
from agentkeel.types import AgentRequest, AgentResponse, MemoryContext, RunStatus

log = logging.getLogger("agentkeel.memory")

MAX_FACT_CHARS = 2000
EXPIRE_EVERY_S = 3600.0

_T = TypeVar("_T")


def assistant_turn(response: AgentResponse, write: tuple[str, ...] = ("answers", "facts")) -> str:
    """What memory keeps of a response: the answer, then the facts the steps returned."""
    text = (response.answer or response.message) if "answers" in write else response.status.value
    found = facts(response.steps, max_chars=MAX_FACT_CHARS) if "facts" in write else []
    return f"{text}\n(facts: {'; '.join(found)})" if found else text


def cut(text: str, max_bytes: int) -> str:
    """``text`` cut to at most ``max_bytes`` UTF-8 bytes, saying so."""
    data = text.encode()
    if len(data) <= max_bytes:
        return text
    note = f" [cut: {len(data)} bytes]"
    return data[: max(0, max_bytes - len(note))].decode(errors="ignore") + note


@functools.lru_cache(maxsize=64)
def _resolved(home: Path) -> Path:
    """``home`` as the key of its stores (resolved once per home, not per request)."""
    return Path(home).expanduser().resolve()


_SETTINGS: list[tuple[Config, MemorySettings]] = []  # the last config's (a Config never changes)


def settings_of(config: Config) -> MemorySettings:
    """``[memory]`` checked; a bad value warns and the defaults are used (memory never fails a request)."""
    last = _SETTINGS[0] if _SETTINGS else None
    if last is not None and last[0] is config:
        return last[1]
    try:
        settings = MemorySettings.from_config(config)
    except (ConfigError, TypeError, ValueError) as exc:
        log.warning("%s; using the defaults", exc)
        settings = MemorySettings()
    _SETTINGS[:] = [(config, settings)]
    return settings


def open_store(config: Config, settings: MemorySettings) -> MemoryStore:
    """The store ``settings.backend`` names for ``config.home``; with ``[store] url`` set, the
    shared ``PostgresMemoryStore`` on that database instead (as the journal follows it)."""
    from agentkeel.pg import store_url

    url = store_url(config)
    if url is not None:
        from agentkeel.memory.pg_store import PostgresMemoryStore

        return PostgresMemoryStore(url)
    if settings.backend == "memory":
        from agentkeel.memory.memory_store import InProcessMemoryStore

        return InProcessMemoryStore()
    from agentkeel.memory.sqlite_store import SQLiteMemoryStore

    return SQLiteMemoryStore(config.home)


class SQLiteMemory:
    """The default memory plugin; one per system, with its own stores."""

    def __init__(self) -> None:
        self._stores: dict[tuple[Path, str], MemoryStore] = {}
        self._expired_at: dict[tuple[Path, str], float] = {}
        self._summarisers: dict[int, tuple[Config, LLMSummariser]] = {}
        self._lock = threading.Lock()

    @hookimpl(trylast=True)
    def agentkeel_startup(self, config: Config) -> None:
        """Reject a bad ``[memory]`` before the first request rather than on every one."""
        settings = MemorySettings.from_config(config)
        if settings.embedding_model:
            numpy_module()  # semantic retrieval needs numpy: say so now, not on every request

    @hookimpl(trylast=True)
    def agentkeel_tokenizer(self, model: str) -> Tokenizer | None:
        """OpenAI's encodings, offline, when ``bpe-openai`` is installed."""
        return known_tokenizer(model)

    @hookimpl(trylast=True)
    def agentkeel_embedder(self, config: Config) -> Embedder | None:
        """The OpenAI-compatible embeddings API, for any ``[memory] embedding_model`` no
        other plugin serves."""
        model = settings_of(config).embedding_model
        if not model:
            return None
        numpy_module()
        return OpenAIEmbedder(config, model)

    @hookimpl(trylast=True)
    async def agentkeel_load_context(
        self, request: AgentRequest, config: Config, tools: Mapping[str, Any] | None = None,
        run: RunContext | None = None, embedder: Embedder | None = None, tokenizer: Tokenizer | None = None,
    ) -> MemoryContext:
        settings = settings_of(config)
        if settings.context_tokens == 0:
            return MemoryContext()
        withheld = set(run.tools) - set(tools) if run is not None and tools is not None else set()
        try:
            store = self._store(config, settings)
            self._expire(config, settings, store)
            lexical_only: tuple[str, ...] = ()
            if settings.embedding_model and embedder is None:
                lexical_only = (f"memory.embedding_model {settings.embedding_model!r} has no embedder "
                                f"(see the log); retrieval is lexical only",)
            return await assemble(store, request, settings, withheld_tools=withheld, warnings=lexical_only,
                                  embedder=embedder if settings.embedding_model else None, run=run,
                                  summarise=self._summariser(config), tokenizer=tokenizer)
        except (sqlite3.Error, StoreError, OSError) as exc:
            self._failed(config, settings, "load the context", exc)
            return MemoryContext()

    @hookimpl
    def agentkeel_save_turn(self, request: AgentRequest, response: AgentResponse, config: Config) -> None:
        settings = settings_of(config)
        if not settings.write:
            return
        answer = assistant_turn(response, settings.write)
        # a record is what the turn taught: a run that failed, was denied or refused taught nothing
        record = (cut(f"user: {request.message}\nassistant: {answer}", settings.max_record_bytes)
                  if response.status in (RunStatus.SUCCEEDED, RunStatus.DEGRADED) else None)

        def save(store: MemoryStore) -> bool:
            store.save_exchange(request.user_id, request.session_id, request.run_id, request.message, answer,
                                status=response.status.value, record=record)
            return True

        self._guarded(config, settings, "save the turn", save)

    @hookimpl
    def agentkeel_register_tools(self, register: Callable[[Any], None]) -> None:
        """``remember`` and its rollback ``forget_remembered``: profile facts of the caller,
        written by a plan like any other step (permission ``memory``)."""
        plugin = self

        @tool(permissions=["memory"], idempotent=True, rollback="forget_remembered")
        def remember(key: str, value: str, run: RunContext) -> dict[str, Any]:
            """Remember a durable fact about the user (name, preference, plan tier) for later sessions."""
            try:
                check_fact_args(key, value)
            except ValueError as exc:
                raise ToolError(str(exc), retryable=False) from exc
            previous = plugin.store(run.config).set_fact(run.request.user_id, key.strip(), value,
                                                         run_id=run.run_id)
            return {"key": key.strip(), "value": value, "had": previous is not None,
                    "previous": previous.value if previous is not None else ""}

        @tool(permissions=["memory"], idempotent=True)
        def forget_remembered(key: str, had: bool, previous: str, run: RunContext) -> dict[str, Any]:
            """Undo a remember: put the previous value back, or delete the fact if there was none."""
            store = plugin.store(run.config)
            if had:
                store.set_fact(run.request.user_id, key, previous, run_id=run.run_id)
            else:
                store.delete_fact(run.request.user_id, key)
            return {"key": key, "restored": had}

        register(remember)
        register(forget_remembered)

    @hookimpl
    def agentkeel_shutdown(self) -> None:
        self.close_connections()

    def _summariser(self, config: Config) -> LLMSummariser | None:
        """The model summariser when ``[memory] summary`` resolves to "llm" (one per config)."""
        if summary_mode(config) != "llm":
            return None
        with self._lock:
            cached = self._summarisers.get(id(config))
            if cached is None or cached[0] is not config:
                cached = self._summarisers[id(config)] = (config, LLMSummariser(config))
            return cached[1]

    def store(self, config: Config) -> MemoryStore:
        """The store for ``config`` (opened on first use); raises ``StoreError`` when it cannot be opened."""
        return self._store(config, settings_of(config))

    def close_connections(self) -> None:
        """Close every open store; the next hook call reopens lazily."""
        with self._lock:
            stores, self._stores = list(self._stores.values()), {}
        for store in stores:
            store.close()

    def _store(self, config: Config, settings: MemorySettings) -> MemoryStore:
        key = (_resolved(config.home), settings.backend)
        with self._lock:
            store = self._stores.get(key)
            if store is None:
                store = self._stores[key] = open_store(config, settings)
            return store

    def _expire(self, config: Config, settings: MemorySettings, store: MemoryStore) -> None:
        if settings.ttl_days <= 0:
            return
        key = (_resolved(config.home), settings.backend)
        now = time.time()
        if now - self._expired_at.get(key, 0.0) < EXPIRE_EVERY_S:
            return
        self._expired_at[key] = now
        gone = store.expire(now - settings.ttl_days * 86400)
        if gone.total:
            log.info("memory: ttl_days=%s expired %d row(s)", settings.ttl_days, gone.total)

    def _guarded(
        self, config: Config, settings: MemorySettings, what: str, action: Callable[[MemoryStore], _T]
    ) -> _T | None:
        """Run ``action`` on the store for ``config``; on a store failure warn and return None."""
        try:
            return action(self._store(config, settings))
        except (sqlite3.Error, StoreError, OSError) as exc:
            self._failed(config, settings, what, exc)
            return None

    def _failed(self, config: Config, settings: MemorySettings, what: str, exc: BaseException) -> None:
        key = (_resolved(config.home), settings.backend)
        with self._lock:
            broken = self._stores.pop(key, None)  # a broken file is reopened (and re-checked) next time
        if broken is not None:
            try:
                broken.close()
            except (sqlite3.Error, StoreError, OSError):
                pass
        try:
            from agentkeel.pg import redact, store_url

            url = store_url(config)
        except ConfigError:
            url = None
        if url is not None:
            log.warning("memory: could not %s in PostgreSQL at %s (%s: %s); the request goes on without memory.",
                        what, redact(url), type(exc).__name__, exc)
            return
        log.warning(
            "memory: could not %s in %s (%s: %s); the request goes on without memory. "
            "If the file is damaged, move it aside to start a fresh memory.",
            what,
            db_path(config.home),
            type(exc).__name__,
            exc,
        )
