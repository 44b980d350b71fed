"""Token counts with the tiers' real tokenizers (bpe-openai, offline), bytes otherwise."""

from __future__ import annotations

import json
from typing import Any

import pytest
from agentkeel import AgentRequest, Config, hookimpl
from agentkeel.cost.tokens import MostOf, encoding_for, known_tokenizer
from agentkeel.models.data import QUOTE_OVERHEAD_BYTES
from agentkeel.testing import make_system

from tests.memory.test_manager import Recorder


@pytest.mark.parametrize(("model", "encoding"), [
    ("gpt-4o", "o200k_base"), ("gpt-4o-mini-2024-07-18", "o200k_base"), ("openai/gpt-4.1", "o200k_base"),
    ("o3-mini", "o200k_base"), ("gpt-4", "cl100k_base"), ("gpt-3.5-turbo", "cl100k_base"),
    ("text-embedding-3-small", "cl100k_base"), ("llama-3.1-8b", None), ("qwen2.5", None), ("", None),
])
def test_encodings_of_models(model: str, encoding: str | None) -> None:
    assert encoding_for(model) == encoding


def test_real_counts_are_below_bytes_and_special_tokens_are_text() -> None:
    pytest.importorskip("bpe_openai")
    o200k, cl100k = known_tokenizer("gpt-4o"), known_tokenizer("gpt-4")
    assert o200k is not None and cl100k is not None and known_tokenizer("llama") is None
    text = "the quarterly report says revenue grew. " * 50
    assert 0 < o200k.count(text) < len(text) / 3
    assert o200k.count("<|endoftext|>") > 1  # never the special token: a user cannot smuggle one in
    both = MostOf([o200k, cl100k, o200k])
    assert both.name == "max(o200k_base, cl100k_base)"
    sample = "ünïcödé 😀 " * 20
    assert both.count(sample) == max(o200k.count(sample), cl100k.count(sample))


def _system(models: list[str], recorder: Recorder, *plugins: object) -> Any:
    tiers = [{"name": f"t{i}", "model": m, "max_tokens": 100} for i, m in enumerate(models)]
    return make_system(recorder, *plugins, config={
        "principals": {"ann": {"permissions": []}}, "models": {"tiers": tiers},
        "memory": {"context_tokens": 2000, "summary": "extractive"},
    })


async def _fill(system: Any) -> Any:
    async with system:
        for i in range(30):
            await system.run(AgentRequest(message=f"note {i}: the warehouse in Leeds ships on mondays",
                                          user_id="ann", session_id="s"))
        return await system.run(AgentRequest(message="and?", user_id="ann", session_id="s"))


async def test_the_context_is_counted_in_tokens_of_the_tiers_and_fits_more() -> None:
    pytest.importorskip("bpe_openai")
    by_tokens, by_bytes = Recorder(), Recorder()
    tokens = (await _fill(_system(["gpt-4o", "gpt-4"], by_tokens))).context
    counted_bytes = (await _fill(_system(["gpt-4o", "llama-3"], by_bytes))).context
    assert tokens.counter == "max(o200k_base, cl100k_base)" and counted_bytes.counter == "bytes"
    assert tokens.used_tokens <= 2000 and counted_bytes.used_tokens <= 2000
    # the same budget holds more turns when it is counted in tokens
    assert len(by_tokens.seen[-1].turns) > len(by_bytes.seen[-1].turns)
    # and the count is right: the lines memory sent, tokenised, are within the budget
    tokenizer = MostOf([t for t in (known_tokenizer("gpt-4o"), known_tokenizer("gpt-4")) if t is not None])
    lines = by_tokens.seen[-1].lines()
    sent = sum(tokenizer.count(json.dumps(line, ensure_ascii=True, separators=(",", ":"))) + 1 for line in lines)
    assert QUOTE_OVERHEAD_BYTES + sent <= 2000


class FixedTokenizer:
    name = "four-bytes"

    def count(self, text: str) -> int:
        return -(-len(text) // 4)


class TokenizerPlugin:
    @hookimpl
    def agentkeel_tokenizer(self, model: str, config: Config) -> Any:
        return FixedTokenizer() if model.startswith("llama") else None


async def test_a_plugin_supplies_the_tokenizer_of_its_models() -> None:
    recorder = Recorder()
    report = (await _fill(_system(["llama-3"], recorder, TokenizerPlugin()))).context
    assert report.counter == "four-bytes"
