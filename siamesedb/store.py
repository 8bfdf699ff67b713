"""SQLite store of items (id, label, path, sha256, vector) and index metadata: the durable truth of an index."""

from __future__ import annotations

import os
import sqlite3
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from siamesedb.errors import CorruptIndexError, DimensionMismatchError, IndexNotFoundError, InvalidInputError

SCHEMA_VERSION = 1
_MAX_PARAMS = 900  # stay under SQLite's default limit of host parameters per statement

_SCHEMA = """
CREATE TABLE IF NOT EXISTS items (
    id INTEGER PRIMARY KEY AUTOINCREMENT,   -- AUTOINCREMENT: a removed id is never handed out again
    label TEXT NOT NULL,
    path TEXT NOT NULL,
    sha256 TEXT NOT NULL,
    vector BLOB NOT NULL                    -- float32, little-endian, dim values
);
CREATE INDEX IF NOT EXISTS items_label ON items(label);
CREATE INDEX IF NOT EXISTS items_sha256 ON items(sha256);
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
"""


@dataclass(frozen=True)
class Item:
    id: int
    label: str
    path: str
    sha256: str


class ItemStore:
    """items.sqlite: every write is one transaction, and bumps a version counter in the same transaction."""

    def __init__(self, path: str | os.PathLike, dim: int | None = None):
        self.path = Path(path)
        if not self.path.exists() and dim is None:
            raise IndexNotFoundError(f"{self.path}: no item store here")
        try:
            # isolation_level=None: we open transactions ourselves (BEGIN IMMEDIATE), so a writer takes the write
            # lock up front instead of failing half-way through a batch.
            self._conn = sqlite3.connect(self.path, isolation_level=None, timeout=30.0, check_same_thread=False)
            self._conn.execute("PRAGMA journal_mode=WAL")
            # NORMAL in WAL mode: a committed transaction survives a process crash (kill -9); only a power loss may
            # drop the last commits, never corrupt the file.
            self._conn.execute("PRAGMA synchronous=NORMAL")
            self._conn.executescript(_SCHEMA)
            stored_dim = self._meta("dim")
        except sqlite3.DatabaseError as exc:
            raise CorruptIndexError(f"{self.path}: not a readable SQLite store ({exc})") from None
        if stored_dim is None:
            if dim is None:
                raise CorruptIndexError(f"{self.path}: store has no dimension recorded")
            with self._transaction():
                self._set_meta("dim", str(int(dim)))
                self._set_meta("schema_version", str(SCHEMA_VERSION))
                self._set_meta("version", "0")
        elif dim is not None and int(stored_dim) != int(dim):
            raise DimensionMismatchError(f"{self.path}: store holds {stored_dim}-d vectors, not {dim}-d")
        self.dim = int(self._meta("dim"))

    # -------------------------------------------------------------------------------------------- plumbing

    def _meta(self, key: str) -> str | None:
        row = self._conn.execute("SELECT value FROM meta WHERE key = ?", (key,)).fetchone()
        return row[0] if row else None

    def _set_meta(self, key: str, value: str) -> None:
        self._conn.execute("INSERT OR REPLACE INTO meta(key, value) VALUES (?, ?)", (key, value))

    class _Txn:
        def __init__(self, store: ItemStore):
            self.store = store

        def __enter__(self) -> sqlite3.Connection:
            self.store._conn.execute("BEGIN IMMEDIATE")
            return self.store._conn

        def __exit__(self, exc_type, exc, tb) -> None:
            if exc_type is None:
                self.store._conn.execute("COMMIT")
            else:
                self.store._conn.execute("ROLLBACK")

    def _transaction(self) -> ItemStore._Txn:
        return ItemStore._Txn(self)

    def _bump(self) -> None:
        self._conn.execute("UPDATE meta SET value = CAST(value AS INTEGER) + 1 WHERE key = 'version'")

    @property
    def version(self) -> int:
        """Incremented by every write: the FAISS file records which version it mirrors."""
        return int(self._meta("version") or 0)

    def close(self) -> None:
        if self._conn is not None:
            self._conn.close()
            self._conn = None

    def __enter__(self) -> ItemStore:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -------------------------------------------------------------------------------------------- writes

    def add(
        self, labels: Sequence[str], paths: Sequence[str], hashes: Sequence[str], vectors: np.ndarray
    ) -> np.ndarray:
        """Insert a batch in one transaction; returns the new ids (n,) int64 in input order."""
        vectors = np.asarray(vectors)
        if vectors.ndim != 2 or vectors.shape[1] != self.dim:
            raise DimensionMismatchError(f"vectors have shape {vectors.shape}, the store holds {self.dim}-d vectors")
        n = len(vectors)
        if not (len(labels) == len(paths) == len(hashes) == n):
            raise InvalidInputError(
                f"lengths differ: {n} vectors, {len(labels)} labels, {len(paths)} paths, {len(hashes)} hashes"
            )
        vectors = np.ascontiguousarray(vectors, dtype="<f4")
        if not np.isfinite(vectors).all():
            raise InvalidInputError("vectors contain NaN or infinity")
        if any(not isinstance(label, str) or not label for label in labels):
            raise InvalidInputError("every label must be a non-empty string")
        rows = [(labels[i], str(paths[i]), hashes[i], vectors[i].tobytes()) for i in range(n)]
        ids = np.empty(n, dtype=np.int64)
        with self._transaction() as conn:
            for i, row in enumerate(rows):
                ids[i] = conn.execute("INSERT INTO items(label, path, sha256, vector) VALUES (?, ?, ?, ?)", row).lastrowid
            self._bump()
        return ids

    def remove_ids(self, ids: Sequence[int] | np.ndarray) -> int:
        ids = [int(i) for i in np.atleast_1d(np.asarray(ids, dtype=np.int64))]
        removed = 0
        with self._transaction() as conn:
            for start in range(0, len(ids), _MAX_PARAMS):
                chunk = ids[start : start + _MAX_PARAMS]
                marks = ",".join("?" * len(chunk))
                removed += conn.execute(f"DELETE FROM items WHERE id IN ({marks})", chunk).rowcount
            self._bump()
        return removed

    def remove_label(self, label: str) -> np.ndarray:
        """Remove every item of `label`; returns their ids."""
        with self._transaction() as conn:
            ids = np.asarray([r[0] for r in conn.execute("SELECT id FROM items WHERE label = ?", (label,))], dtype=np.int64)
            if len(ids):
                conn.execute("DELETE FROM items WHERE label = ?", (label,))
                self._bump()
        return ids

    # -------------------------------------------------------------------------------------------- reads

    def count(self) -> int:
        return int(self._conn.execute("SELECT COUNT(*) FROM items").fetchone()[0])

    def label_counts(self) -> dict[str, int]:
        return {label: int(n) for label, n in self._conn.execute("SELECT label, COUNT(*) FROM items GROUP BY label ORDER BY label")}

    def items(self, ids: Sequence[int] | np.ndarray) -> list[Item | None]:
        """Items in the order of `ids`; None for an id the store does not hold."""
        wanted = [int(i) for i in np.atleast_1d(np.asarray(ids, dtype=np.int64))]
        found: dict[int, Item] = {}
        unique = sorted(set(wanted))
        for start in range(0, len(unique), _MAX_PARAMS):
            chunk = unique[start : start + _MAX_PARAMS]
            marks = ",".join("?" * len(chunk))
            for row in self._conn.execute(f"SELECT id, label, path, sha256 FROM items WHERE id IN ({marks})", chunk):
                found[row[0]] = Item(*row)
        return [found.get(i) for i in wanted]

    def labels_of(self, ids: Sequence[int] | np.ndarray) -> list[str | None]:
        return [item.label if item is not None else None for item in self.items(ids)]

    def vectors(self, label: str | None = None) -> tuple[np.ndarray, np.ndarray]:
        """(ids (n,) int64, vectors (n, dim) float32) in id order, optionally of one label only."""
        if label is None:
            rows = self._conn.execute("SELECT id, vector FROM items ORDER BY id").fetchall()
        else:
            rows = self._conn.execute("SELECT id, vector FROM items WHERE label = ? ORDER BY id", (label,)).fetchall()
        ids = np.fromiter((r[0] for r in rows), dtype=np.int64, count=len(rows))
        # One join + one frombuffer instead of n small arrays: fast for 100k+ rows.
        blob = b"".join(r[1] for r in rows)
        if len(blob) != len(rows) * self.dim * 4:
            raise CorruptIndexError(f"{self.path}: a stored vector has the wrong length")
        return ids, np.frombuffer(blob, dtype="<f4").reshape(len(rows), self.dim).astype(np.float32)

    def all_labels(self) -> tuple[np.ndarray, list[str]]:
        """(ids, labels) of every item in id order."""
        rows = self._conn.execute("SELECT id, label FROM items ORDER BY id").fetchall()
        return np.asarray([r[0] for r in rows], dtype=np.int64), [r[1] for r in rows]

    def known_hashes(self) -> set[str]:
        return {r[0] for r in self._conn.execute("SELECT DISTINCT sha256 FROM items")}

    def known_label_hashes(self) -> set[tuple[str, str]]:
        """(label, sha256) of every item: what a resumed build skips."""
        return {(r[0], r[1]) for r in self._conn.execute("SELECT label, sha256 FROM items")}
