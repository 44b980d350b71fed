"""Vectors of memory records: checked, unit-length float32, ranked by cosine similarity.

numpy does the arithmetic (``pip install "agentkeel[semantic]"``); it is imported
only when semantic retrieval is used. A vector is stored as the little-endian
float32 bytes of its unit-length form, so cosine similarity is a dot product.

``VectorCache`` keeps each (user, model)'s matrix in the process between
searches, bounded in bytes (least recently used goes first). A cached matrix is
checked against the store on every search by a stamp, (number of vectors, largest
vector id): vector ids only grow (never reused), so a stamp that did not change
means no vector was added or deleted; a stamp whose count grew by exactly the
number of vectors with a larger id means only additions, which are appended.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Iterable, Sequence
from typing import Any

import attrs

from agentkeel.errors import ConfigError

Matrix = Any
"""A numpy float32 array (numpy is optional, so it is not named in the types)."""

__all__ = ["VectorCache", "cosine_top_k", "numpy_module", "to_blob", "unit_vectors"]

MAX_DIMS = 8192
DEFAULT_CACHE_BYTES = 512 * 1024 * 1024


def numpy_module() -> Any:
    """numpy, or ``ConfigError`` saying how to install it."""
    try:
        import numpy
    except ImportError as exc:
        raise ConfigError('semantic memory (memory.embedding_model) needs numpy: pip install "agentkeel[semantic]"'
                          ) from exc
    return numpy


def unit_vectors(vectors: Sequence[Sequence[float]] | Matrix) -> Matrix:
    """``vectors`` as a float32 matrix of unit rows; ``ValueError`` naming the problem when
    they are not all of one length (1 to ``MAX_DIMS``), finite, and non-zero."""
    np = numpy_module()
    try:
        matrix = np.asarray(vectors, dtype=np.float64)
    except (TypeError, ValueError) as exc:
        raise ValueError(f"vectors must be equal-length sequences of numbers ({exc})") from None
    if matrix.ndim != 2 or not 1 <= matrix.shape[1] <= MAX_DIMS:
        raise ValueError(f"vectors must be equal-length sequences of 1 to {MAX_DIMS} numbers, "
                         f"got an array of shape {matrix.shape}")
    if not np.isfinite(matrix).all():
        raise ValueError("vectors must hold finite numbers only (found NaN or infinity)")
    norms = np.linalg.norm(matrix, axis=1)
    if (norms == 0).any():
        raise ValueError("a vector of zeros has no direction: it cannot be compared")
    return (matrix / norms[:, None]).astype(np.float32)


def to_blob(row: Matrix) -> bytes:
    np = numpy_module()
    return bytes(np.ascontiguousarray(row, dtype="<f4").tobytes())


def from_blobs(blobs: Iterable[bytes], dims: int) -> Matrix:
    np = numpy_module()
    data = b"".join(blobs)
    return np.frombuffer(data, dtype="<f4").reshape(-1, dims).astype(np.float32, copy=False)


def cosine_top_k(matrix: Matrix, query: Matrix, k: int, keep: Any = None) -> list[tuple[int, float]]:
    """The ``k`` rows most similar to ``query`` (both unit length), best first, as
    (row index, cosine similarity); ``keep`` (a boolean mask) leaves the other rows out."""
    np = numpy_module()
    if k <= 0 or matrix.shape[0] == 0:
        return []
    scores = matrix @ query.reshape(-1)
    if keep is not None:
        scores = np.where(keep, scores, -np.inf)
    k = min(k, scores.shape[0])
    top = np.argpartition(-scores, k - 1)[:k]
    top = top[np.argsort(-scores[top], kind="stable")]
    return [(int(i), float(scores[i])) for i in top if np.isfinite(scores[i])]


@attrs.define
class CachedMatrix:
    """One (user, model)'s vectors: record ids, run ids, the matrix, and the stamp it matches."""

    record_ids: list[int]
    run_ids: list[str]
    matrix: Matrix
    count: int
    max_id: int

    @property
    def nbytes(self) -> int:
        return int(self.matrix.nbytes) + 64 * len(self.record_ids)


class VectorCache:
    """Matrices by (user, model), least recently used dropped past ``max_bytes``; thread-safe."""

    def __init__(self, max_bytes: int = DEFAULT_CACHE_BYTES) -> None:
        self.max_bytes = max_bytes
        self._entries: OrderedDict[tuple[str, str, int], CachedMatrix] = OrderedDict()
        self._lock = threading.Lock()

    def get(self, key: tuple[str, str, int]) -> CachedMatrix | None:
        with self._lock:
            entry = self._entries.get(key)
            if entry is not None:
                self._entries.move_to_end(key)
            return entry

    def put(self, key: tuple[str, str, int], entry: CachedMatrix) -> None:
        with self._lock:
            self._entries[key] = entry
            self._entries.move_to_end(key)
            total = sum(e.nbytes for e in self._entries.values())
            while total > self.max_bytes and len(self._entries) > 1:
                _, dropped = self._entries.popitem(last=False)
                total -= dropped.nbytes
            if total > self.max_bytes:  # one matrix larger than the cache: not kept
                self._entries.clear()

    def clear(self) -> None:
        with self._lock:
            self._entries.clear()
