"""Tombstones: the ids removed from an index FAISS cannot remove from correctly (HNSW graphs; IVF inside
IndexIDMap2), kept beside the FAISS file in `<file>.removed.npy` until a compaction rebuilds the index without them."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np

from siamesedb.errors import CorruptIndexError
from siamesedb.files import write_atomic

COMPACT_FRACTION = 0.1  # rebuild a graph index once this share of what it holds is removed
COMPACT_BELOW = 10_000  # ...or at once when it holds fewer vectors than this (a rebuild costs well under a second)


def worth_compacting(removed: int, held: int) -> bool:
    """Whether rebuilding without `removed` tombstones out of `held` vectors (tombstones included) is worthwhile:
    COMPACT_FRACTION of them removed, or an index small enough (< COMPACT_BELOW) that a rebuild is cheaper than
    carrying dead entries."""
    if not removed:
        return False
    return removed >= COMPACT_FRACTION * held or held < COMPACT_BELOW


def sidecar_path(path: Path) -> Path:
    """Where the tombstones of the FAISS file `path` live."""
    return path.with_name(path.name + ".removed.npy")


def write_sidecar(path: Path, removed: np.ndarray) -> None:
    """Write the (n,) int64 tombstones of FAISS file `path` atomically (before the FAISS file: a crash between the
    two writes leaves old vectors with newer tombstones, ids already removed, never a removed id back)."""
    buffer = io.BytesIO()
    np.save(buffer, removed)
    write_atomic(sidecar_path(path), buffer.getvalue())


def read_sidecar(path: Path, held_ids: np.ndarray) -> np.ndarray:
    """The sorted tombstones of FAISS file `path` (empty without a sidecar), each one an id of `held_ids`
    (CorruptIndexError otherwise, or for an unreadable sidecar)."""
    sidecar = sidecar_path(path)
    if not sidecar.exists():
        return np.empty(0, dtype=np.int64)
    try:
        removed = np.load(sidecar, allow_pickle=False)
    except (OSError, ValueError) as exc:
        raise CorruptIndexError(f"{sidecar}: unreadable ({exc})") from None
    if removed.dtype != np.int64 or removed.ndim != 1 or not np.isin(removed, held_ids).all():
        raise CorruptIndexError(f"{sidecar}: tombstones do not match {path.name}")
    return np.unique(removed)
