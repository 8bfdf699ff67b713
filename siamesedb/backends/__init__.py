"""The vector-backend seam: what SiameseDB needs from whatever stores its items and searches their vectors.

A backend owns the items (id, label, path, content hash, vector) and the nearest-neighbour search over them;
SiameseDB owns the encoder, the manifest and the questions (search / classify / verify) — ../DESIGN.md "Backends".
Two backends: the embedded one (siamesedb/backends/faiss.py: items.sqlite as the truth + a FAISS file derived from
it, over siamesedb/store.py + siamesedb/index.py) and Milvus (siamesedb/backends/milvus.py: Milvus Lite in one file,
or a Milvus server / cluster).

Backends are numpy-only: none imports torch (a query server or a Ray writer must not pay for it).
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import AbstractContextManager
from typing import Protocol, runtime_checkable

import numpy as np

from siamesedb.store import Item

__all__ = ["Item", "LabelFilter", "VectorBackend"]

# Which labels a search may return: None = every label; one label; or several (an empty sequence returns nothing).
LabelFilter = str | Sequence[str] | None


@runtime_checkable
class VectorBackend(Protocol):
    """Items and their nearest-neighbour search, behind the FAISS (D, I) contract.

    Scores: higher is always more similar — the inner product for metric "cosine" (SiameseDB's vectors are
    L2-normalised, so it is the cosine similarity), minus the Euclidean distance for "euclidean". Where fewer than
    k results exist, I holds -1 and D holds -inf.

    Ids are chosen by the caller (SiameseDB allocates them), non-negative int64, never reused within one backend.
    Every write is visible to the next call on any handle of the same backend (read-your-writes).
    """

    dimension: int  # D: every vector is (D,) float32
    metric: str  # "cosine" | "euclidean"

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
        """queries (nq, D) -> (D (nq, k) float32 scores best first, I (nq, k) int64 ids), -inf / -1 padding.

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

    def describe(self) -> dict:
        """What `siamesedb info` shows about the backend (kind, where, index type, metric, count). No secrets."""
        ...

    def close(self) -> None:
        """Release the backend (files, connections). Idempotent."""
        ...


# ------------------------------------------------------------------------------------------ choosing a backend

BACKEND_KINDS = ("faiss", "milvus")


def check_factory(kind: str, factory: str, dimension: int) -> None:
    """Refuse an unknown backend, or an index type the backend cannot build, before anything is written."""
    from siamesedb.errors import InvalidInputError

    if kind not in BACKEND_KINDS:
        raise InvalidInputError(f"unknown backend {kind!r}; choose from {', '.join(BACKEND_KINDS)}")
    if kind == "milvus":
        from siamesedb.backends.milvus_index import milvus_index_type

        milvus_index_type(factory)
    else:
        from siamesedb.index import VectorIndex

        VectorIndex(dimension, factory=factory)


def create_backend(kind: str, path, dimension: int, metric: str, factory: str, search_defaults: dict,
                   device: str = "cpu", search_backend: str = "auto", milvus_uri: str | None = None):
    """(a new, empty backend for the index folder `path`, the manifest fields that name it). `metric` is the
    encoder's ("cosine" / "euclidean"). Under the caller's write lock."""
    if kind == "milvus":
        from siamesedb.backends.milvus_index import create_milvus

        return create_milvus(path, dimension, metric, factory, milvus_uri, search_defaults)
    from siamesedb.backends.faiss import FaissBackend
    from siamesedb.index import METRIC_OF_ENCODER, VectorIndex

    index = VectorIndex(dimension, factory=factory, device=device, backend=search_backend,
                        metric=METRIC_OF_ENCODER[metric])
    index.set_search_defaults(**search_defaults)
    backend = FaissBackend.create(path, index, device, search_backend)
    return backend, {"vectors_store_version": backend.version}


def open_backend(path, manifest: dict, metric: str, device: str = "cpu", search_backend: str = "auto"):
    """The backend the manifest of the index folder `path` names (`metric`: the encoder's)."""
    if manifest.get("backend", "faiss") == "milvus":
        from siamesedb.backends.milvus_index import open_milvus

        return open_milvus(path, manifest, metric)
    from siamesedb.backends.faiss import FaissBackend

    return FaissBackend.open(path, manifest, device, search_backend)
