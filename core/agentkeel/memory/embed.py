"""Embedders: text to vectors, for semantic retrieval of memory records.

An ``Embedder`` turns texts into vectors of one vector space, named by its
``model`` (vectors of different models are never compared: the store keeps each
vector with the model that made it). ``[memory] embedding_model`` chooses the
model; ``agentkeel_embedder(config)`` (firstresult) builds the embedder for it:
a plugin that serves a model locally answers for that model name, and the
default (``trylast``) embeds through the OpenAI-compatible embeddings API of
the configured endpoint (``[models] base_url``, ``$OPENAI_BASE_URL``), priced
and reserved against the run's budget like any LLM call (``purpose`` "embed").

An embedder raises ``EmbeddingError`` (or the budget's errors) when it cannot
embed; the memory manager then retrieves lexically only and says so in the
context report. It never downloads a model at run time.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable

import attrs

from agentkeel.cost.budget import prompt_token_upper_bound
from agentkeel.errors import AgentkeelError, ConfigError
from agentkeel.types import Usage

if TYPE_CHECKING:
    import openai

    from agentkeel.config import Config
    from agentkeel.context import RunContext
    from agentkeel.cost.budget import Reservation

__all__ = ["Embedder", "EmbeddingError", "Embeddings", "OpenAIEmbedder", "embedding_model"]

log = logging.getLogger("agentkeel.memory")

MAX_BATCH = 64
"""At most this many texts go in one embeddings request."""


class EmbeddingError(AgentkeelError):
    """Texts could not be embedded (the message says why)."""


@attrs.frozen
class Embeddings:
    """What one ``embed`` call returned: one vector per text, in order, all of one length."""

    vectors: Sequence[Sequence[float]]
    input_tokens: int = 0


@runtime_checkable
class Embedder(Protocol):
    """Turns texts into vectors of the space named ``model``."""

    @property
    def model(self) -> str:
        """The vector space's name (stored with every vector it makes)."""
        ...

    async def embed(self, texts: Sequence[str], run: RunContext | None) -> Embeddings:
        """One vector per text. ``run`` (when given) is the run whose budget a priced
        embedder reserves from; None when no run is being served."""
        ...


def embedding_model(config: Config) -> str:
    """``[memory] embedding_model`` ("" when semantic retrieval is off); ``ConfigError`` naming it."""
    model = config.section("memory").get("embedding_model", "")
    if not isinstance(model, str) or len(model) > 200 or (model and not model.strip()):
        raise ConfigError(
            f"invalid configuration in {config.source}: memory.embedding_model must be a model name "
            f"(a non-empty string of at most 200 characters) or absent, got {model!r}"
        )
    return model.strip()


class OpenAIEmbedder:
    """Embeds through ``/v1/embeddings`` of the configured OpenAI-compatible endpoint.

    Each call reserves the worst case (one token per byte of the inputs, at the
    model's input price) against ``run``'s budget before sending, and settles to
    the reported ``prompt_tokens`` (bounded by that; none reported: the bound,
    estimated). Without a run nothing is sent: an unpriced call is never made."""

    def __init__(self, config: Config, model: str) -> None:
        self._config = config
        self._model = model
        self._client: openai.AsyncOpenAI | None = None

    @property
    def model(self) -> str:
        return self._model

    def _get_client(self) -> openai.AsyncOpenAI:
        if self._client is None:
            from agentkeel.models.completion import make_client

            self._client = make_client(
                self._config,
                unconfigured=f"memory.embedding_model {self._model!r} needs an OpenAI-compatible endpoint: "
                f"set [models] base_url or $OPENAI_BASE_URL (or $OPENAI_API_KEY for OpenAI)",
            )
        return self._client

    async def embed(self, texts: Sequence[str], run: RunContext | None) -> Embeddings:
        if not texts:
            return Embeddings(())
        if run is None:
            raise EmbeddingError(f"embedding with {self._model!r} is priced: it needs a run to bill")
        vectors: list[Sequence[float]] = []
        tokens = 0
        for start in range(0, len(texts), MAX_BATCH):
            batch = list(texts[start:start + MAX_BATCH])
            part = await self._embed_batch(batch, run)
            vectors += part.vectors
            tokens += part.input_tokens
        return Embeddings(vectors, tokens)

    async def _embed_batch(self, texts: list[str], run: RunContext) -> Embeddings:
        import openai

        bound = prompt_token_upper_bound({"content": t} for t in texts)
        worst = run.pricer.worst_case(self._model, bound, 0)
        reservation = run.budget.reserve(worst, f"embeddings from {self._model}", purpose="embed",
                                         reason="memory retrieval")
        client = self._get_client()
        deadline_s = self._config.llm_timeout_s
        try:
            async with asyncio.timeout(deadline_s):
                answer = await client.embeddings.create(model=self._model, input=texts, encoding_format="float")
        except openai.APIStatusError as exc:
            reservation.release()  # an error answer is not billed
            raise EmbeddingError(f"{self._model} failed with HTTP {exc.status_code}: {exc.message}") from exc
        except openai.APIConnectionError as exc:
            self._settle(run, reservation, bound, estimated=True)
            raise EmbeddingError(f"{self._model} call failed: {type(exc).__name__}: {exc}") from exc
        except TimeoutError as exc:
            self._settle(run, reservation, bound, estimated=True)
            raise EmbeddingError(f"{self._model} did not answer within {deadline_s:g} s") from exc
        except BaseException:
            self._settle(run, reservation, bound, estimated=True)
            raise
        reported = getattr(getattr(answer, "usage", None), "prompt_tokens", None)
        usable = isinstance(reported, int) and not isinstance(reported, bool) and 0 <= reported <= bound
        self._settle(run, reservation, reported if usable else bound, estimated=not usable)  # type: ignore[arg-type]
        return Embeddings(_vectors(answer, len(texts), self._model), reported if usable else bound)  # type: ignore[arg-type]

    def _settle(self, run: RunContext, reservation: Reservation, tokens: int, *, estimated: bool) -> None:
        run.settle_llm(reservation, model=self._model, tier=None, usage=Usage(input_tokens=tokens, output_tokens=0),
                       estimated=estimated)


def _vectors(answer: Any, expected: int, model: str) -> list[Sequence[float]]:
    """The answer's vectors in input order, one per text (the store checks their numbers)."""
    data = sorted(getattr(answer, "data", None) or [], key=lambda d: getattr(d, "index", 0))
    if len(data) != expected:
        raise EmbeddingError(f"{model} returned {len(data)} embedding(s) for {expected} text(s)")
    vectors: list[Sequence[float]] = [list(getattr(d, "embedding", None) or []) for d in data]
    return vectors
