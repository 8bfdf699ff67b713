"""VectorIndex: a FAISS index (any factory string) behind the (D, I) contract, with ids; no torch import.

Scores are inner products of L2-normalised vectors (cosine similarity): higher is more similar. Where fewer than
k results exist, I holds -1 and D holds -inf, so callers never mistake padding for a hit.
"""

from __future__ import annotations

import os
from pathlib import Path

import faiss
import numpy as np

from siamesedb.errors import CorruptIndexError, DimensionMismatchError, InvalidInputError


def _as_matrix(vectors: np.ndarray, dim: int, what: str = "vectors") -> np.ndarray:
    """Validate and return a C-contiguous (n, dim) float32 copy-or-view; a single (dim,) vector becomes (1, dim)."""
    array = np.asarray(vectors)
    if array.ndim == 1:
        array = array[None, :]
    if array.ndim != 2:
        raise InvalidInputError(f"{what} must be a 2-D array (n, {dim}), got shape {array.shape}")
    if not np.issubdtype(array.dtype, np.number):
        raise InvalidInputError(f"{what} must be numeric, got {array.dtype}")
    if array.shape[1] != dim:
        raise DimensionMismatchError(f"{what} have dimension {array.shape[1]}, the index holds {dim}-d vectors")
    array = np.ascontiguousarray(array, dtype=np.float32)
    if not np.isfinite(array).all():
        raise InvalidInputError(f"{what} contain NaN or infinity")
    return array


class VectorIndex:
    """FAISS IndexIDMap2 over `faiss.index_factory(dim, factory, METRIC_INNER_PRODUCT)`."""

    def __init__(self, dim: int, factory: str = "Flat", _index: faiss.Index | None = None):
        if int(dim) < 1:
            raise InvalidInputError(f"dimension must be positive, got {dim}")
        self.dim = int(dim)
        self.factory = factory
        if _index is None:
            try:
                inner = faiss.index_factory(self.dim, factory, faiss.METRIC_INNER_PRODUCT)
            except RuntimeError as exc:
                first = str(exc).strip().splitlines()[-1] if str(exc).strip() else "invalid"
                raise InvalidInputError(f"bad FAISS factory string {factory!r}: {first}") from None
            _index = faiss.IndexIDMap2(inner)
        self._index = _index

    @property
    def ntotal(self) -> int:
        return int(self._index.ntotal)

    @property
    def is_trained(self) -> bool:
        return bool(self._index.is_trained)

    def train(self, vectors: np.ndarray) -> None:
        """Train the quantiser of factories that need it (IVF, PQ); a no-op for Flat."""
        if self.is_trained:
            return
        self._index.train(_as_matrix(vectors, self.dim))

    def add(self, vectors: np.ndarray, ids: np.ndarray) -> None:
        vectors = _as_matrix(vectors, self.dim)
        ids = np.ascontiguousarray(np.asarray(ids).reshape(-1), dtype=np.int64)
        if len(ids) != len(vectors):
            raise InvalidInputError(f"{len(vectors)} vectors but {len(ids)} ids")
        if not self.is_trained:
            raise InvalidInputError(f"the {self.factory!r} index must be trained before adding vectors")
        if len(ids):
            self._index.add_with_ids(vectors, ids)

    def remove(self, ids: np.ndarray) -> int:
        ids = np.ascontiguousarray(np.atleast_1d(np.asarray(ids)), dtype=np.int64)
        if len(ids) == 0:
            return 0
        try:
            return int(self._index.remove_ids(faiss.IDSelectorBatch(ids)))
        except RuntimeError as exc:
            raise InvalidInputError(f"the {self.factory!r} index cannot remove vectors: {exc}") from None

    def search(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """(D (nq, k) float32 scores best first, I (nq, k) int64 ids); -inf / -1 where fewer than k exist."""
        if int(k) < 1:
            raise InvalidInputError(f"k must be at least 1, got {k}")
        queries = _as_matrix(queries, self.dim, "queries")
        k = int(k)
        if self.ntotal == 0 or len(queries) == 0:
            return (np.full((len(queries), k), -np.inf, dtype=np.float32), np.full((len(queries), k), -1, dtype=np.int64))
        D, I = self._index.search(queries, k)
        D = np.where(I < 0, -np.inf, D).astype(np.float32)
        return D, I.astype(np.int64)

    def ids(self) -> np.ndarray:
        return faiss.vector_to_array(self._index.id_map).astype(np.int64)

    def save(self, path: str | os.PathLike) -> None:
        """Write atomically: serialise to a temporary file beside the target, fsync, then rename over it."""
        path = Path(path)
        tmp = path.with_name(path.name + ".tmp")
        data = faiss.serialize_index(self._index)
        with open(tmp, "wb") as fh:
            fh.write(data.tobytes())
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)

    @classmethod
    def load(cls, path: str | os.PathLike, factory: str = "Flat") -> VectorIndex:
        path = Path(path)
        try:
            data = np.fromfile(path, dtype=np.uint8)
        except OSError as exc:
            raise CorruptIndexError(f"{path}: cannot read ({exc.strerror or exc})") from None
        try:
            index = faiss.deserialize_index(data)
        except RuntimeError:
            raise CorruptIndexError(f"{path}: not a readable FAISS index") from None
        if not isinstance(index, faiss.IndexIDMap2):
            try:
                index = faiss.downcast_index(index)
            except Exception:  # noqa: BLE001 - any failure here means the file is not ours
                raise CorruptIndexError(f"{path}: not a siamesedb FAISS index") from None
            if not isinstance(index, faiss.IndexIDMap2):
                raise CorruptIndexError(f"{path}: not a siamesedb FAISS index (no id map)")
        return cls(index.d, factory=factory, _index=index)

    @classmethod
    def from_vectors(cls, vectors: np.ndarray, ids: np.ndarray, factory: str = "Flat") -> VectorIndex:
        vectors = np.atleast_2d(np.asarray(vectors, dtype=np.float32))
        index = cls(vectors.shape[1], factory=factory)
        index.train(vectors)
        index.add(vectors, ids)
        return index
