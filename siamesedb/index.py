"""VectorIndex: a FAISS index (any factory string) behind the (D, I) contract, with ids; no torch import."""

from __future__ import annotations

import io
import math
import os
import re
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import faiss
import numpy as np

from siamesedb.checks import as_ids, as_k, as_positive, as_vectors
from siamesedb.files import fsync_dir, write_atomic, write_atomic_with
from siamesedb.errors import CorruptIndexError, InvalidInputError


def _faiss_reason(exc: Exception) -> str:
    """FAISS's own message without the C++ signature and source location, on one line."""
    text = str(exc).strip().splitlines()[-1] if str(exc).strip() else type(exc).__name__
    # "Error in <signature> at /path/File.cpp:57: Error: 'cond' failed: what went wrong"
    match = re.search(r" at \S+:\d+: (?:Error: )?(.*)$", text)
    reason = match.group(1) if match else text
    return reason.split("' failed: ", 1)[1] if "' failed: " in reason else reason


# The argument checks every backend shares (one set: a backend refuses exactly what this index refuses).
_as_matrix = as_vectors


def _as_ids(ids: np.ndarray, n: int) -> np.ndarray:
    return as_ids(ids, n, unique=True)


_as_k = as_k


# Index metrics as the manifest names them, and the FAISS metric each one searches with.
INDEX_METRICS = {"inner_product": faiss.METRIC_INNER_PRODUCT, "l2": faiss.METRIC_L2}
METRIC_OF_ENCODER = {"cosine": "inner_product", "euclidean": "l2"}  # encoder metric -> index metric


def l2_scores(distances: np.ndarray) -> np.ndarray:
    """FAISS's squared L2 distances -> scores, higher = more similar: minus the distance (FAISS pads with FLT_MAX,
    which the caller turns into -inf by the id -1 beside it)."""
    return np.subtract(0, np.sqrt(np.maximum(distances, 0)), dtype=np.float32)  # 0 - d: an exact match scores 0, not -0


AUTO = "auto"  # factory value resolved by choose_factory from the collection size and a memory budget
FLAT_BELOW = 10_000  # below this many vectors exact search is < 1 ms a query at 64-d: no approximation needed
IVF_FLAT_BELOW = 1_000_000  # autofaiss's ivf_flat_threshold: above it, IVF,Flat scans too many full vectors
DEFAULT_MEMORY_BUDGET = 4 * 2**30  # bytes the index may use when the caller names no budget
_ID_MAP_BYTES = 24  # IndexIDMap2 per vector: the int64 id plus its entry in the reverse hash map (estimate)
_PQ_SIZES = (64, 48, 32, 24, 16, 12, 8, 4)  # bytes per PQ code tried, largest (most accurate) first
COMPACT_FRACTION = 0.1  # rebuild a graph index once this share of what it holds is removed
COMPACT_BELOW = 10_000  # ...or at once when it holds fewer vectors than this (a rebuild costs well under a second)


def ivf_lists(n_vectors: int) -> int:
    """Inverted lists for an IVF index over n vectors: FAISS's guideline of 4*sqrt(n), as a power of two, capped
    so k-means gets the 39 training points per centroid FAISS asks for (at least one list)."""
    n = max(1, int(n_vectors))
    target = 2 ** round(math.log2(4 * math.sqrt(n)))
    cap = 2 ** int(math.floor(math.log2(max(1, n // 39))))
    return int(max(1, min(target, cap)))


def estimated_bytes(factory: str, n_vectors: int, dim: int) -> int:
    """Rough memory an index of this factory takes for n vectors (the rule's arithmetic, not a measurement)."""
    n, per_id = int(n_vectors), _ID_MAP_BYTES
    if factory == "Flat":
        return n * (4 * dim + per_id)
    if match := re.fullmatch(r"HNSW(\d+)", factory):
        # Level 0 keeps 2*M int32 links per vector; upper levels add ~1/M of that, folded into the 8*M.
        return n * (4 * dim + 8 * int(match.group(1)) + per_id)
    if match := re.fullmatch(r"IVF(\d+),Flat", factory):
        return n * (4 * dim + per_id) + int(match.group(1)) * 4 * dim
    if match := re.fullmatch(r"IVF(\d+),PQ(\d+)", factory):
        return n * (int(match.group(2)) + per_id) + int(match.group(1)) * 4 * dim + 256 * 4 * dim
    raise InvalidInputError(f"no memory estimate for factory {factory!r}")


def choose_factory(n_vectors: int, dim: int, memory_budget: int | None = None) -> str:
    """The `--factory auto` rule, after autofaiss's (`get_optimal_index_keys_v2`), with exactness preferred:

    1. fewer than FLAT_BELOW vectors: `Flat` (exact; brute force is fast at this size and removes natively);
    2. an HNSW graph if one with M >= 8 fits the budget: `HNSW{M}`, M = min(32, what fits);
    3. below IVF_FLAT_BELOW vectors, `IVF{nlist},Flat` if full vectors fit (nlist from `ivf_lists`);
    4. else `IVF{nlist},PQ{m}` with the largest code size m (dividing dim) that fits.

    `memory_budget` is in bytes (default DEFAULT_MEMORY_BUDGET); a budget nothing fits in is an error.
    """
    n, dim = int(n_vectors), int(dim)
    if n < 0 or dim < 1:
        raise InvalidInputError(f"need a non-negative size and a positive dimension, got {n} and {dim}")
    budget = DEFAULT_MEMORY_BUDGET if memory_budget is None else int(memory_budget)
    if budget <= 0:
        raise InvalidInputError(f"memory budget must be positive, got {budget}")
    if n < FLAT_BELOW:
        return "Flat"
    m_hnsw = int((budget / n - 4 * dim - _ID_MAP_BYTES) // 8)
    if m_hnsw >= 8:
        return f"HNSW{min(m_hnsw, 32)}"
    nlist = ivf_lists(n)
    if n < IVF_FLAT_BELOW and estimated_bytes(f"IVF{nlist},Flat", n, dim) <= budget:
        return f"IVF{nlist},Flat"
    for m in _PQ_SIZES:
        if m <= dim // 2 and dim % m == 0 and estimated_bytes(f"IVF{nlist},PQ{m}", n, dim) <= budget:
            return f"IVF{nlist},PQ{m}"
    raise InvalidInputError(
        f"no index type fits {n} {dim}-d vectors in {budget} bytes (the smallest, IVF{nlist},PQ4, needs about "
        f"{estimated_bytes(f'IVF{nlist},PQ4', n, dim)}); raise the memory budget"
    )


HNSW_EF_LARGE_FROM = 500_000  # from this many vectors an auto HNSW index searches with efSearch 128, not 64


def auto_search_defaults(factory: str, n_vectors: int = 0) -> dict[str, int]:
    """Search parameters an `auto` index over n vectors starts with, by measurement (tools/bench_search.py on
    clustered 64-d vectors, BENCHMARKS.md "Search"): FAISS's own (nprobe 1, efSearch 16) gave recall@10 0.96 / 0.96
    at 100k; nprobe 16 gave 1.000 at 100k and 1M; efSearch 64 gave 0.983 at 100k but 0.929 at 1M, where 128 gave
    0.966."""
    if match := re.match(r"IVF(\d+)", factory):
        return {"nprobe": min(int(match.group(1)), 16)}
    if factory.startswith("HNSW"):
        return {"ef_search": 128 if n_vectors >= HNSW_EF_LARGE_FROM else 64}
    return {}


def _skip_polysemous_training(index: faiss.Index) -> None:
    """index_factory turns on polysemous training for PQ codes: a long annealing that only polysemous (Hamming
    filtered) search uses, which siamesedb never does. Off, IVF,PQ trains several times faster, codes unchanged."""
    index = faiss.downcast_index(index)
    if isinstance(index, faiss.IndexPreTransform):
        index = faiss.downcast_index(index.index)
    if isinstance(index, (faiss.IndexPQ, faiss.IndexIVFPQ)):
        index.do_polysemous_training = False


class VectorIndex:
    """FAISS IndexIDMap2 over `faiss.index_factory(dim, factory, metric)`.

    metric "inner_product" (the default): scores are inner products of L2-normalised vectors (cosine similarity).
    metric "l2": FAISS's METRIC_L2 natively (every factory), and scores are minus the Euclidean distance. Either
    way higher is more similar. Where fewer than k results exist, I holds -1 and D holds -inf, so callers never
    mistake padding for a hit.

    Removal works for every factory: where FAISS cannot remove correctly (HNSW graphs; IVF, whose positions
    IndexIDMap2 would mismatch after a removal), removed ids become tombstones that every search filters out with an
    IDSelector, kept beside the FAISS file in `<file>.removed.npy`, until `compact()` rebuilds the index without
    them (`needs_compaction` says when that is worthwhile).

    `device` / `backend` choose where search runs: "cpu" + "faiss" (the default) is FAISS on the CPU; "cuda" uses
    FAISS's GPU index when the installed faiss has GPU support and otherwise an exact torch search on the GPU
    (siamesedb.torch_search); backend="torch" forces that exact torch search, also on the CPU (for testing).
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
            try:
                inner = faiss.index_factory(self.dim, factory, INDEX_METRICS[metric])
            except RuntimeError as exc:
                raise InvalidInputError(f"bad FAISS factory string {factory!r}: {_faiss_reason(exc)}") from None
            _skip_polysemous_training(inner)
            # IndexIDMap2 (not IndexIDMap): keeps a reverse map, so ids can be removed and vectors reconstructed.
            _index = faiss.IndexIDMap2(inner)
        self._index = _index
        self._removed = np.empty(0, dtype=np.int64)  # sorted tombstoned ids (only for indexes that cannot remove)
        self._native_remove = self._probe_remove()
        self.device, self.backend = _resolve_search_device(device, backend)
        self._accelerated: Any = None  # a GPU FAISS copy or a torch exact searcher, rebuilt lazily after changes

    # ------------------------------------------------------------------ state

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
        """Whether rebuilding without the tombstones is worthwhile: COMPACT_FRACTION of the graph removed, or a
        graph small enough (< COMPACT_BELOW) that a rebuild is cheaper than carrying dead nodes."""
        if not len(self._removed):
            return False
        held = int(self._index.ntotal)
        return len(self._removed) >= COMPACT_FRACTION * held or held < COMPACT_BELOW

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
        inner = self._inner()
        pre = inner if isinstance(inner, faiss.IndexPreTransform) else None
        core = faiss.downcast_index(pre.index) if pre is not None else inner
        ivf = faiss.try_extract_index_ivf(core)
        hnsw = core if isinstance(core, faiss.IndexHNSW) else None
        if ivf is not None:
            quantizer = faiss.downcast_index(ivf.quantizer)
            hnsw = quantizer if isinstance(quantizer, faiss.IndexHNSW) else None
        return pre, ivf, hnsw

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

    def _search_params(self, nprobe: int | None, ef_search: int | None, selector: Any) -> tuple[Any, list]:
        """(FAISS SearchParameters for this index's structure or None, the objects it points to).

        FAISS keeps raw pointers to nested parameters and selectors: the caller holds the list until the search ends.
        """
        if nprobe is None and ef_search is None and selector is None:
            return None, []
        pre, ivf, hnsw = self._parts()
        keep: list = []
        if ivf is not None:
            params = faiss.SearchParametersIVF()
            params.nprobe = nprobe if nprobe is not None else int(ivf.nprobe)
            if ef_search is not None:  # an HNSW coarse quantiser (IVF..._HNSW32)
                quantizer_params = faiss.SearchParametersHNSW()
                quantizer_params.efSearch = ef_search
                params.quantizer_params = quantizer_params
                keep.append(quantizer_params)
        elif hnsw is not None:
            params = faiss.SearchParametersHNSW()
            params.efSearch = ef_search if ef_search is not None else int(hnsw.hnsw.efSearch)
        else:
            params = faiss.SearchParameters()
        if selector is not None:
            params.sel = selector
        if pre is not None:
            outer = faiss.SearchParametersPreTransform()
            outer.index_params = params
            return outer, [params, *keep]
        return params, keep

    # ------------------------------------------------------------------ writing

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
            return int(len(live))
        try:
            removed = int(self._index.remove_ids(faiss.IDSelectorBatch(array)))
        except RuntimeError as exc:  # raised before anything changes: the index stays whole
            raise InvalidInputError(f"the {self.factory!r} index cannot remove vectors ({_faiss_reason(exc)})") from None
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
        vectors = _as_matrix(vectors, self.dim)
        ids = _as_ids(ids, len(vectors))
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
        """(D (nq, k) float32 scores best first, I (nq, k) int64 ids); -inf / -1 where fewer than k exist.

        `nprobe` (IVF: inverted lists visited) and `ef_search` (HNSW: candidate list size) apply to this call only;
        bigger means slower and closer to exact. Exact backends (Flat, the torch search) accept and ignore them.
        """
        k = _as_k(k)
        queries = _as_matrix(queries, self.dim, "queries")
        nprobe, ef_search = self._check_params(nprobe, ef_search)
        nq = len(queries)
        if self.ntotal == 0 or nq == 0:
            return np.full((nq, k), -np.inf, dtype=np.float32), np.full((nq, k), -1, dtype=np.int64)
        if self.backend != "faiss":
            D, I = self._accelerated_search(queries, k, nprobe)
        else:
            D, I = self._faiss_search(queries, k, nprobe, ef_search)
        # FAISS pads with I = -1 and D = -FLT_MAX (inner product) / FLT_MAX (L2); -inf cannot be mistaken for a score.
        D = np.where(I < 0, np.float32(-np.inf), D).astype(np.float32, copy=False)
        return D, I.astype(np.int64, copy=False)

    def _faiss_search(self, queries: np.ndarray, k: int, nprobe: int | None, ef_search: int | None):
        kernel = _tune_cpu_blas(len(queries))
        # A small batch on a Flat index: FAISS's scan on one thread (see SMALL_BATCH).
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
        params, keep = self._search_params(nprobe, ef_search, sel)
        with _faiss_threads(threads):
            D, I = self._index.search(queries, k, params=params)
        del batch, sel, params, keep  # these had to outlive the search call
        return (l2_scores(D) if self.metric == "l2" else D), I

    def _accelerated_search(self, queries: np.ndarray, k: int, nprobe: int | None):
        if self._accelerated is None:
            self._accelerated = self._make_accelerated()
        return self._accelerated(queries, k, nprobe)

    def _make_accelerated(self) -> Any:
        """A search function (queries, k, nprobe) -> (D, I): FAISS's GPU copy of this index, or where that is not
        possible (no GPU faiss, or a type FAISS cannot put on a GPU, such as HNSW) the exact torch search."""
        if self.backend == "faiss-gpu":  # pragma: no cover - needs a GPU build of faiss
            try:
                return _GpuFaiss(self).search
            except RuntimeError:
                pass
        from siamesedb.torch_search import TorchExactSearch

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

        Tombstones go to `<path>.removed.npy` first when there are any (a crash between the two writes leaves old
        vectors with newer tombstones: ids already removed, never a removed id back), and the sidecar is deleted
        after the FAISS file when there are none.
        """
        path = Path(path)
        sidecar = _removed_path(path)
        if len(self._removed):
            buffer = io.BytesIO()
            np.save(buffer, self._removed)
            write_atomic(sidecar, buffer.getvalue())
        # faiss.write_index streams into the file: no second in-memory copy of the index (serialize_index made one).
        write_atomic_with(path, lambda tmp: faiss.write_index(self._index, tmp))
        if not len(self._removed):
            sidecar.unlink(missing_ok=True)
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
        sidecar = _removed_path(path)
        if sidecar.exists():
            try:
                removed = np.load(sidecar, allow_pickle=False)
            except (OSError, ValueError) as exc:
                raise CorruptIndexError(f"{sidecar}: unreadable ({exc})") from None
            if removed.dtype != np.int64 or removed.ndim != 1 or not np.isin(removed, loaded._held_ids()).all():
                raise CorruptIndexError(f"{sidecar}: tombstones do not match {path.name}")
            loaded._removed = np.unique(removed)
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


class _GpuFaiss:  # pragma: no cover - needs a GPU build of faiss
    """A GPU copy of the inner FAISS index; positions map back to ids through the CPU index's id map."""

    def __init__(self, index: VectorIndex):
        self.resources = faiss.StandardGpuResources()
        self.gpu = faiss.index_cpu_to_gpu(self.resources, 0, index._index.index)
        held = index._held_ids().copy()
        self.position_ids = held
        self.removed = index._removed
        self.k_extra = len(index._removed)  # tombstones: fetch that many more, then drop them
        self.metric = index.metric

    def search(self, queries: np.ndarray, k: int, nprobe: int | None):
        default = getattr(self.gpu, "nprobe", None)
        if nprobe is not None and default is not None:
            self.gpu.nprobe = nprobe
        try:
            D, P = self.gpu.search(queries, k + self.k_extra)
        finally:
            if default is not None:
                self.gpu.nprobe = default
        I = np.where(P >= 0, self.position_ids[np.maximum(P, 0)], -1)
        if self.metric == "l2":
            D = l2_scores(D)
        if self.k_extra:
            dead = np.isin(I, self.removed)
            order = np.argsort(dead, axis=1, kind="stable")  # live results first, their order kept
            D, I = np.take_along_axis(D, order, 1), np.take_along_axis(np.where(dead, -1, I), order, 1)
        return D[:, :k], I[:, :k]


# The exact kernel, chosen by measurement (tools/bench_exact.py, BENCHMARKS.md "Exact search kernels"; 2-core shared
# CPU, 64-d, 10k / 100k / 1M vectors, 1 / 100 / 1,000 queries, FAISS at 1 and 2 threads):
# - from SMALL_BATCH queries on: FAISS's exhaustive search with BLAS forced (distance_compute_blas_threshold 0; FAISS's
#   own threshold of queries x dim >= 128000 means no BLAS below 2,000 queries at 64-d) in database blocks of 4096, at
#   any thread count: 1.4-3.9x FAISS's own settings, and faster than the torch matmul + top-k everywhere;
# - below SMALL_BATCH: FAISS's own SIMD scan (no BLAS), on ONE thread for a Flat index: a single query searched 1M
#   vectors in 10.8 ms on one thread, 20.3 ms on two (BLAS forced: 40 ms), and beat torch (13.9 ms) too.
# The BLAS settings are process-wide FAISS variables, set before every search (cheap): the choice depends only on
# the batch size, so a query gets the same floats from any thread. (Two threads searching at once with batches on
# either side of SMALL_BATCH may briefly run one with the other's setting: only speed changes, never the ids.)
SMALL_BATCH = 20  # FAISS's historical BLAS threshold; measured: 1 query (scan wins) and 100 (BLAS wins)
CPU_BLAS_THRESHOLD: int | None = 0  # None: leave FAISS's own settings alone
CPU_BLAS_DATABASE_BS: int | None = 4096
_faiss_blas_default = (faiss.cvar.distance_compute_blas_threshold, faiss.cvar.distance_compute_blas_database_bs)


def exact_kernel(queries: int) -> str:
    """The kernel an exhaustive search of this many queries runs: "faiss-blas" or "faiss-scan" (FAISS's own scan,
    one thread for a Flat index)."""
    return "faiss-scan" if queries < SMALL_BATCH or CPU_BLAS_THRESHOLD is None else "faiss-blas"


def _tune_cpu_blas(queries: int) -> str:
    """Set FAISS's BLAS variables for an exhaustive search of `queries` queries; returns `exact_kernel(queries)`."""
    kernel = exact_kernel(queries)
    if kernel == "faiss-blas":
        threshold, block = CPU_BLAS_THRESHOLD, CPU_BLAS_DATABASE_BS or _faiss_blas_default[1]
    else:
        threshold, block = _faiss_blas_default
    if faiss.cvar.distance_compute_blas_threshold != threshold:
        faiss.cvar.distance_compute_blas_threshold = threshold
    if faiss.cvar.distance_compute_blas_database_bs != block:
        faiss.cvar.distance_compute_blas_database_bs = block
    return kernel


@contextmanager
def _faiss_threads(threads: int | None) -> Iterator[None]:
    """Run FAISS with `threads` OpenMP threads in this thread only (OpenMP's count is per calling thread), then
    restore; None changes nothing."""
    before = faiss.omp_get_max_threads()
    if threads is None or threads == before:
        yield
        return
    faiss.omp_set_num_threads(threads)
    try:
        yield
    finally:
        faiss.omp_set_num_threads(before)


def faiss_has_gpu() -> bool:
    """Whether the installed faiss is a GPU build that sees at least one GPU."""
    return hasattr(faiss, "StandardGpuResources") and getattr(faiss, "get_num_gpus", lambda: 0)() > 0


def _resolve_search_device(device: str, backend: str) -> tuple[str, str]:
    """("cpu" | "cuda", "faiss" | "faiss-gpu" | "torch"). Imports torch only when asked about CUDA or torch."""
    if device not in ("auto", "cpu", "cuda"):
        raise InvalidInputError(f"device must be auto, cpu or cuda, got {device!r}")
    if backend not in ("auto", "faiss", "torch"):
        raise InvalidInputError(f"search backend must be auto, faiss or torch, got {backend!r}")
    if device == "auto":
        device = "cuda" if (faiss_has_gpu() or _torch_cuda()) else "cpu"
    if device == "cuda" and not (faiss_has_gpu() or _torch_cuda()):
        raise InvalidInputError("device 'cuda' asked for, but neither faiss nor torch sees a GPU")
    if backend == "torch":
        return device, "torch"
    if device == "cpu":
        return device, "faiss"
    if backend == "faiss" and not faiss_has_gpu():
        raise InvalidInputError("backend 'faiss' on cuda needs a GPU build of faiss (pip install faiss-gpu-cu12)")
    return device, "faiss-gpu" if faiss_has_gpu() else "torch"


def _torch_cuda() -> bool:
    try:
        import torch
    except ImportError:
        return False
    return bool(torch.cuda.is_available())


def _removed_path(path: Path) -> Path:
    return path.with_name(path.name + ".removed.npy")
