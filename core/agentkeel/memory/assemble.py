"""Context assembly: what memory contributes to a prompt, within ``[memory] context_tokens``.

Order and shares of the budget ``B``:

1. the user's **profile** (at most ``profile_share`` of B; facts by key, each whole or not at all);
2. the **retrieved memories** most relevant to the message (records of the user's
   other turns, at most ``max_records``; at most ``memories_share`` of B, best
   first): lexically (BM25, score >= ``min_score``) and, with ``embedding_model``,
   semantically (cosine similarity of embeddings >= ``min_similarity``), the two
   rankings fused by reciprocal rank (RRF, k = 60) when both are on. Records not
   embedded yet (written before the model was set, or while the embedder was
   down) are embedded lazily, at most ``embed_backfill`` per request, in the same
   call as the message;
3. the session's **recent turns**, newest kept first, and the running **summary** of
   the older ones (at most ``summary_share`` of what is left), in what is left.

Nothing over the budget is sent. A turn that does not fit, and every turn older
than it, is folded into the session's running summary (extractive: the opening of
each turn, newest kept first when the summary is full), which is stored and
reused next time instead of the turns it covers (with ``[memory] summary`` "llm",
a model writes it: ``agentkeel.memory.summarise``). Every item is counted as the
data line it becomes in the prompt (ASCII JSON), in tokens of the tiers' models
when their tokenizers are known (``agentkeel_tokenizer``; the largest count of
them) and else in bytes (one token per byte at most), so the budget holds for
every model that reads the context.

Memory is data, not instructions: the context is quoted as untrusted data in the
prompt (``agentkeel.models.data.quote_memory``), and the names of registered
tools the principal may not call are withheld from it (replaced by
``[withheld tool]``), even when an earlier turn named them.
"""

from __future__ import annotations

import re
from collections.abc import Collection, Mapping
from typing import TYPE_CHECKING, Any

import attrs

from agentkeel.config import Config
from agentkeel.cost.tokens import Tokenizer
from agentkeel.errors import AgentkeelError, ConfigError, StoreError
from agentkeel.memory.embed import Embedder, embedding_model
from agentkeel.memory.store import Hit, MemoryStore, Summary, Turn
from agentkeel.models.data import QUOTE_OVERHEAD_BYTES, dumps_line
from agentkeel.types import AgentRequest, ContextItem, ContextReport, MemoryContext

if TYPE_CHECKING:
    from collections.abc import Awaitable, Callable, Sequence

    from agentkeel.context import RunContext

    Summariser = Callable[[str, Sequence[Turn], int, RunContext | None], Awaitable[str]]
    """(previous summary, turns to fold, at most this many characters, the run) -> the new summary."""

DEFAULT_CONTEXT_TOKENS = 2000
DEFAULT_RECENT_TURNS = 20
MAX_RECENT_TURNS = 10_000
WITHHELD = "[withheld tool]"
SUMMARY_LINE_CHARS = 240
"""How much of each folded turn the extractive summary keeps."""
RRF_K = 60
"""Reciprocal rank fusion's constant: a record at rank r of a ranking scores 1 / (RRF_K + r)."""
CANDIDATES = 4
"""Each ranking offers ``CANDIDATES`` times ``max_records`` records to the fusion."""


@attrs.frozen
class MemorySettings:
    """``[memory]`` of the configuration, checked. ``context_tokens`` 0 turns reading memory off."""

    context_tokens: int = DEFAULT_CONTEXT_TOKENS
    recent_turns: int = DEFAULT_RECENT_TURNS
    profile_share: float = 0.2
    memories_share: float = 0.3
    summary_share: float = 0.3
    max_records: int = 5
    min_score: float = 0.0
    write: tuple[str, ...] = ("answers", "facts")
    max_record_bytes: int = 4096
    ttl_days: float = 0.0
    backend: str = "sqlite"
    embedding_model: str = ""
    min_similarity: float = 0.3
    embed_backfill: int = 32

    @classmethod
    def from_config(cls, config: Config) -> MemorySettings:
        section = config.section("memory")
        legacy = config.section("plugins", "memory").get("recent_turns")
        if legacy is not None and (isinstance(legacy, bool) or not isinstance(legacy, int)
                                   or not 0 <= legacy <= MAX_RECENT_TURNS):
            raise ConfigError(
                f"invalid configuration in {config.source}: plugins.memory.recent_turns must be an "
                f"integer from 0 to {MAX_RECENT_TURNS}, got {legacy!r}"
            )
        turns = section.get("recent_turns", legacy if legacy is not None else DEFAULT_RECENT_TURNS)
        shares = {"profile_share": float(section.get("profile_share", 0.2)),
                  "memories_share": float(section.get("memories_share", 0.3))}
        if shares["profile_share"] + shares["memories_share"] > 1:
            raise ConfigError(
                f"invalid configuration in {config.source}: memory.profile_share + memory.memories_share "
                f"must be at most 1, got {shares['profile_share']} + {shares['memories_share']}"
            )
        tokens = section.get("context_tokens")
        if tokens is None:
            tokens = default_context_tokens(config)
        return cls(
            context_tokens=int(tokens) if turns else 0,
            recent_turns=int(turns),
            profile_share=shares["profile_share"],
            memories_share=shares["memories_share"],
            summary_share=float(section.get("summary_share", 0.3)),
            max_records=int(section.get("max_records", 5)),
            min_score=float(section.get("min_score", 0.0)),
            write=tuple(section.get("write", ("answers", "facts"))),
            max_record_bytes=int(section.get("max_record_bytes", 4096)),
            ttl_days=float(section.get("ttl_days", 0.0)),
            backend=str(section.get("backend", config.section("journal").get("backend", "sqlite"))),
            embedding_model=embedding_model(config),
            min_similarity=float(section.get("min_similarity", 0.3)),
            embed_backfill=int(section.get("embed_backfill", 32)),
        )


def default_context_tokens(config: Config) -> int:
    """Sized for the smallest configured tier: twice its ``max_tokens``, and never below
    ``DEFAULT_CONTEXT_TOKENS`` (a prompt's memory block needs room for a few turns)."""
    if not config.tiers:
        return DEFAULT_CONTEXT_TOKENS
    return max(DEFAULT_CONTEXT_TOKENS, 2 * min(t.max_tokens for t in config.tiers))


_COUNTS: dict[tuple[type, str, str], int] = {}
"""Token counts of recent lines, by tokenizer (its type and name) and text: the same turns are
measured again by every request of their session."""
_COUNTS_MAX = 4096
_COUNTED_CHARS_MAX = 8192  # longer texts are counted each time (the cache stays small)


def tokens(line: Mapping[str, Any], tokenizer: Tokenizer | None = None) -> int:
    """What one data line costs in a prompt: with ``tokenizer``, its tokens and the newline's;
    else, at most, its ASCII bytes and the newline. (Every encoding's pre-tokenizer splits at a
    newline, so the lines of a block cost what the block costs.)"""
    text = dumps_line(line)
    if tokenizer is None:
        return len(text) + 1
    if len(text) > _COUNTED_CHARS_MAX:
        return tokenizer.count(text) + 1
    key = (type(tokenizer), tokenizer.name, text)
    count = _COUNTS.get(key)
    if count is None:
        count = tokenizer.count(text)
        if len(_COUNTS) >= _COUNTS_MAX:
            _COUNTS.clear()
        _COUNTS[key] = count
    return count + 1


class _Redactor:
    """Replaces the names of tools the principal may not call (whole words) by ``WITHHELD``."""

    def __init__(self, withheld: Collection[str]) -> None:
        names = sorted((n for n in withheld if n), key=len, reverse=True)
        self._pattern = (re.compile(r"(?<![\w.])(?:" + "|".join(map(re.escape, names)) + r")(?![\w])")
                         if names else None)
        self.hits = 0

    def __call__(self, text: str) -> str:
        if self._pattern is None:
            return text
        out, n = self._pattern.subn(WITHHELD, text)
        self.hits += n
        return out


async def assemble(
    store: MemoryStore,
    request: AgentRequest,
    settings: MemorySettings,
    *,
    withheld_tools: Collection[str] = (),
    warnings: tuple[str, ...] = (),
    embedder: Embedder | None = None,
    run: RunContext | None = None,
    summarise: Summariser | None = None,
    tokenizer: Tokenizer | None = None,
) -> MemoryContext:
    """The context for ``request``: profile, retrieved memories, summary and recent turns
    within ``settings.context_tokens``, with the report of what went in and what did not.
    May write the session's summary (folding turns that no longer fit)."""
    budget = settings.context_tokens

    def measure(line: Mapping[str, Any]) -> int:
        return tokens(line, tokenizer)

    if budget <= 0:
        return MemoryContext(report=ContextReport(0, 0, warnings=warnings))
    redact = _Redactor(withheld_tools)
    room = budget - QUOTE_OVERHEAD_BYTES
    included: list[ContextItem] = []
    dropped: list[ContextItem] = []

    # 1. profile
    profile: list[tuple[str, str]] = []
    share = int(budget * settings.profile_share)
    used = measure({"profile": {}})
    for fact in store.profile(request.user_id):
        key, value = redact(fact.key), redact(fact.value)
        cost = measure({key: value})
        item = ContextItem("profile", f"profile:{fact.key}", cost)
        if used + cost <= share and used + cost <= room:
            used += cost
            profile.append((key, value))
            included.append(item)
        else:
            dropped.append(attrs.evolve(item, reason="over the profile's share"))
    room -= used if profile else 0

    # 3a. which turns are recent (retrieval leaves their runs out: they are in context already)
    summary = store.summary(request.user_id, request.session_id)
    after = summary.upto_turn_id if summary is not None else 0
    recent = store.recent_turns(request.user_id, request.session_id, limit=settings.recent_turns, after_id=after)

    # 2. retrieved memories
    memories: list[str] = []
    share = min(int(budget * settings.memories_share), room)
    spent = 0
    notes: tuple[str, ...] = ()
    if settings.max_records and share > 0:
        hits, below, notes = await retrieve(store, request, settings, {t.run_id for t in recent}, embedder, run)
        dropped += [ContextItem("memory", f"memory:{hit.record.id}", 0, score=hit.score, reason=why)
                    for hit, why in below]
        for hit in hits:
            item = ContextItem("memory", f"memory:{hit.record.id}", 0, score=hit.score)
            text = redact(hit.record.text)
            cost = measure({"memory": text})
            item = attrs.evolve(item, tokens=cost)
            if spent + cost <= share:
                spent += cost
                memories.append(text)
                included.append(item)
            else:
                dropped.append(attrs.evolve(item, reason="over the memories' share"))
    room -= spent

    # 3b. recent turns, newest first; what does not fit is folded into the summary
    summary_room = int(room * settings.summary_share) if (summary is not None or recent) else 0
    turn_room = room - summary_room
    kept: list[Turn] = []
    folded: list[Turn] = []
    spent = 0
    for turn in recent:  # newest first
        cost = measure({"role": turn.role, "content": redact(turn.content)})
        if not folded and spent + cost <= turn_room:
            spent += cost
            kept.append(turn)
        else:
            folded.append(turn)
    turn_room -= spent
    summary_text = ""
    summarised: list[ContextItem] = []
    if folded:
        summary, note = await fold(store, request, summary, folded, max_bytes=max(0, summary_room + turn_room),
                                   summarise=summarise, run=run, tokenizer=tokenizer)
        notes += (note,) if note else ()
        summarised = [ContextItem("turn", f"turn:{t.id}", measure({"role": t.role, "content": t.content}),
                                  reason="folded into the summary") for t in folded]
    if summary is not None and summary.text:
        text = redact(summary.text)
        cost = measure({"summary": text})
        item = ContextItem("summary", f"summary:{request.session_id}", cost)
        if cost <= summary_room + turn_room:
            summary_text = text
            included.append(item)
        else:
            dropped.append(attrs.evolve(item, reason="over the summary's share"))
    turns = tuple(
        {"role": t.role, "content": redact(t.content), "run_id": t.run_id} for t in reversed(kept)
    )
    included += [ContextItem("turn", f"turn:{t.id}", measure({"role": t.role, "content": t.content}))
                 for t in reversed(kept)]
    used_total = QUOTE_OVERHEAD_BYTES + sum(i.tokens for i in included) + (
        measure({"profile": {}}) if profile else 0)
    notes = warnings + notes + ((f"withheld {redact.hits} mention(s) of tools this principal may not call",)
                                if redact.hits else ())
    report = ContextReport(budget, min(used_total, budget) if included else 0,
                           tokenizer.name if tokenizer is not None else "bytes", tuple(included),
                           tuple(dropped), tuple(summarised), notes)
    return MemoryContext(turns=turns, profile=tuple(profile), summary=summary_text, memories=tuple(memories),
                         report=report)


async def retrieve(
    store: MemoryStore,
    request: AgentRequest,
    settings: MemorySettings,
    exclude_runs: set[str],
    embedder: Embedder | None,
    run: RunContext | None,
) -> tuple[list[Hit], list[tuple[Hit, str]], tuple[str, ...]]:
    """The records to offer, best first (at most ``max_records``), the hits left out for
    their score (with why), and notes for the report (semantic retrieval unavailable)."""
    wanted = settings.max_records
    offered = wanted * CANDIDATES if embedder is not None else wanted
    lexical = store.search(request.user_id, request.message, limit=offered, exclude_runs=exclude_runs)
    below = [(h, f"score below min_score {settings.min_score}") for h in lexical if h.score < settings.min_score]
    lexical = [h for h in lexical if h.score >= settings.min_score]
    if embedder is None:
        return lexical[:wanted], below, ()
    try:
        semantic = await _nearest(store, request, settings, exclude_runs, embedder, run, offered)
    except (AgentkeelError, ValueError, OSError) as exc:  # StoreError, EmbeddingError, budget errors
        if isinstance(exc, StoreError):
            raise
        return lexical[:wanted], below, (
            f"semantic retrieval unavailable ({type(exc).__name__}: {exc}); lexical only",)
    below += [(h, f"similarity below min_similarity {settings.min_similarity}") for h in semantic
              if h.score < settings.min_similarity and h.record.id not in {x.record.id for x in lexical}]
    semantic = [h for h in semantic if h.score >= settings.min_similarity]
    return fuse(lexical, semantic)[:wanted], below, ()


async def _nearest(
    store: MemoryStore, request: AgentRequest, settings: MemorySettings, exclude_runs: set[str],
    embedder: Embedder, run: RunContext | None, limit: int,
) -> list[Hit]:
    """Embed the message (and up to ``embed_backfill`` records without a vector, in the same
    call), store the records' vectors, and rank the user's records by similarity."""
    model = embedder.model
    missing = store.unembedded(request.user_id, model, limit=settings.embed_backfill)
    if not missing and not store.records(request.user_id, limit=1):
        return []  # nothing to find: the message is not embedded (nor billed)
    embedded = await embedder.embed([request.message, *(r.text for r in missing)], run)
    vectors = list(embedded.vectors)
    if len(vectors) != 1 + len(missing):
        raise ValueError(f"embedder {model!r} returned {len(vectors)} vectors for {1 + len(missing)} texts")
    if missing:
        store.save_vectors(request.user_id, model, {r.id: v for r, v in zip(missing, vectors[1:], strict=True)})
    return store.nearest(request.user_id, model, vectors[0], limit=limit, exclude_runs=exclude_runs)


def fuse(*rankings: list[Hit]) -> list[Hit]:
    """Reciprocal rank fusion: each record scores the sum over rankings of 1 / (RRF_K + rank),
    rank from 1; best first, ties to the newer record."""
    scores: dict[int, float] = {}
    records = {}
    for ranking in rankings:
        for rank, hit in enumerate(ranking, start=1):
            scores[hit.record.id] = scores.get(hit.record.id, 0.0) + 1.0 / (RRF_K + rank)
            records[hit.record.id] = hit.record
    order = sorted(scores, key=lambda rid: (-scores[rid], -rid))
    return [Hit(records[rid], scores[rid]) for rid in order]


async def fold(
    store: MemoryStore, request: AgentRequest, previous: Summary | None, turns: list[Turn], *, max_bytes: int,
    summarise: Summariser | None = None, run: RunContext | None = None, tokenizer: Tokenizer | None = None,
) -> tuple[Summary, str]:
    """The running summary with ``turns`` (newest first) folded in, and a note when the
    model's summary could not be had. With ``summarise``, a model writes it; otherwise (or
    when that fails) extractively: the previous summary's lines, then one line per turn
    (its opening), newest kept when over ``max_bytes``. Either way at most ``max_bytes``
    as a data line, and stored unless a newer summary is there already (then that one is used)."""
    note = ""
    text, source = "", "extractive"
    if summarise is not None and max_bytes > tokens({"summary": ""}):
        try:
            written = await summarise(previous.text if previous is not None else "", turns,
                                      max_bytes - tokens({"summary": ""}), run)
            text, source = _fit(written, max_bytes, tokenizer), "llm"
        except (AgentkeelError, ValueError) as exc:
            note = f"the model's summary could not be had ({type(exc).__name__}: {exc}); summarised extractively"
    if source == "extractive":
        lines = previous.text.splitlines() if previous is not None and previous.text else []
        lines += [_gist(t) for t in reversed(turns)]
        while lines and tokens({"summary": "\n".join(lines)}, tokenizer) > max_bytes:
            lines.pop(0)  # the oldest goes first
        text = "\n".join(lines)
    summary = Summary(request.user_id, request.session_id, text,
                      upto_turn_id=max(t.id for t in turns), run_id=request.run_id, source=source)
    if not store.save_summary(summary):
        newer = store.summary(request.user_id, request.session_id)
        if newer is not None:
            return newer, note
    return summary, note


def _fit(text: str, max_bytes: int, tokenizer: Tokenizer | None) -> str:
    """``text`` cut (at a word where it can) so that its data line is at most ``max_bytes``."""
    while text and tokens({"summary": text}, tokenizer) > max_bytes:
        over = tokens({"summary": text}, tokenizer) - max_bytes
        cut = text[: max(0, len(text) - max(over, 8))]
        text = cut.rsplit(" ", 1)[0] if " " in cut[-40:] else cut
    return text


def _gist(turn: Turn) -> str:
    """One line of the extractive summary: who said it and its first sentences, cut short."""
    text = " ".join(turn.content.split())
    if len(text) > SUMMARY_LINE_CHARS:
        text = text[: SUMMARY_LINE_CHARS - 3].rstrip() + "..."
    return f"{turn.role}: {text}"
