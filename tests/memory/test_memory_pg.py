"""The memory store conformance suite against PostgreSQL (two stores on one database see
each other's writes), plus what only PostgreSQL has: the schema, forgetting really deleting
rows and index entries, NUL refusal, the BM25 scores the in-process store gives, and the
default memory plugin opening a ``PostgresMemoryStore`` when ``[store] url`` is set. Every
test gets a fresh, empty database (``pg_url``); without PostgreSQL they skip."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from pathlib import Path

import psycopg
import pytest
from agentkeel import pg
from agentkeel.config import Config
from agentkeel.errors import StoreError
from agentkeel.memory.assemble import MemorySettings
from agentkeel.memory.memory_store import InProcessMemoryStore
from agentkeel.memory.pg_store import NulTextError, PostgresMemoryStore
from agentkeel.memory.sqlite import SQLiteMemory, open_store
from agentkeel.memory.sqlite_store import SQLiteMemoryStore
from agentkeel.memory.store import MemoryStore, Summary
from agentkeel.types import AgentRequest, AgentResponse, RunStatus

from tests.memory.conformance import MemoryStoreConformance


class TestPostgres(MemoryStoreConformance):
    @pytest.fixture
    def store(self, pg_url: str) -> Iterator[MemoryStore]:
        store = PostgresMemoryStore(pg_url)
        opened = [store]

        def reopen() -> MemoryStore:
            opened.append(PostgresMemoryStore(pg_url))
            return opened[-1]

        self.reopen = reopen
        yield store
        for s in opened:
            s.close()


# --- PostgreSQL only --------------------------------------------------------------------


def test_the_schema_is_migrated_and_holds_the_memory(pg_url: str) -> None:
    store = PostgresMemoryStore(pg_url)
    try:
        store.save_exchange("ann", "s1", "r1", "q", "a", record="Mail ann@example.com about the_plan")
    finally:
        store.close()
    with psycopg.connect(pg_url) as conn:
        components = [r[0] for r in conn.execute("SELECT component FROM agentkeel_schema ORDER BY version")]
        assert components == [m.component for m in pg.PG_MIGRATIONS] and "memory" in components
        tables = {r[0] for r in conn.execute(
            "SELECT table_name FROM information_schema.tables WHERE table_schema = 'public'")}
        assert {"memory_turns", "memory_records", "memory_summaries", "memory_profile", "memory_vectors"} <= tables
        # the index holds the record's words, as the query's terms are made
        lexemes = conn.execute("SELECT tsv::text FROM memory_records").fetchone()
        assert lexemes is not None and "'example'" in lexemes[0] and "'ann'" in lexemes[0]
        indexes = {r[0] for r in conn.execute("SELECT indexname FROM pg_indexes WHERE tablename = 'memory_records'")}
        assert "memory_records_fts" in indexes


def test_words_inside_addresses_and_identifiers_are_found(pg_url: str) -> None:
    store = PostgresMemoryStore(pg_url)
    try:
        store.save_exchange("ann", "s1", "r1", "q", "a", record="write to ann@example.com, see https://x.org/docs")
        store.save_exchange("ann", "s1", "r2", "q", "a", record="the deploy_key is in the vault")
        assert [h.record.run_id for h in store.search("ann", "example", limit=5)] == ["r1"]
        assert [h.record.run_id for h in store.search("ann", "docs", limit=5)] == ["r1"]
        assert [h.record.run_id for h in store.search("ann", "deploy_key?", limit=5)] == ["r2"]
        assert store.search("ann", "deploy", limit=5) == []  # a word is the whole \w+ run, as in memory
    finally:
        store.close()


def test_scores_are_the_in_process_stores_bm25(pg_url: str) -> None:
    texts = ["lunch with the team on friday", "my locker code is 4417, locker near the gym",
             "the team meeting moved", "team team team", "nothing related at all"]
    ours, reference = PostgresMemoryStore(pg_url), InProcessMemoryStore()
    try:
        for i, text in enumerate(texts):
            for s in (ours, reference):
                s.save_exchange("ann", "s", f"r{i}", "q", "a", record=text)
        ours.save_exchange("bob", "s", "b", "q", "a", record="team team")  # another user's rows count for nothing
        for query in ("team", "which code opens my locker?", "the team friday", "absent"):
            got = [(h.record.run_id, round(h.score, 9)) for h in ours.search("ann", query, limit=10)]
            want = [(h.record.run_id, round(h.score, 9)) for h in reference.search("ann", query, limit=10)]
            assert got == want
    finally:
        ours.close()
        reference.close()


def test_terms_most_records_hold_are_left_out_unless_all_are(pg_url: str) -> None:
    store = PostgresMemoryStore(pg_url)
    try:
        store.save_exchange("ann", "s", "rare", "q", "a", record="common rare")
        with psycopg.connect(pg_url) as conn:  # 1,100 more records holding "common" (more than COMMON_MIN)
            conn.execute("INSERT INTO memory_records (user_id, session_id, run_id, text, ts, terms, length) "
                         "SELECT 'ann', 's', 'bulk' || n, 'common filler', 1.0, 'common filler', 2 "
                         "FROM generate_series(1, 1100) AS n")
        assert [h.record.run_id for h in store.search("ann", "common rare", limit=5)] == ["rare"]
        assert len(store.search("ann", "common filler", limit=5)) == 5  # all common: the rarest is kept
    finally:
        store.close()


def test_forget_really_deletes_rows_and_index_entries(pg_url: str) -> None:
    store = PostgresMemoryStore(pg_url)
    try:
        store.save_exchange("ann", "s1", "r1", "my passport is ZX123456", "ok", record="passport ZX123456")
        store.save_exchange("bob", "s1", "r2", "bob", "ok", record="bob ZX123456")
        pytest.importorskip("numpy")
        (rid,) = [r.id for r in store.records("ann")]
        assert store.save_vectors("ann", "m", {rid: [1.0, 0.0]}) == 1
        gone = store.forget("ann")
        assert (gone.turns, gone.records, gone.embeddings) == (2, 1, 1)
        store.vacuum()
    finally:
        store.close()
    with psycopg.connect(pg_url) as conn:
        assert conn.execute("SELECT count(*) FROM memory_turns WHERE content LIKE '%ZX123456%'").fetchone() == (0,)
        assert conn.execute("SELECT count(*) FROM memory_records WHERE user_id = 'ann'").fetchone() == (0,)
        assert conn.execute("SELECT count(*) FROM memory_vectors").fetchone() == (0,)
        assert conn.execute("SELECT count(*) FROM memory_records WHERE tsv @@ 'zx123456'::tsquery").fetchone() == (1,)


def test_nul_is_refused_on_write_and_finds_nothing_on_read(pg_url: str) -> None:
    store = PostgresMemoryStore(pg_url)
    try:
        with pytest.raises(NulTextError, match="message holds a NUL"):
            store.save_exchange("ann", "s1", "r1", "a\x00b", "ok", record="x")
        with pytest.raises(ValueError, match="value holds a NUL"):
            store.set_fact("ann", "k", "v\x00", run_id="r")
        with pytest.raises(StoreError, match="text holds a NUL"):
            store.save_summary(Summary("ann", "s1", "\x00", upto_turn_id=1))
        assert store.users() == []
        assert store.recent_turns("ann\x00", "s1", limit=5) == [] and store.records("a\x00") == []
        assert store.profile("a\x00") == [] and store.summary("a\x00", "s") is None
        assert store.delete_fact("a\x00", "k") is None and store.forget("a\x00").total == 0
        assert store.sessions("a\x00") == [] and store.search("a\x00", "x", limit=5) == []
    finally:
        store.close()


def test_closing_a_store_leaves_the_shared_pool_open(pg_url: str) -> None:
    one, two = PostgresMemoryStore(pg_url), PostgresMemoryStore(pg_url)
    one.save_exchange("ann", "s1", "r1", "q", "a")
    one.close()
    with pytest.raises(StoreError, match="closed"):
        one.users()
    try:
        assert two.users() == ["ann"]
    finally:
        two.close()


def test_an_unreachable_server_is_a_store_error_without_the_password() -> None:
    from agentkeel.testing.services import free_port

    with pytest.raises(StoreError) as info:
        PostgresMemoryStore(f"postgresql://agentkeel:s3cret@127.0.0.1:{free_port()}/nowhere")
    assert "s3cret" not in str(info.value)


# --- the default plugin ------------------------------------------------------------------


def test_open_store_picks_postgres_when_store_url_is_set(pg_url: str, tmp_path: Path) -> None:
    config = Config.from_dict({"home": str(tmp_path), "store": {"url": pg_url}})
    store = open_store(config, MemorySettings())
    try:
        assert isinstance(store, PostgresMemoryStore) and store.url == pg_url
    finally:
        store.close()
    # the URL wins over the memory backend, as the journal's does: replicas share memory
    store = open_store(Config.from_dict({"home": str(tmp_path), "store": {"url": pg_url}}),
                       MemorySettings(backend="memory"))
    try:
        assert isinstance(store, PostgresMemoryStore)
    finally:
        store.close()
    plain = open_store(Config.from_dict({"home": str(tmp_path)}), MemorySettings())
    try:
        assert isinstance(plain, SQLiteMemoryStore)
    finally:
        plain.close()


def test_the_default_plugin_keeps_memory_in_postgres(pg_url: str, tmp_path: Path) -> None:
    memory = SQLiteMemory()
    config = Config.from_dict({"home": str(tmp_path), "store": {"url": pg_url}})
    try:
        request = AgentRequest(message="my locker code is 4417", user_id="ann", session_id="s1")
        response = AgentResponse(run_id=request.run_id, status=RunStatus.SUCCEEDED, message="noted", plan=None)
        memory.agentkeel_save_turn(request, response, config)
        context = asyncio.run(memory.agentkeel_load_context(
            AgentRequest(message="what is my locker code?", user_id="ann", session_id="s1"), config))
        assert "4417" in str(context)
    finally:
        memory.close_connections()
    other = PostgresMemoryStore(pg_url)  # another replica sees it
    try:
        assert [t.content for t in other.recent_turns("ann", "s1", limit=5)] == ["noted", "my locker code is 4417"]
        assert [h.record.run_id for h in other.search("ann", "locker", limit=5)] == [request.run_id]
    finally:
        other.close()
    assert not (tmp_path / "agentkeel.db").exists()
