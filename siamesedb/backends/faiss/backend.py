"""FaissBackend, the embedded VectorBackend: items.sqlite is the truth, vectors.faiss a FAISS index derived from it.

Write order for every change: store transaction first (the durable truth), then the FAISS file (`save`), then the
caller's manifest, which records the store version the FAISS file mirrors. A crash between steps leaves a manifest
that names an older store version, and the next open rebuilds the FAISS file from the store instead of trusting it.

FAISS details stay here: training (IVF / PQ train once the store holds enough vectors; until then searches run
exactly over the store), HNSW tombstones and compaction, the device a search runs on, the file's freshness.
Threads: one handle may be searched from many threads while one of them writes (a server). The store gives each
thread its own SQLite connection (store.py), and the in-memory FAISS index is guarded by a ReadWriteLock: searches
and the file save share it, and only the in-place FAISS change of a write (add, remove) is exclusive; a rebuilt index
is made aside and swapped in by one assignment, so a search runs on the old index or the new one, never half of one.
backend_options: "device" (auto | cpu | cuda | cuda:N, default cpu) and "search_backend" (auto | faiss | torch).
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from contextlib import AbstractContextManager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import numpy as np

import siamesedb.backends.faiss.factory as factory_policy
from siamesedb.backends.base import BackendBase
from siamesedb.backends.faiss.factory import METRIC_OF_ENCODER
from siamesedb.backends.faiss.index import VectorIndex
from siamesedb.backends.faiss.store import ItemStore
from siamesedb.backends.items import Item, LabelFilter
from siamesedb.checks import as_k
from siamesedb.errors import (
    CorruptIndexError,
    DimensionMismatchError,
    IndexExistsError,
    InvalidInputError,
)
from siamesedb.locking import ReadWriteLock
from siamesedb.scoring import brute_force_search

STORE_FILE = "items.sqlite"  # the truth: every item
VECTORS_FILE = "vectors.faiss"  # derived: the FAISS index over the store's vectors (+ .removed.npy tombstones)
TRAIN_SAMPLE = 131072  # rows an untrained index (IVF...) is trained on, from the start of a bulk add


@dataclass(frozen=True)
class Appended:
    """Rows other processes appended between two store versions, as a catch-up took them: (n,) ids ascending,
    their labels, paths and (n, D) stored vectors."""

    start: int
    version: int
    ids: np.ndarray
    labels: list[str]
    paths: list[str]
    vectors: np.ndarray


class FaissBackend(BackendBase):
    """The items of one index folder in SQLite, searched through FAISS (see the module docstring)."""

    name: ClassVar[str] = "faiss"
    reindexable: ClassVar[bool] = True

    def __init__(self, path: Path, store: ItemStore, index: VectorIndex, device: str = "cpu",
                 search_backend: str = "auto"):
        self.path = Path(path)
        self._store = store
        self.index = index
        self.dimension = index.dim
        self.metric = "euclidean" if index.metric == "l2" else "cosine"
        self.items_file = self.path / STORE_FILE
        self.fresh = True
        self._search_args = {"device": device, "backend": search_backend}  # VectorIndex's keywords
        # The store version the in-memory FAISS index mirrors: a write that finds the store moved on (another
        # process wrote since) rebuilds it first, so this handle never writes a FAISS file missing their items.
        self._index_version: int | None = None
        self._max_id: int | None = None  # the largest id held at _index_version (None: not known, then no appends
        # are followed: follow_appends)
        self._guard = ReadWriteLock()  # searches and saves share; the in-place FAISS change of a write is exclusive

    @property
    def store(self) -> ItemStore:
        """The SQLite item store (items.sqlite)."""
        return self._store

    # ------------------------------------------------------------------ index types, creating, opening, saving

    @classmethod
    def check_factory(cls, factory: str, dimension: int) -> None:
        factory_policy.check_factory(factory, dimension)

    @classmethod
    def resolve_factory(cls, factory: str, dimension: int, expected_items: int = 0,
                        memory_budget: int | None = None) -> tuple[str, dict[str, int]]:
        return factory_policy.resolve_factory(factory, dimension, expected_items, memory_budget)

    @classmethod
    def holds_items(cls, path: Path) -> bool:
        store_path = Path(path) / STORE_FILE
        return store_path.exists() and ItemStore.holds_items(store_path)

    @classmethod
    def create(cls, path: Path, dimension: int, metric: str, factory: str, search_defaults: dict[str, int],
               options: Mapping[str, Any]) -> tuple[FaissBackend, dict[str, Any]]:
        """A new, empty store beside an empty FAISS index (under the caller's write lock). An empty store left by a
        creation cut short is started over; one holding items is refused."""
        device, search_backend = options.get("device", "cpu"), options.get("search_backend", "auto")
        index = VectorIndex(dimension, factory=factory, device=device, backend=search_backend,
                            metric=METRIC_OF_ENCODER[metric])
        index.set_search_defaults(**search_defaults)
        store_path = path / STORE_FILE
        if store_path.exists():
            if cls.holds_items(path):
                raise IndexExistsError(f"{path}: {STORE_FILE} holds items but there is no manifest; move the folder aside")
            for suffix in ("", "-wal", "-shm"):
                Path(f"{store_path}{suffix}").unlink(missing_ok=True)
        backend = cls(path, ItemStore(store_path, dim=index.dim), index, device, search_backend)
        backend._index_version, backend._max_id = backend.store.version, 0
        return backend, {"vectors_store_version": backend.version}

    @classmethod
    def open(cls, path: Path, manifest: dict[str, Any], metric: str, options: Mapping[str, Any]) -> FaissBackend:
        """Open the store and load the FAISS file if it mirrors the store's version, else rebuild it in memory
        (`fresh` says which; the caller saves a rebuilt one when it can take the write lock)."""
        device, search_backend = options.get("device", "cpu"), options.get("search_backend", "auto")
        dim = int(manifest["dimension"])
        if not (path / STORE_FILE).exists():
            raise CorruptIndexError(f"{path / STORE_FILE}: missing (the store is the index's truth)")
        store = ItemStore(path / STORE_FILE)  # reads its own dimension; compared with the manifest's below
        if store.dim is not None and store.dim != dim:
            store.close()
            raise DimensionMismatchError(f"{path / STORE_FILE}: store holds {store.dim}-d vectors, manifest says {dim}")
        index = VectorIndex(dim, factory=manifest.get("factory", "Flat"), device=device, backend=search_backend,
                            metric=METRIC_OF_ENCODER[metric])
        backend = cls(path, store, index, device, search_backend)
        backend.fresh = backend._load_file(manifest)
        return backend

    def _load_file(self, manifest: dict[str, Any]) -> bool:
        """Load vectors.faiss when it mirrors the store; else rebuild from the store. Returns whether it loaded."""
        with self.store.snapshot():  # version and count of one committed state, even while a writer commits
            version, count, max_id = self.store.version, self.store.count(), self.store.max_id()
        index = self._saved_index(manifest, version, count)
        if index is not None and index.dim == self.dimension and index.metric == self.index.metric:
            self.index = index
            self._index_version, self._max_id = version, max_id
            return True
        self.index = self.index_from_store(manifest)
        return False

    def _saved_index(self, manifest: dict[str, Any], version: int, count: int) -> VectorIndex | None:
        """vectors.faiss when the manifest says it mirrors store version `version` and it holds `count` vectors;
        None when it does not, or is missing or unreadable (derived data: the caller rebuilds it)."""
        vectors_path = self.path / VECTORS_FILE
        if manifest.get("vectors_store_version") != version or not vectors_path.exists():
            return None
        try:
            index = VectorIndex.load(vectors_path, factory=manifest.get("factory", "Flat"), **self._search_args)
        except CorruptIndexError:
            return None
        return index if index.ntotal == count else None

    def index_from_store(self, manifest: dict[str, Any], factory: str | None = None) -> VectorIndex:
        """A fresh FAISS index over one committed state of the store, keeping the manifest's search defaults
        (nprobe, efSearch) for the same type; records which store version it mirrors.

        A factory that needs training and cannot train on what the store holds yet (fewer vectors than IVF lists
        or PQ centroids) stays untrained and empty: searches then run exactly over the store until it can.
        """
        with self.store.snapshot():
            version = self.store.version
            ids, vectors = self.store.vectors()
        factory = factory or manifest.get("factory", "Flat")
        index = VectorIndex(self.dimension, factory=factory, metric=self.index.metric, **self._search_args)
        self._index_version, self._max_id = version, int(ids.max()) if len(ids) else 0
        if len(ids):
            if not index.is_trained:
                try:
                    index.train(vectors)
                except InvalidInputError:
                    return index
            index.add(vectors, ids)
        if factory == manifest.get("factory") and manifest.get("search_defaults"):
            index.set_search_defaults(**manifest["search_defaults"])
        return index

    def catch_up(self, manifest: dict[str, Any]) -> Appended | None:
        """Under the write lock: bring the FAISS index up to the store when it moved on since it was made (another
        process wrote, or a write of ours failed part-way): by the appended rows alone when only appends followed
        (returned, for the caller's tables), else by a rebuild."""
        if self._index_version is None or self._index_version != self.store.version:
            appended = self.follow_appends()
            if appended is not None:
                return appended
            self.index = self.index_from_store(manifest)
        return None

    def follow_appends(self) -> Appended | None:
        """Add to the in-memory index the rows other processes appended since the version it mirrors, when the
        store's `rewrite_version` says nothing but appends happened since (their ids are above every id held then:
        AUTOINCREMENT); None when that cannot be said (a removal, an import with given ids, paths rerooted, an
        untrained index, an unknown start): the caller rebuilds. O(rows appended) instead of O(items)."""
        start, max_id = self._index_version, self._max_id
        if start is None or max_id is None or not self.index.is_trained:
            return None
        with self.store.snapshot():  # version, its rewrite mark and the new rows: one committed state
            version, rewrite = self.store.version, self.store.rewrite_version
            if version == start or rewrite is None or rewrite > start:
                return None
            chunks = list(self.store.iter_rows("label, path, vector", after=max_id))
        rows = [row for _, part in chunks for row in part]
        ids = np.concatenate([part_ids for part_ids, _ in chunks]) if chunks else np.empty(0, np.int64)
        vectors = np.frombuffer(b"".join(r[2] for r in rows), dtype="<f4").reshape(len(rows), self.dimension)
        if len(ids):
            with self._guard.writing():
                self.index.add(np.asarray(vectors, dtype=np.float32), ids)
        self._index_version, self._max_id = version, int(ids.max()) if len(ids) else max_id
        return Appended(start, version, ids, [r[0] for r in rows], [r[1] for r in rows], vectors)

    def begin_write(self) -> int | None:
        """The store version a write starts from (under the write lock, after catch_up)."""
        return self._index_version

    def end_write(self, started_at: int | None, failed: bool) -> None:
        """After a write under the lock: a clean one leaves the index in step with the store; a failed one that
        changed the store (part-way) makes the next write rebuild first. A refused write changed nothing."""
        if not failed:
            self._index_version, self._max_id = self.store.version, self.store.max_id()  # under the write lock
            return
        try:
            unchanged = started_at is not None and self.store.version == started_at
        except Exception:  # noqa: BLE001 - a store that cannot say its version: rebuild to be safe
            unchanged = False
        if not unchanged:
            self._index_version = self._max_id = None

    def save(self) -> dict[str, Any]:
        """Write vectors.faiss (atomically); returns the manifest fields that must be saved with it. OSError
        passes to the caller (it turns the disk's refusal into a StorageError)."""
        with self._guard.reading():  # searches go on while the file is written (writes are serialised anyway)
            self.index.save(self.path / VECTORS_FILE)
        return {"search_defaults": self.index.search_defaults, "vectors_store_version": self.store.version}

    def refresh(self, manifest: dict[str, Any]) -> Appended | None:
        """A reader catching up with another process's writes: the FAISS file when it mirrors the store's current
        version, else a rebuild in memory (never written: a reader must not race the writer for the files).
        Keeps this handle's search device, as open() gave it."""
        version = self.store.version
        if self._index_version is not None and self._index_version != version:
            appended = self.follow_appends()  # another process only added: take its new rows alone
            if appended is not None:
                return appended
        index = self._saved_index(manifest, version, self.store.count())
        if index is not None:
            self.index = index
            self._index_version, self._max_id = version, None  # (the largest id of that file is not read here)
        elif self._index_version != version:  # else the index in memory mirrors the store already: this handle's
            self.index = self.index_from_store(manifest)  # own write, whose file save is still to come
        return None

    def reindex(self, manifest: dict[str, Any], factory: str) -> VectorIndex:
        """A FAISS index of type `factory` rebuilt from every stored vector (tombstones dropped); made the live one."""
        self.index = self.index_from_store(manifest, factory)
        return self.index

    def close(self) -> None:
        self.store.close()

    @property
    def closed(self) -> bool:
        return self.store.closed

    # ------------------------------------------------------------------ writes

    def bulk_sample(self, sample: np.ndarray) -> None:
        """Before a bulk add into an empty, untrained index (IVF / PQ): train on up to TRAIN_SAMPLE rows of it, not
        just the first transaction's worth. Too few rows to train: stay untrained; `add` trains once there are."""
        if len(sample) and self.store.count() == 0 and not self.index.is_trained:
            try:
                self.index.train(np.asarray(sample[:TRAIN_SAMPLE], dtype=np.float32))
            except InvalidInputError:
                pass

    def add(self, ids: np.ndarray | None, labels: Sequence[str], paths: Sequence[str], hashes: Sequence[str],
            vectors: np.ndarray) -> np.ndarray:
        self._max_id = None  # the index moves ahead of _index_version: appends are followed again after end_write
        if ids is None:
            ids = self.store.add(labels, paths, hashes, vectors)
        else:
            ids = np.asarray(ids, dtype=np.int64)
            self.store.insert_with_ids(ids, labels, paths, hashes, vectors)
        if self.index.is_trained:
            with self._guard.writing():  # the only part searches wait for: FAISS changes its arrays in place
                self.index.add(np.asarray(vectors, dtype=np.float32), ids)
        else:
            # Train on everything stored so far once there is enough of it (IVF / PQ); until then search is exact.
            self.index = self.index_from_store(self._own_settings())
        return ids

    def _own_settings(self) -> dict[str, Any]:
        """This index's type and search defaults, as a manifest would name them (for a rebuild keeping both)."""
        return {"factory": self.index.factory, "search_defaults": self.index.search_defaults}

    def remove(self, ids: np.ndarray) -> int:
        ids = np.unique(np.atleast_1d(np.asarray(ids, dtype=np.int64)))
        present = np.asarray([item.id for item in self.store.items(ids) if item is not None], dtype=np.int64)
        self.store.remove_ids(present)
        self._drop_from_index(present)
        return len(present)

    def remove_label(self, label: str) -> np.ndarray:
        removed = self.store.remove_label(label)
        self._drop_from_index(removed)
        return removed

    def _drop_from_index(self, ids: np.ndarray) -> None:
        self._max_id = None  # as in add
        with self._guard.writing():
            self.index.remove(ids)  # HNSW: tombstones, filtered out of every search
        if self.index.needs_compaction:  # rebuild the graph without them, from the exact stored vectors
            self.index = self.index_from_store(self._own_settings())

    def reroot_paths(self, old: str, new: str) -> int:
        return self.store.reroot_paths(old, new)

    # ------------------------------------------------------------------ search

    def search(self, queries: np.ndarray, k: int, labels: LabelFilter = None, *, nprobe: int | None = None,
               ef_search: int | None = None) -> tuple[np.ndarray, np.ndarray]:
        """(D, I) from the FAISS index; exact over the store while a type that needs training cannot train yet,
        and exact over the items of `labels` when given (an episode's support set is small: brute force). Rows are
        min(k, items held) wide (VectorBackend.search)."""
        k = as_k(k)
        if labels is not None:
            return self._search_within([labels] if isinstance(labels, str) else list(labels), queries, k)
        index = self.index  # one index for the whole call, even if a rebuilt one is swapped in meanwhile
        if index.is_trained or self.store.count() == 0:
            with self._guard.reading():
                return index.search(queries, k, nprobe=nprobe, ef_search=ef_search)
        index.search(np.empty((0, self.dimension), np.float32), k, nprobe=nprobe, ef_search=ef_search)  # checks
        ids, corpus = self.store.vectors()
        return self._exact(queries, k, ids, corpus)

    def _search_within(self, labels: list[str], queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        with self.store.snapshot():
            parts = [self.store.vectors(label=label) for label in dict.fromkeys(labels)]
            held = self.store.count()
        ids = np.concatenate([p[0] for p in parts]) if parts else np.empty(0, np.int64)
        corpus = np.concatenate([p[1] for p in parts]) if parts else np.empty((0, self.dimension), np.float32)
        order = np.argsort(ids, kind="stable")  # id order, as a search over all items sees them (ties alike)
        D, I = self._exact(queries, k, ids[order], corpus[order])  # min(k, items of those labels) wide
        width = min(k, held)  # the contract's width: padded up to the items held, never up to k
        if D.shape[1] < width:
            pad = width - D.shape[1]
            D = np.pad(D, ((0, 0), (0, pad)), constant_values=-np.inf)
            I = np.pad(I, ((0, 0), (0, pad)), constant_values=-1)
        return D, I

    def _exact(self, queries: np.ndarray, k: int, ids: np.ndarray, corpus: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Brute force over (n, D) `corpus` whose rows are the items `ids`: (D, I) with ids, -1 padding."""
        D, rows = brute_force_search(queries, corpus, k, metric=self.metric)
        return D, np.where(rows >= 0, ids[np.maximum(rows, 0)], -1)

    @property
    def search_defaults(self) -> dict[str, int]:
        return self.index.search_defaults

    def set_search_defaults(self, nprobe: int | None = None, ef_search: int | None = None) -> None:
        with self._guard.writing():
            self.index.set_search_defaults(nprobe=nprobe, ef_search=ef_search)

    # ------------------------------------------------------------------ reads (the store's)

    @property
    def version(self) -> int:
        return self.store.version

    def snapshot(self) -> AbstractContextManager[None]:
        return self.store.snapshot()

    def count(self) -> int:
        return self.store.count()

    def label_counts(self) -> dict[str, int]:
        return self.store.label_counts()

    def items(self, ids: np.ndarray) -> list[Item | None]:
        return self.store.items(ids)

    def labels_and_paths(self, ids: np.ndarray) -> dict[int, tuple[str, str]]:
        return self.store.labels_and_paths(ids)

    def labels_of(self, ids: np.ndarray) -> list[str | None]:
        return self.store.labels_of(ids)

    def vectors(self, label: str | None = None) -> tuple[np.ndarray, np.ndarray]:
        return self.store.vectors(label=label)

    def iter_rows(self, columns: str = "label, vector", chunk: int = 65536) -> Iterator[tuple[np.ndarray, list[tuple]]]:
        return self.store.iter_rows(columns, chunk=chunk)

    def known_label_hashes(self) -> set[tuple[str, str]]:
        return self.store.known_label_hashes()

    def label_path_hashes(self) -> dict[tuple[str, str], str]:
        return self.store.label_path_hashes()

    def ids_by_label_hash(self, pairs: Sequence[tuple[str, str]]) -> dict[tuple[str, str], int]:
        return self.store.ids_by_label_hash(pairs)

    def describe(self) -> dict[str, Any]:
        """The keys VectorBackend.describe names, plus "store" (the SQLite file) and "factory"."""
        return {
            "backend": self.name,
            "store": str(self.path / STORE_FILE),
            "factory": self.index.factory,
            "index_type": self.index.factory,
            "metric": self.metric,
            "search_defaults": self.index.search_defaults,
            "removed_pending": self.index.removed_pending,
            "count": self.store.count(),
            "summary": f"FAISS {self.index.factory}",
            "location": None,
            "details": {},
        }

    def __repr__(self) -> str:
        return f"FaissBackend({str(self.path)!r}, {self.index.factory!r})"
