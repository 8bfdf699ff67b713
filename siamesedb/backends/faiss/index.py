"""VectorIndex: a FAISS index (any factory string) behind the (D, I) contract, with ids; no torch import."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import faiss
import numpy as np

from siamesedb.backends.base import scores_from_squared_l2
from siamesedb.backends.faiss.factory import (
    AUTO,
    INDEX_METRICS,
    auto_search_defaults,
    choose_factory,
    faiss_reason,
    parse_factory,
)
from siamesedb.backends.faiss.gpu import GpuFaiss, resolve_search
from siamesedb.backends.faiss.kernels import faiss_threads, tune_cpu_blas
from siamesedb.backends.faiss.structure import (
    index_parts,
    search_parameters,
    skip_polysemous_training,
)
from siamesedb.backends.faiss.tombstones import (
    read_sidecar,
    sidecar_path,
    worth_compacting,
    write_sidecar,
)
from siamesedb.checks import as_ids, as_k, as_positive, as_vectors
from siamesedb.errors import CorruptIndexError, InvalidInputError
from siamesedb.files import fsync_dir, write_atomic_with


class VectorIndex:
    """FAISS IndexIDMap2 over `faiss.index_factory(dim, factory, metric)`.

    metric "inner_product" (the default): scores are inner products of L2-normalised vectors (cosine similarity).
    metric "l2": FAISS's METRIC_L2 natively (every factory), and scores are minus the Euclidean distance. Either
    way higher is more similar. Where fewer than k results exist, I holds -1 and D holds -inf, so callers never
    mistake padding for a hit; rows are never wider than the vectors held (a huge k is clamped to the collection).

    Removal works for every factory: where FAISS cannot remove correctly (HNSW graphs; IVF, whose positions
    IndexIDMap2 would mismatch after a removal), removed ids become tombstones (tombstones.py) that every search
    filters out with an IDSelector, until `compact()` rebuilds the index without them (`needs_compaction` says when
    that is worthwhile).

    `device` / `backend` choose where search runs, and with what engine (`engine`; gpu.resolve_search): "cpu" +
    "faiss" (the default) is FAISS on the CPU; "cuda" / "cuda:N" uses FAISS's GPU index when the installed faiss has
    GPU support and otherwise an exact torch search on the GPU (torch_search.py); backend="torch" forces that exact
    torch search, also on the CPU (for testing).
    """

    def __init__(
        self,
        dim: int,
        factory: str = "Flat",
        _index: faiss.Index | None = None,
        device: str = "cpu",
        backend: str = "auto",
        metric: str = "inner_product",
    ):
        if int(dim) < 1:
            raise InvalidInputError(f"dimension must be positive, got {dim}")
        if metric not in INDEX_METRICS:
            raise InvalidInputError(f"unknown index metric {metric!r}; choose from {', '.join(INDEX_METRICS)}")
        if _index is not None:  # a loaded file: its own metric decides
            metric = next(name for name, code in INDEX_METRICS.items() if code == _index.metric_type)
        self.dim = int(dim)
        self.metric = metric
        if factory == AUTO:
            raise InvalidInputError(
                "factory 'auto' depends on the collection size: use VectorIndex.from_vectors(..., factory='auto') "
                "or choose_factory(n, dim)"
            )
        self.factory = factory
        if _index is None:
            inner = parse_factory(self.dim, factory, metric)
            skip_polysemous_training(inner)
            # IndexIDMap2 (not IndexIDMap): keeps a reverse map, so ids can be removed and vectors reconstructed.
            _index = faiss.IndexIDMap2(inner)
        self._index = _index
        self._removed = np.empty(0, dtype=np.int64)  # sorted tombstoned ids (only for indexes that cannot remove)
        self._native_remove = self._probe_remove()
        self.device, self.engine = resolve_search(device, backend)
        self._accelerated: Any = None  # a GPU FAISS copy or a torch exact searcher, rebuilt lazily after changes

    # ------------------------------------------------------------------ state

    @property
    def backend(self) -> str:
        """The search engine ("faiss" | "faiss-gpu" | "torch"), under the name of the keyword that asks for it."""
        return self.engine

    @property
    def ntotal(self) -> int:
        """Vectors held and not removed."""
        return int(self._index.ntotal) - len(self._removed)

    @property
    def is_trained(self) -> bool:
        return bool(self._index.is_trained)

    @property
    def removed_pending(self) -> int:
        """Removed ids still inside the FAISS index as tombstones (0 for factories that remove natively)."""
        return len(self._removed)

    def _probe_remove(self) -> bool:
        """Whether FAISS can remove from this index *inside IndexIDMap2*: the inner index must support removal and
        renumber what stays (flat storage does). IVF removes without renumbering its stored positions, which
        IndexIDMap2's compacted id map then mistakes for other items: IVF takes the tombstone path too."""
        if self._parts()[1] is not None:
            return False
        try:
            # Remove nothing from the inner index: cheap, changes nothing, and raises where removal is unimplemented.
            self._index.index.remove_ids(faiss.IDSelectorRange(0, 0))
        except RuntimeError:
            return False
        return True

    @property
    def supports_remove(self) -> bool:
        """Always True: factories FAISS cannot remove from (HNSW) use tombstones. See `removes_natively`."""
        return True

    @property
    def removes_natively(self) -> bool:
        """Whether FAISS itself drops removed vectors (Flat, PQ) rather than tombstoning them (HNSW, IVF)."""
        return self._native_remove

    @property
    def needs_compaction(self) -> bool:
        """Whether rebuilding without the tombstones is worthwhile (tombstones.worth_compacting)."""
        return worth_compacting(len(self._removed), int(self._index.ntotal))

    def _held_ids(self) -> np.ndarray:
        """A view of FAISS's id map, tombstones included (no copy)."""
        if self._index.ntotal == 0:
            return np.empty(0, dtype=np.int64)
        return faiss.rev_swig_ptr(self._index.id_map.data(), self._index.id_map.size())

    def _changed(self) -> None:
        self._accelerated = None

    # ------------------------------------------------------------------ search parameters

    def _inner(self) -> faiss.Index:
        return faiss.downcast_index(self._index.index)

    def _parts(self) -> tuple[Any, Any, Any]:
        """(IndexPreTransform or None, IVF index or None, HNSW index or None) inside this index."""
        return index_parts(self._inner())

    @property
    def search_defaults(self) -> dict[str, int]:
        """The nprobe / efSearch searches use when not given one (stored in the FAISS file)."""
        _, ivf, hnsw = self._parts()
        found = {}
        if ivf is not None:
            found["nprobe"] = int(ivf.nprobe)
        if hnsw is not None:
            found["ef_search"] = int(hnsw.hnsw.efSearch)
        return found

    def set_search_defaults(self, nprobe: int | None = None, ef_search: int | None = None) -> None:
        """Set the nprobe (IVF) / efSearch (HNSW) every search uses unless it passes its own."""
        nprobe, ef_search = self._check_params(nprobe, ef_search)
        _, ivf, hnsw = self._parts()
        if nprobe is not None:
            ivf.nprobe = nprobe
        if ef_search is not None:
            hnsw.hnsw.efSearch = ef_search
        self._changed()

    def _check_params(self, nprobe: Any, ef_search: Any) -> tuple[int | None, int | None]:
        nprobe, ef_search = as_positive(nprobe, "nprobe"), as_positive(ef_search, "ef_search")
        _, ivf, hnsw = self._parts()
        if nprobe is not None and ivf is None:
            raise InvalidInputError(f"nprobe applies to IVF indexes; this one is {self.factory!r}")
        if ef_search is not None and hnsw is None:
            raise InvalidInputError(f"ef_search applies to HNSW indexes; this one is {self.factory!r}")
        return nprobe, ef_search

    # ------------------------------------------------------------------ writing

    def train(self, vectors: np.ndarray) -> None:
        """Train the quantiser of factories that need it (IVF, PQ); a no-op for Flat and when already trained."""
        if self.is_trained:
            return
        vectors = as_vectors(vectors, self.dim)
        try:
            self._index.train(vectors)
        except RuntimeError as exc:  # e.g. fewer training vectors than PQ / IVF centroids
            raise InvalidInputError(f"cannot train the {self.factory!r} index: {faiss_reason(exc)}") from None

    def add(self, vectors: np.ndarray, ids: np.ndarray) -> None:
        """Add (n, dim) vectors under (n,) int64 ids that the index does not hold yet."""
        vectors = as_vectors(vectors, self.dim)
        ids = as_ids(ids, len(vectors))
        if not self.is_trained:
            raise InvalidInputError(
                f"the {self.factory!r} index must be trained before adding vectors (call train() first)"
            )
        if len(ids) == 0:
            return
        if len(self._removed) and np.isin(ids, self._removed).any():
            self.compact()  # a tombstoned id is coming back: drop the dead copy first
        if self._index.ntotal:
            # A repeated id would shadow the old vector in the reverse map.
            clash = ids[np.isin(ids, self._held_ids())]
            if len(clash):
                raise InvalidInputError(f"id {int(clash[0])} is already in the index ({len(clash)} repeated ids)")
        self._index.add_with_ids(vectors, ids)
        self._changed()

    def remove(self, ids: np.ndarray) -> int:
        """Remove these ids (unknown ones are ignored); returns how many vectors were removed."""
        array = np.atleast_1d(np.asarray(ids))
        if array.size == 0:
            return 0
        if not np.issubdtype(array.dtype, np.integer):
            raise InvalidInputError(f"ids must be integers, got dtype {array.dtype}")
        array = np.unique(np.ascontiguousarray(array.reshape(-1), dtype=np.int64))
        if not self._native_remove:
            live = array[np.isin(array, self._held_ids()) & ~np.isin(array, self._removed)]
            self._removed = np.union1d(self._removed, live)
            self._changed()
            return len(live)
        try:
            removed = int(self._index.remove_ids(faiss.IDSelectorBatch(array)))
        except RuntimeError as exc:  # raised before anything changes: the index stays whole
            raise InvalidInputError(f"the {self.factory!r} index cannot remove vectors ({faiss_reason(exc)})") from None
        self._changed()
        return removed

    def compact(self, vectors: np.ndarray | None = None, ids: np.ndarray | None = None) -> None:
        """Rebuild without tombstones, keeping the training and search defaults: the inner index is cloned, emptied
        (`reset`) and refilled. With (n, dim) `vectors` and (n,) `ids` (exact copies, e.g. from the store), from
        those; else from the live vectors reconstructed out of the index (exact for full-vector types; for PQ
        codes, decoding and re-encoding with the same codebooks gives back the same codes)."""
        if vectors is None:
            if not len(self._removed):
                return
            vectors, ids = self.live_vectors(), self.ids()
        vectors = as_vectors(vectors, self.dim)
        ids = as_ids(ids, len(vectors))
        inner = faiss.clone_index(self._index.index)
        inner.reset()
        fresh = faiss.IndexIDMap2(inner)
        if len(ids):
            fresh.add_with_ids(vectors, ids)
        self._index, self._removed = fresh, np.empty(0, dtype=np.int64)
        self._changed()

    # ------------------------------------------------------------------ reading

    def search(
        self, queries: np.ndarray, k: int, nprobe: int | None = None, ef_search: int | None = None
    ) -> tuple[np.ndarray, np.ndarray]:
        """(D (nq, w) float32 scores best first, I (nq, w) int64 ids), w = min(k, vectors held): a k beyond the
        collection returns what there is (memory bounded by the answer, never by k); -inf / -1 where fewer than w
        results come back (an IVF probe, an HNSW graph).

        `nprobe` (IVF: inverted lists visited) and `ef_search` (HNSW: candidate list size) apply to this call only;
        bigger means slower and closer to exact. Exact engines (Flat, the torch search) accept and ignore them.
        """
        k = min(as_k(k), self.ntotal)
        queries = as_vectors(queries, self.dim, "queries")
        nprobe, ef_search = self._check_params(nprobe, ef_search)
        nq = len(queries)
        if k == 0 or nq == 0:
            return np.full((nq, k), -np.inf, dtype=np.float32), np.full((nq, k), -1, dtype=np.int64)
        if self.engine != "faiss":
            D, I = self._accelerated_search(queries, k, nprobe)
        else:
            D, I = self._faiss_search(queries, k, nprobe, ef_search)
        # FAISS pads with I = -1 and D = -FLT_MAX (inner product) / FLT_MAX (L2); -inf cannot be mistaken for a score.
        D = np.where(I < 0, np.float32(-np.inf), D).astype(np.float32, copy=False)
        return D, I.astype(np.int64, copy=False)

    def _faiss_search(self, queries: np.ndarray, k: int, nprobe: int | None, ef_search: int | None):
        kernel = tune_cpu_blas(len(queries))
        # A small batch on a Flat index: FAISS's scan on one thread (kernels.SMALL_BATCH).
        threads = 1 if kernel == "faiss-scan" and isinstance(self._inner(), faiss.IndexFlat) else None
        batch = sel = None
        if len(self._removed):
            # Tombstones are skipped inside the search, so HNSW / IVF still return k live results, not fewer.
            # IndexIDMap2 translates a selector on the outer parameters from its ids to inner positions; an
            # IndexPreTransform (OPQ...) hands only its nested parameters down, so there the selector names positions.
            if self._parts()[0] is not None:
                batch = faiss.IDSelectorBatch(np.flatnonzero(np.isin(self._held_ids(), self._removed)).astype(np.int64))
            else:
                batch = faiss.IDSelectorBatch(self._removed)
            sel = faiss.IDSelectorNot(batch)
        params, keep = search_parameters(self._parts(), nprobe, ef_search, sel)
        with faiss_threads(threads):
            D, I = self._index.search(queries, k, params=params)
        del batch, sel, params, keep  # these had to outlive the search call
        return (scores_from_squared_l2(D) if self.metric == "l2" else D), I

    def _accelerated_search(self, queries: np.ndarray, k: int, nprobe: int | None):
        if self._accelerated is None:
            self._accelerated = self._make_accelerated()
        return self._accelerated(queries, k, nprobe)

    def _make_accelerated(self) -> Any:
        """A search function (queries, k, nprobe) -> (D, I): FAISS's GPU copy of this index, or where that is not
        possible (no GPU faiss, or a type FAISS cannot put on a GPU, such as HNSW) the exact torch search."""
        if self.engine == "faiss-gpu":  # pragma: no cover - needs a GPU build of faiss
            try:
                return GpuFaiss(self._index.index, self._held_ids().copy(), self._removed, self.metric,
                                self.device).search
            except RuntimeError:
                pass
        from siamesedb.backends.faiss.torch_search import TorchExactSearch

        exact = TorchExactSearch(self.live_vectors(), self.ids(), device=self.device, metric=self.metric)
        return lambda queries, k, nprobe: exact.search(queries, k)  # exact: nprobe has nothing to do

    def live_vectors(self) -> np.ndarray:
        """(ntotal, dim) float32 vectors held, in `ids()` order, as FAISS stores them (decoded for PQ / SQ)."""
        n = int(self._index.ntotal)
        if n == 0:
            return np.empty((0, self.dim), dtype=np.float32)
        inner = self._index.index
        try:
            vectors = inner.reconstruct_n(0, n)
        except RuntimeError:
            # IVF indexes reconstruct by position only through a direct map; make one on a copy, not on self.
            copy = faiss.clone_index(inner)
            faiss.extract_index_ivf(copy).make_direct_map()
            vectors = copy.reconstruct_n(0, n)
        keep = ~np.isin(self._held_ids(), self._removed)
        return np.ascontiguousarray(vectors[keep], dtype=np.float32)

    def ids(self) -> np.ndarray:
        """(ntotal,) int64 ids held and not removed, in insertion order."""
        held = faiss.vector_to_array(self._index.id_map).astype(np.int64, copy=False)
        return held[~np.isin(held, self._removed)] if len(self._removed) else held

    # ------------------------------------------------------------------ files

    def save(self, path: str | os.PathLike) -> None:
        """Write atomically: serialise to a temporary file beside the target, fsync, then rename over it.

        Tombstones go to their sidecar first when there are any (tombstones.write_sidecar), and the sidecar is
        deleted after the FAISS file when there are none.
        """
        path = Path(path)
        if len(self._removed):
            write_sidecar(path, self._removed)
        # faiss.write_index streams into the file: no second in-memory copy of the index (serialize_index made one).
        write_atomic_with(path, lambda tmp: faiss.write_index(self._index, tmp))
        if not len(self._removed):
            sidecar_path(path).unlink(missing_ok=True)
        fsync_dir(path.parent)

    @classmethod
    def load(
        cls, path: str | os.PathLike, factory: str = "Flat", device: str = "cpu", backend: str = "auto"
    ) -> VectorIndex:
        """Read a file written by `save`; `factory` is recorded as given (FAISS files do not keep the string)."""
        path = Path(path)
        if not path.exists():
            raise CorruptIndexError(f"{path}: missing")
        if not os.access(path, os.R_OK) or not path.is_file():
            raise CorruptIndexError(f"{path}: cannot read (not a readable file)")
        try:
            index = faiss.read_index(str(path))  # reads straight into the index: no whole-file buffer beside it
        except RuntimeError:
            raise CorruptIndexError(f"{path}: not a readable FAISS index") from None
        if not isinstance(index, faiss.IndexIDMap2):
            raise CorruptIndexError(f"{path}: not a siamesedb FAISS index (no id map)")
        if index.metric_type not in INDEX_METRICS.values():
            raise CorruptIndexError(f"{path}: not a siamesedb FAISS index (metric is neither inner product nor L2)")
        loaded = cls(index.d, factory=factory, _index=index, device=device, backend=backend)
        loaded._removed = read_sidecar(path, loaded._held_ids())
        return loaded

    @classmethod
    def from_vectors(
        cls,
        vectors: np.ndarray,
        ids: np.ndarray,
        factory: str = "Flat",
        memory_budget: int | None = None,
        device: str = "cpu",
        backend: str = "auto",
        metric: str = "inner_product",
    ) -> VectorIndex:
        """A new index trained (when the factory needs it) and filled with (n, d) vectors under (n,) ids.

        factory="auto" picks one with `choose_factory(n, d, memory_budget)` and its `auto_search_defaults`.
        """
        array = np.asarray(vectors)
        if array.ndim != 2:
            raise InvalidInputError(f"vectors must be a 2-D array (n, d), got shape {array.shape}")
        chosen = choose_factory(len(array), array.shape[1], memory_budget) if factory == AUTO else factory
        index = cls(array.shape[1], factory=chosen, device=device, backend=backend, metric=metric)
        index.train(array)
        index.add(array, ids)
        if factory == AUTO:
            index.set_search_defaults(**auto_search_defaults(chosen, len(array)))
        return index
