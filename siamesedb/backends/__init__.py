"""The vector-backend seam: what SiameseDB needs from whatever stores its items and searches their vectors.

A backend owns the items (id, label, path, content hash, vector) and the nearest-neighbour search over them;
SiameseDB owns the encoder, the manifest and the questions (search / classify / verify) — ../DESIGN.md "Backends".
Two backends are planned: the embedded one (items.sqlite as the truth + a FAISS file derived from it, today's
siamesedb/store.py + siamesedb/index.py) and Milvus (siamesedb/backends/milvus.py: Milvus Lite in one file, or a
Milvus server / cluster). Only the Milvus one exists as a VectorBackend so far; db.py does not use this seam yet.

Backends are numpy-only: none imports torch (a query server or a Ray writer must not pay for it).
"""

from __future__ import annotations

from collections.abc import Sequence
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
        ids: np.ndarray,
        labels: Sequence[str],
        paths: Sequence[str],
        hashes: Sequence[str],
        vectors: np.ndarray,
    ) -> None:
        """Store n items: ids (n,) int64 (none already held), labels / paths / hashes n strings, vectors (n, D)
        float32, finite. Checks everything before writing anything; a batch the backend refuses half-way is undone."""
        ...

    def remove(self, ids: np.ndarray) -> int:
        """Remove these ids (unknown ones are ignored); returns how many were held."""
        ...

    def remove_label(self, label: str) -> np.ndarray:
        """Remove every item of `label`; returns their ids (n,) int64 in id order (empty if the label is unknown)."""
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
        this call only; exact index types accept and ignore them.
        """
        ...

    def count(self) -> int:
        """How many items are held."""
        ...

    def label_counts(self) -> dict[str, int]:
        """{label: number of items}, labels sorted."""
        ...

    def items(self, ids: np.ndarray) -> list[Item | None]:
        """Metadata in the order of `ids`; None for an id not held."""
        ...

    def vectors(self, label: str | None = None) -> tuple[np.ndarray, np.ndarray]:
        """(ids (n,) int64, vectors (n, D) float32) in id order, optionally of one label only."""
        ...

    def describe(self) -> dict:
        """What `siamesedb info` shows about the backend (kind, where, index type, metric, count). No secrets."""
        ...

    def close(self) -> None:
        """Release the backend (files, connections). Idempotent."""
        ...
