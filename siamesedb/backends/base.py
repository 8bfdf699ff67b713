"""The backend contract: the VectorBackend protocol (every call SiameseDB makes, lifecycle hooks included) and
BackendBase, the defaults of a backend that keeps no derived files beside its items.

A backend owns the items (id, label, path, content hash, vector) and the nearest-neighbour search over them;
SiameseDB owns the encoder, the manifest and the questions (search / classify / verify) — DESIGN.md "Backends".
Metrics are named in one vocabulary above the seam, "cosine" / "euclidean" (siamesedb.scoring.METRICS); a backend
turns them into its engine's names (FAISS inner product / L2, Milvus IP / L2) inside its own subpackage.
numpy only: no torch import (a query server or a Ray writer must not pay for it).
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from contextlib import AbstractContextManager
from pathlib import Path
from typing import Any, ClassVar, Protocol, runtime_checkable

import numpy as np

from siamesedb.backends.items import Item, LabelFilter
from siamesedb.errors import InvalidInputError


@runtime_checkable
class VectorBackend(Protocol):
    """Items and their nearest-neighbour search, behind the FAISS (D, I) contract.

    Scores: higher is always more similar — the inner product for metric "cosine" (SiameseDB's vectors are
    L2-normalised, so it is the cosine similarity), minus the Euclidean distance for "euclidean".

    Width: a search answers rows of w = min(k, items held) columns, so a k beyond the collection returns what there
    is and memory is bounded by the answer, never by k (k = 10**9 on 41 items gives 41 columns; an empty backend
    gives 0). Where fewer than w results come back (a label filter, an approximate index), I holds -1 and D holds
    -inf in the remaining columns: padding goes up to the items held, never up to k. A backend with a cap on k
    (Milvus: 16,384) refuses a k above it only when min(k, items held) is above it too.

    Ids are chosen by the caller (SiameseDB allocates them), non-negative int64, never reused within one backend.
    Every write is visible to the next call on any handle of the same backend (read-your-writes).

    A backend class is found through the registry (siamesedb/backends/__init__.py) and answers the classmethods
    `check_factory`, `resolve_factory`, `create` and `open`; `backend_options` is one mapping of the options a
    backend reads (the FAISS backend: "device", "search_backend"; Milvus: "uri"), others ignored.
    """

    name: ClassVar[str]  # the registry's name of this backend ("faiss", "milvus"), the manifest's "backend"
    dimension: int  # D: every vector is (D,) float32
    metric: str  # "cosine" | "euclidean"

    # ---------------------------------------------------------------- the class: index types, creating, opening

    @classmethod
    def check_factory(cls, factory: str, dimension: int) -> None:
        """Refuse (InvalidInputError) an index type this backend cannot build for `dimension`-d vectors; "auto" is
        accepted (resolve_factory picks the type). Cheap: nothing is built, nothing written."""
        ...

    @classmethod
    def resolve_factory(cls, factory: str, dimension: int, expected_items: int = 0,
                        memory_budget: int | None = None) -> tuple[str, dict[str, int]]:
        """(the index type to build, the search defaults it starts with), checked: "auto" becomes the type that
        suits `expected_items` vectors within `memory_budget` bytes, with its measured search defaults; any other
        type is returned as given, with no defaults ({})."""
        ...

    @classmethod
    def create(cls, path: Path, dimension: int, metric: str, factory: str, search_defaults: dict[str, int],
               options: Mapping[str, Any]) -> tuple[VectorBackend, dict[str, Any]]:
        """(a new, empty backend for the index folder `path`, the manifest fields that name it). Under the
        caller's write lock; `factory` already resolved (resolve_factory)."""
        ...

    @classmethod
    def open(cls, path: Path, manifest: dict[str, Any], metric: str, options: Mapping[str, Any]) -> VectorBackend:
        """The backend the manifest of the index folder `path` names (`metric`: the encoder's)."""
        ...

    @classmethod
    def holds_items(cls, path: Path) -> bool:
        """Whether the index folder `path` already holds items of this backend without a manifest (a creation cut
        short after items went in: refused rather than started over)."""
        ...

    # ---------------------------------------------------------------- writes

    def add(
        self,
        ids: np.ndarray | None,
        labels: Sequence[str],
        paths: Sequence[str],
        hashes: Sequence[str],
        vectors: np.ndarray,
    ) -> np.ndarray:
        """Store n items: labels / paths / hashes n strings, vectors (n, D) float32, finite. `ids` (n,) int64 keeps
        given ids (an import; none may be held); None lets the backend allocate fresh ones, ascending, above every
        id it ever handed out (a removed id is never reused). Returns the ids (n,) int64 in input order. Checks
        everything before writing anything; a batch the backend refuses half-way is undone."""
        ...

    def remove(self, ids: np.ndarray) -> int:
        """Remove these ids (unknown ones are ignored); returns how many were held."""
        ...

    def remove_label(self, label: str) -> np.ndarray:
        """Remove every item of `label`; returns their ids (n,) int64 in id order (empty if the label is unknown)."""
        ...

    def reroot_paths(self, old: str, new: str) -> int:
        """Replace the leading `old` of every stored path with `new`, whole path components only (/data/a does not
        rewrite /data/ab/x.png); returns how many paths changed. Vectors, ids and labels are untouched."""
        ...

    def search(
        self,
        queries: np.ndarray,
        k: int,
        labels: LabelFilter = None,
        *,
        nprobe: int | None = None,
        ef_search: int | None = None,
    ) -> tuple[np.ndarray, np.ndarray]:
        """queries (nq, D) -> (D (nq, w) float32 scores best first, I (nq, w) int64 ids), w = min(k, items held),
        -inf / -1 padding where fewer than w results exist (see the class docstring). k: an integer of at least 1
        (checks.as_k), else InvalidInputError.

        `labels` restricts the candidates (done by the backend, not by filtering k results afterwards, so k hits
        of the wanted labels come back when they exist). `nprobe` (IVF) and `ef_search` (graph indexes) apply to
        this call only, else the backend's `search_defaults`; exact index types accept and ignore them.
        """
        ...

    # ---------------------------------------------------------------- reads (all see every committed write)

    def count(self) -> int:
        """How many items are held."""
        ...

    def label_counts(self) -> dict[str, int]:
        """{label: number of items}, labels sorted."""
        ...

    def items(self, ids: np.ndarray) -> list[Item | None]:
        """Metadata in the order of `ids`; None for an id not held."""
        ...

    def labels_and_paths(self, ids: np.ndarray) -> dict[int, tuple[str, str]]:
        """{id: (label, path)} for the ids held (how search hits get their names)."""
        ...

    def labels_of(self, ids: np.ndarray) -> list[str | None]:
        """Labels in the order of `ids`; None for an id not held."""
        ...

    def vectors(self, label: str | None = None) -> tuple[np.ndarray, np.ndarray]:
        """(ids (n,) int64, vectors (n, D) float32) in id order, optionally of one label only."""
        ...

    def iter_rows(self, columns: str = "label, vector", chunk: int = 65536) -> Iterator[tuple[np.ndarray, list[tuple]]]:
        """Every item in id order, `chunk` at a time, in bounded memory: (ids (n,) int64, rows), each row a tuple of
        the named columns — a comma-separated subset of label, path, sha256, vector; a vector comes as D
        little-endian float32 values in bytes (the class table, item table and export read it that way)."""
        ...

    def known_label_hashes(self) -> set[tuple[str, str]]:
        """(label, sha256) of every item: what a resumed build skips."""
        ...

    def label_path_hashes(self) -> dict[tuple[str, str], str]:
        """{(label, path): sha256} of every item: a resumed build re-hashes such a file but does not decode it."""
        ...

    def ids_by_label_hash(self, pairs: Sequence[tuple[str, str]]) -> dict[tuple[str, str], int]:
        """{(label, sha256): id} for those of `pairs` already held (the lowest id where one is held twice)."""
        ...

    # ---------------------------------------------------------------- consistency and tuning

    @property
    def version(self) -> int:
        """A counter that every committed write moves, seen by every handle of the backend (also in other
        processes): SiameseDB keys its caches (class prototypes, the in-memory item table) on it."""
        ...

    def snapshot(self) -> AbstractContextManager[None]:
        """Reads inside see one committed state where the backend can give one (SQLite: a read transaction);
        otherwise a no-op (Milvus: each read is Strong-consistent on its own)."""
        ...

    @property
    def search_defaults(self) -> dict[str, int]:
        """The nprobe / ef_search searches use when they pass none (empty for exact index types)."""
        ...

    def set_search_defaults(self, nprobe: int | None = None, ef_search: int | None = None) -> None:
        """Change the stored nprobe / ef_search (None: leave as is)."""
        ...

    def describe(self) -> dict[str, Any]:
        """What `siamesedb info` shows about the backend; no secrets. Always these keys (a backend may add more):

        - "backend": the registry name (`name`); "metric": "cosine" | "euclidean"; "count": items held;
        - "index_type": the index type in the backend's own words (a FAISS factory string, a Milvus index type);
        - "search_defaults": as the property; "removed_pending": removed items still inside the index (0 where a
          removal leaves nothing behind);
        - "summary": the index type as `info` prints it on its "vectors" line ("FAISS Flat", "Milvus HNSW");
        - "location": one line saying where the items live, for `info`'s "backend" line, or None where they live
          in the index folder's own files (FAISS: nothing to add);
        - "details": the object `info --json` shows under the key "backend"'s value ({} when there is nothing to
          add: `info` then shows no such key). Milvus: {"uri", "lite", "collection", "index_type"}.
        """
        ...

    def close(self) -> None:
        """Release the backend (files, connections). Idempotent."""
        ...

    @property
    def closed(self) -> bool:
        """Whether `close` was called."""
        ...

    # ---------------------------------------------------------------- lifecycle hooks (BackendBase: no-ops)

    # What SiameseDB reads of a backend that mirrors its items in derived files (FAISS); BackendBase's defaults.
    store: Any  # the object answering the item reads (items, vectors, label_counts...): the SQLite store, or self
    index: Any  # the FAISS index (VectorIndex) the backend searches, or None
    fresh: bool  # after open: whether the derived files were loaded as saved (False: rebuilt in memory, save them)
    items_file: Path | None  # the file holding the items, named in error messages; None: the index folder is named
    reindexable: bool  # whether `reindex` can rebuild the index as another type

    def catch_up(self, manifest: dict[str, Any]) -> None:
        """Under the write lock, before a write: catch up with what other processes wrote (rebuild what is
        derived when the items moved on)."""
        ...

    def begin_write(self) -> int | None:
        """Under the write lock, after catch_up: a token of the state the write starts from (for end_write)."""
        ...

    def end_write(self, started_at: int | None, failed: bool) -> None:
        """After a write under the lock: `started_at` from begin_write; `failed` whether the write raised."""
        ...

    def save(self) -> dict[str, Any]:
        """Write the derived files (atomically) and return the manifest fields to save with them (at least
        "search_defaults"). OSError passes to the caller."""
        ...

    def refresh(self, manifest: dict[str, Any]) -> None:
        """A reader catching up with another process's writes (never writes a file)."""
        ...

    def bulk_sample(self, sample: np.ndarray) -> None:
        """Before a bulk add of (n, D) float32 vectors (metric-ready: unit rows for cosine), the first of them."""
        ...

    def reindex(self, manifest: dict[str, Any], factory: str) -> Any:
        """Rebuild the index as type `factory` from every stored vector and make it the live one; returns it (an
        object with `set_search_defaults`). InvalidInputError where the backend is not `reindexable`."""
        ...

    # ---------------------------------------------------------------- state every host shares (BackendBase: none)

    def shared_fields(self) -> dict[str, Any]:
        """Manifest fields kept in the backend itself for every host that reaches it ({} where the index folder's
        manifest is the only copy, as with FAISS): SiameseDB merges them over its manifest on open, refresh and
        before each write (Milvus: the calibrations, so `verify` on any host uses any host's calibration)."""
        ...

    def publish(self, fields: dict[str, Any], per_entry: tuple[str, ...] = ()) -> None:
        """Keep manifest fields in the backend for every host (a no-op where the manifest is the only copy);
        fields named in `per_entry` are dicts merged entry by entry, so two hosts publishing two entries keep
        both. Does not move the version (a calibration published must not make itself stale)."""
        ...


class BackendBase:
    """The lifecycle defaults of a backend whose items are their own truth and index (no derived files): every
    hook a no-op, `store` the backend itself, no FAISS index, always fresh. Subclasses set `name`."""

    name: ClassVar[str] = ""
    index: Any = None
    fresh: bool = True
    items_file: Path | None = None
    reindexable: ClassVar[bool] = False

    search_defaults: Any  # the subclass's property

    @property
    def store(self) -> Any:
        """The backend itself answers the item reads."""
        return self

    @classmethod
    def resolve_factory(cls, factory: str, dimension: int, expected_items: int = 0,
                        memory_budget: int | None = None) -> tuple[str, dict[str, int]]:
        """`factory` as given (checked) and no search defaults; a backend with an "auto" policy overrides this."""
        cls.check_factory(factory, dimension)
        return factory, {}

    @classmethod
    def check_factory(cls, factory: str, dimension: int) -> None:
        raise NotImplementedError  # every backend names the index types it builds

    @classmethod
    def holds_items(cls, path: Path) -> bool:
        """False: nothing of this backend's lives in the index folder before its manifest."""
        return False

    def catch_up(self, manifest: dict[str, Any]) -> None:
        return None

    def begin_write(self) -> int | None:
        return None

    def end_write(self, started_at: int | None, failed: bool) -> None:
        return None

    def save(self) -> dict[str, Any]:
        """Nothing derived to write; the manifest keeps the search defaults."""
        return {"search_defaults": self.search_defaults}

    def refresh(self, manifest: dict[str, Any]) -> None:
        return None

    def bulk_sample(self, sample: np.ndarray) -> None:
        return None

    def shared_fields(self) -> dict[str, Any]:
        return {}

    def publish(self, fields: dict[str, Any], per_entry: tuple[str, ...] = ()) -> None:
        return None

    def reindex(self, manifest: dict[str, Any], factory: str) -> Any:
        raise InvalidInputError(f"a {self.name} index keeps its index type; build a new index to change it")


def scores_from_squared_l2(distances: np.ndarray) -> np.ndarray:
    """Squared L2 distances (what FAISS and Milvus return for L2) -> float32 scores, higher = more similar: minus the
    distance, 0 - d so that an exact match scores 0, not -0. Padding stays whatever the engine put there: callers
    turn it into -inf by the id -1 beside it."""
    return np.subtract(0, np.sqrt(np.maximum(distances, 0)), dtype=np.float32)
