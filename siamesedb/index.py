"""VectorIndex: a FAISS index (any factory string) behind the (D, I) contract, with ids; no torch import."""

from __future__ import annotations

import operator
import os
import re
import tempfile
from pathlib import Path

import faiss
import numpy as np

from siamesedb.errors import CorruptIndexError, DimensionMismatchError, InvalidInputError


def _faiss_reason(exc: Exception) -> str:
    """FAISS's own message without the C++ signature and source location, on one line."""
    text = str(exc).strip().splitlines()[-1] if str(exc).strip() else type(exc).__name__
    # "Error in <signature> at /path/File.cpp:57: Error: 'cond' failed: what went wrong"
    match = re.search(r" at \S+:\d+: (?:Error: )?(.*)$", text)
    reason = match.group(1) if match else text
    return reason.split("' failed: ", 1)[1] if "' failed: " in reason else reason


def _as_matrix(vectors: np.ndarray, dim: int, what: str = "vectors") -> np.ndarray:
    """Validate and return a C-contiguous (n, dim) float32 array; a single (dim,) vector becomes (1, dim)."""
    array = np.asarray(vectors)
    if array.ndim == 1:
        array = array[None, :]
    if array.ndim != 2:
        raise InvalidInputError(f"{what} must be a 2-D array (n, {dim}), got shape {array.shape}")
    # Integers and floats only: complex would silently lose its imaginary part, objects/strings cannot be cast.
    if not (np.issubdtype(array.dtype, np.floating) or np.issubdtype(array.dtype, np.integer)):
        raise InvalidInputError(f"{what} must be a real-valued numeric array, got dtype {array.dtype}")
    if array.shape[1] != dim:
        raise DimensionMismatchError(f"{what} have dimension {array.shape[1]}, the index holds {dim}-d vectors")
    array = np.ascontiguousarray(array, dtype=np.float32)  # float64 -> float32 is a cast, not an error
    if not np.isfinite(array).all():
        raise InvalidInputError(f"{what} contain NaN or infinity")
    return array


def _as_ids(ids: np.ndarray, n: int) -> np.ndarray:
    """Validate and return (n,) int64 ids: integers, non-negative (-1 means "no result"), no repeats."""
    array = np.atleast_1d(np.asarray(ids))
    if array.ndim != 1:
        raise InvalidInputError(f"ids must be a 1-D array, got shape {array.shape}")
    if len(array) != n:
        raise InvalidInputError(f"{n} vectors but {len(array)} ids")
    if n == 0:
        return np.empty(0, dtype=np.int64)
    if not np.issubdtype(array.dtype, np.integer):
        raise InvalidInputError(f"ids must be integers, got dtype {array.dtype}")
    array = np.ascontiguousarray(array, dtype=np.int64)
    if array.min() < 0:
        raise InvalidInputError(f"ids must be non-negative, got {int(array.min())}")
    if len(np.unique(array)) != n:
        raise InvalidInputError("ids repeat within the batch")
    return array


def _as_k(k: int) -> int:
    try:
        k = operator.index(k)  # ints and numpy integers; refuses 2.5 and "3"
    except TypeError:
        raise InvalidInputError(f"k must be an integer, got {k!r}") from None
    if k < 1:
        raise InvalidInputError(f"k must be at least 1, got {k}")
    return k


class VectorIndex:
    """FAISS IndexIDMap2 over `faiss.index_factory(dim, factory, METRIC_INNER_PRODUCT)`.

    Scores are inner products of L2-normalised vectors (cosine similarity): higher is more similar. Where fewer
    than k results exist, I holds -1 and D holds -inf, so callers never mistake padding for a hit.
    """

    def __init__(self, dim: int, factory: str = "Flat", _index: faiss.Index | None = None):
        if int(dim) < 1:
            raise InvalidInputError(f"dimension must be positive, got {dim}")
        self.dim = int(dim)
        self.factory = factory
        if _index is None:
            try:
                inner = faiss.index_factory(self.dim, factory, faiss.METRIC_INNER_PRODUCT)
            except RuntimeError as exc:
                raise InvalidInputError(f"bad FAISS factory string {factory!r}: {_faiss_reason(exc)}") from None
            # IndexIDMap2 (not IndexIDMap): keeps a reverse map, so ids can be removed and vectors reconstructed.
            _index = faiss.IndexIDMap2(inner)
        self._index = _index

    @property
    def ntotal(self) -> int:
        return int(self._index.ntotal)

    @property
    def is_trained(self) -> bool:
        return bool(self._index.is_trained)

    @property
    def supports_remove(self) -> bool:
        """Whether `remove` works for this factory (graph indexes such as HNSW cannot drop vectors)."""
        try:
            # Remove nothing from the inner index: cheap, changes nothing, and raises where removal is unimplemented.
            self._index.index.remove_ids(faiss.IDSelectorRange(0, 0))
        except RuntimeError:
            return False
        return True

    def train(self, vectors: np.ndarray) -> None:
        """Train the quantiser of factories that need it (IVF, PQ); a no-op for Flat and when already trained."""
        if self.is_trained:
            return
        vectors = _as_matrix(vectors, self.dim)
        try:
            self._index.train(vectors)
        except RuntimeError as exc:  # e.g. fewer training vectors than PQ / IVF centroids
            raise InvalidInputError(f"cannot train the {self.factory!r} index: {_faiss_reason(exc)}") from None

    def add(self, vectors: np.ndarray, ids: np.ndarray) -> None:
        """Add (n, dim) vectors under (n,) int64 ids that the index does not hold yet."""
        vectors = _as_matrix(vectors, self.dim)
        ids = _as_ids(ids, len(vectors))
        if not self.is_trained:
            raise InvalidInputError(
                f"the {self.factory!r} index must be trained before adding vectors (call train() first)"
            )
        if len(ids) == 0:
            return
        if self.ntotal:
            # A view of FAISS's id map (no copy): a repeated id would shadow the old vector in the reverse map.
            held = faiss.rev_swig_ptr(self._index.id_map.data(), self._index.id_map.size())
            clash = ids[np.isin(ids, held)]
            if len(clash):
                raise InvalidInputError(f"id {int(clash[0])} is already in the index ({len(clash)} repeated ids)")
        self._index.add_with_ids(vectors, ids)

    def remove(self, ids: np.ndarray) -> int:
        """Remove these ids (unknown ones are ignored); returns how many vectors were removed."""
        array = np.atleast_1d(np.asarray(ids))
        if array.size == 0:
            return 0
        if not np.issubdtype(array.dtype, np.integer):
            raise InvalidInputError(f"ids must be integers, got dtype {array.dtype}")
        array = np.ascontiguousarray(array.reshape(-1), dtype=np.int64)
        try:
            return int(self._index.remove_ids(faiss.IDSelectorBatch(array)))
        except RuntimeError as exc:  # raised before anything changes: the index stays whole
            raise InvalidInputError(
                f"the {self.factory!r} index cannot remove vectors ({_faiss_reason(exc)}); "
                "rebuild it without them, or use a factory that supports removal such as Flat or IVF"
            ) from None

    def search(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """(D (nq, k) float32 scores best first, I (nq, k) int64 ids); -inf / -1 where fewer than k exist."""
        k = _as_k(k)
        queries = _as_matrix(queries, self.dim, "queries")
        nq = len(queries)
        if self.ntotal == 0 or nq == 0:
            return np.full((nq, k), -np.inf, dtype=np.float32), np.full((nq, k), -1, dtype=np.int64)
        D, I = self._index.search(queries, k)
        # FAISS pads with I = -1 and D = -FLT_MAX for inner product; -inf cannot be mistaken for a score.
        D = np.where(I < 0, np.float32(-np.inf), D).astype(np.float32, copy=False)
        return D, I.astype(np.int64, copy=False)

    def ids(self) -> np.ndarray:
        """(ntotal,) int64 ids held, in insertion order."""
        return faiss.vector_to_array(self._index.id_map).astype(np.int64, copy=False)

    def save(self, path: str | os.PathLike) -> None:
        """Write atomically: serialise to a temporary file beside the target, fsync, then rename over it."""
        path = Path(path)
        data = faiss.serialize_index(self._index)  # (nbytes,) uint8
        fd, tmp = tempfile.mkstemp(prefix=path.name + ".", suffix=".tmp", dir=path.parent)
        try:
            with os.fdopen(fd, "wb") as fh:
                fh.write(data)
                fh.flush()
                os.fsync(fh.fileno())
            os.replace(tmp, path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
        _fsync_dir(path.parent)

    @classmethod
    def load(cls, path: str | os.PathLike, factory: str = "Flat") -> VectorIndex:
        """Read a file written by `save`; `factory` is recorded as given (FAISS files do not keep the string)."""
        path = Path(path)
        if not path.exists():
            raise CorruptIndexError(f"{path}: missing")
        try:
            data = np.fromfile(path, dtype=np.uint8)
        except OSError as exc:
            raise CorruptIndexError(f"{path}: cannot read ({exc.strerror or exc})") from None
        try:
            index = faiss.deserialize_index(data)
        except RuntimeError:
            raise CorruptIndexError(f"{path}: not a readable FAISS index") from None
        if not isinstance(index, faiss.IndexIDMap2):
            raise CorruptIndexError(f"{path}: not a siamesedb FAISS index (no id map)")
        if index.metric_type != faiss.METRIC_INNER_PRODUCT:
            raise CorruptIndexError(f"{path}: not a siamesedb FAISS index (metric is not inner product)")
        return cls(index.d, factory=factory, _index=index)

    @classmethod
    def from_vectors(cls, vectors: np.ndarray, ids: np.ndarray, factory: str = "Flat") -> VectorIndex:
        """A new index trained (when the factory needs it) and filled with (n, d) vectors under (n,) ids."""
        array = np.asarray(vectors)
        if array.ndim != 2:
            raise InvalidInputError(f"vectors must be a 2-D array (n, d), got shape {array.shape}")
        index = cls(array.shape[1], factory=factory)
        index.train(array)
        index.add(array, ids)
        return index


def _fsync_dir(folder: Path) -> None:
    """Make a rename durable: fsync the folder entry (not possible on Windows, where it is skipped)."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)
