"""items.sqlite, the FAISS backend's truth: every item (id, label, path, sha256, vector) and the store's metadata
(dimension, schema, version) in SQLite, written in transactions."""

from __future__ import annotations

import functools
import os
import sqlite3
import threading
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

import numpy as np

from siamesedb.backends.items import Item
from siamesedb.checks import as_ids, as_item_fields, as_vectors, is_utf8
from siamesedb.errors import (
    CorruptIndexError,
    DimensionMismatchError,
    IndexLockedError,
    IndexNotFoundError,
    InvalidInputError,
    StorageError,
)

SCHEMA_VERSION = 1
_MAX_PARAMS = 900  # stay under SQLite's historical limit of 999 host parameters per statement

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


def _named_sqlite_errors(method: Callable) -> Callable:
    """SQLite failures inside a store method -> one named error: busy (IndexLockedError), the disk refusing
    (StorageError), or damage such as malformed pages and undecodable text (CorruptIndexError)."""

    @functools.wraps(method)
    def checked(self, *args, **kwargs):
        try:
            return method(self, *args, **kwargs)
        except sqlite3.Error as exc:
            raise _named_error(self.path, exc) from None

    return checked


def _named_error(path: Path, exc: sqlite3.Error) -> Exception:
    reason = str(exc).splitlines()[0] if str(exc).strip() else type(exc).__name__
    lowered = reason.lower()
    if "locked" in lowered or "busy" in lowered:
        return IndexLockedError(f"{path}: the store stayed busy ({reason})")
    if any(word in lowered for word in ("full", "i/o", "readonly", "read-only", "unable to open")):
        return StorageError(f"{path}: {reason}")
    return CorruptIndexError(f"{path}: damaged item store ({reason[:120]})")


class ItemStore:
    """items.sqlite: every write is one transaction, and bumps a version counter in the same transaction.

    `ItemStore(path, dim=D)` creates the store (or opens it, checking D); `ItemStore(path)` and
    `ItemStore.open_existing(path)` only open one that exists (IndexNotFoundError otherwise).
    """

    def __init__(self, path: str | os.PathLike, dim: int | None = None):
        self.path = Path(path)
        self._conn: sqlite3.Connection | None = None
        self._owner = threading.get_ident()  # the opening thread uses _conn; every other thread its own (see _db)
        self._local = threading.local()
        self._others: list[sqlite3.Connection] = []  # the other threads' connections, closed with the store
        existed = self.path.exists()
        if not existed and dim is None:
            raise IndexNotFoundError(f"{self.path}: no item store here")
        if not existed and not self.path.parent.is_dir():
            raise IndexNotFoundError(f"{self.path.parent}: folder not found")
        if dim is not None and int(dim) < 1:
            raise InvalidInputError(f"dimension must be positive, got {dim}")
        try:
            # isolation_level=None: we open transactions ourselves (BEGIN IMMEDIATE), so a writer takes the write
            # lock up front instead of failing half-way through a batch.
            self._conn = sqlite3.connect(self.path, isolation_level=None, timeout=30.0, check_same_thread=False)
            tables = {r[0] for r in self._conn.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
            if existed and tables and not {"items", "meta"} <= tables:
                # Some other SQLite database: do not write our tables into it.
                raise CorruptIndexError(f"{self.path}: a SQLite file, but not a siamesedb item store")
            if existed and not tables and dim is None:
                # Opening (not creating) a file with no tables: an emptied or truncated-to-nothing store. Creating
                # fresh tables here would silently turn a damaged index into an empty one.
                raise CorruptIndexError(f"{self.path}: holds no item tables (an empty file, not an item store)")
            self._conn.execute("PRAGMA journal_mode=WAL")  # readers never block the writer, nor it them
            # NORMAL in WAL mode: a committed transaction survives a process crash (kill -9); only a power loss may
            # drop the last commits, never corrupt the file. FULL would fsync every commit for little more safety.
            self._conn.execute("PRAGMA synchronous=NORMAL")
            self._conn.executescript(_SCHEMA)
            stored_dim = self._meta("dim")
            schema = self._meta("schema_version")
            stored_dim = None if stored_dim is None else int(stored_dim)
            schema = None if schema is None else int(schema)
        except sqlite3.DatabaseError as exc:
            self.close()
            raise CorruptIndexError(f"{self.path}: not a readable SQLite store ({exc})") from None
        except ValueError as exc:
            self.close()
            raise CorruptIndexError(f"{self.path}: damaged item store (meta value: {exc})") from None
        except CorruptIndexError:
            self.close()
            raise
        if schema is not None and int(schema) > SCHEMA_VERSION:
            self.close()
            raise CorruptIndexError(
                f"{self.path}: store format {schema} is newer than this siamesedb reads ({SCHEMA_VERSION}); upgrade it"
            )
        if stored_dim is None:
            if dim is None:
                self.close()
                raise CorruptIndexError(f"{self.path}: store has no dimension recorded")
            with self._transaction():
                self._set_meta("dim", str(int(dim)))
                self._set_meta("schema_version", str(SCHEMA_VERSION))
                self._set_meta("version", "0")
        elif dim is not None and int(stored_dim) != int(dim):
            self.close()
            raise DimensionMismatchError(f"{self.path}: store holds {stored_dim}-d vectors, not {dim}-d")
        self.dim = int(self._meta("dim"))

    @staticmethod
    def holds_items(path: str | os.PathLike) -> bool:
        """Whether the store file `path` holds any item (False for one whose creation was cut short before its
        tables); CorruptIndexError for a file SQLite cannot read."""
        try:
            conn = sqlite3.connect(path, timeout=30.0)
            try:
                return conn.execute("SELECT EXISTS (SELECT 1 FROM items)").fetchone()[0] == 1
            finally:
                conn.close()
        except sqlite3.OperationalError as exc:
            if "no such table" in str(exc):
                return False
            raise CorruptIndexError(f"{path}: not a readable SQLite store ({exc})") from None
        except sqlite3.DatabaseError as exc:
            raise CorruptIndexError(f"{path}: not a readable SQLite store ({exc})") from None

    @classmethod
    def open_existing(cls, path: str | os.PathLike) -> ItemStore:
        """Open a store that must already exist (IndexNotFoundError if missing); its dimension is read from it."""
        if not Path(path).exists():
            raise IndexNotFoundError(f"{path}: no item store here")
        return cls(path)

    # -------------------------------------------------------------------------------------------- plumbing

    @property
    def _db(self) -> sqlite3.Connection:
        """This thread's connection. One connection per thread, as one per process: a transaction (a write, a
        snapshot) belongs to its thread, so a server's searches read committed states while another thread writes,
        instead of sharing (or colliding with) that thread's open transaction."""
        if self._conn is None:
            raise InvalidInputError(f"{self.path}: the item store is closed")
        if threading.get_ident() == self._owner:
            return self._conn
        conn = getattr(self._local, "conn", None)
        if conn is None:
            conn = sqlite3.connect(self.path, isolation_level=None, timeout=30.0, check_same_thread=False)
            conn.execute("PRAGMA synchronous=NORMAL")  # per connection (WAL mode is the file's, set at opening)
            self._local.conn = conn
            self._others.append(conn)  # list.append is atomic: no lock needed
        return conn

    def _meta(self, key: str) -> str | None:
        row = self._db.execute("SELECT value FROM meta WHERE key = ?", (key,)).fetchone()
        return row[0] if row else None

    def _set_meta(self, key: str, value: str) -> None:
        self._db.execute("INSERT OR REPLACE INTO meta(key, value) VALUES (?, ?)", (key, value))

    @contextmanager
    def _transaction(self) -> Iterator[sqlite3.Connection]:
        """BEGIN IMMEDIATE ... COMMIT, or ROLLBACK on any exception (a failed batch leaves no row behind)."""
        conn = self._db
        conn.execute("BEGIN IMMEDIATE")
        try:
            yield conn
            conn.execute("COMMIT")
        except BaseException:
            if conn.in_transaction:  # COMMIT itself may fail (disk full, busy): undo rather than leave it open
                conn.execute("ROLLBACK")
            raise

    @contextmanager
    def snapshot(self) -> Iterator[None]:
        """Reads inside one read transaction see one committed state (WAL), whatever writers commit meanwhile.

        A no-op inside a write transaction, which already sees only itself.
        """
        conn = self._db
        if conn.in_transaction:
            yield
            return
        try:
            conn.execute("BEGIN")  # deferred: the snapshot starts at the first read and holds until COMMIT
        except sqlite3.Error as exc:
            raise _named_error(self.path, exc) from None
        try:
            yield
        finally:
            if conn.in_transaction:
                try:
                    conn.execute("COMMIT")  # ends a read: nothing to lose, but a damaged file may still complain
                except sqlite3.Error as exc:
                    raise _named_error(self.path, exc) from None

    def _bump(self, rewrite: bool = True) -> None:
        """Move the version; `rewrite` (every write but an append of new ids) also records it as `rewrite_version`,
        so a reader at a later version knows that only appends followed (FaissBackend.follow_appends)."""
        before = self._meta("rewrite_version")
        self._db.execute("UPDATE meta SET value = CAST(value AS INTEGER) + 1 WHERE key = 'version'")
        if rewrite or before is None:  # a store without the mark (made before it existed) gets it now
            self._set_meta("rewrite_version", str(self.version if rewrite else self.version - 1))

    def max_id(self) -> int:
        """The largest id held (0 when empty)."""
        return int(self._db.execute("SELECT COALESCE(MAX(id), 0) FROM items").fetchone()[0])

    @property
    def rewrite_version(self) -> int | None:
        """The version of the last write that was not a pure append (None: not recorded, so unknown)."""
        value = self._meta("rewrite_version")
        return None if value is None else int(value)

    @property
    @_named_sqlite_errors
    def version(self) -> int:
        """Incremented by every write that changes items: the FAISS file records which version it mirrors."""
        value = self._meta("version") or 0
        try:
            return int(value)
        except ValueError:
            raise CorruptIndexError(f"{self.path}: damaged item store (version {value!r} is not a number)") from None

    @property
    def closed(self) -> bool:
        return self._conn is None

    def close(self) -> None:
        if self._conn is not None:
            self._conn.close()
            self._conn = None
        for conn in self._others:
            conn.close()
        self._others.clear()

    def __enter__(self) -> ItemStore:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -------------------------------------------------------------------------------------------- writes

    @_named_sqlite_errors
    def add(
        self, labels: Sequence[str], paths: Sequence[str | os.PathLike], hashes: Sequence[str], vectors: np.ndarray
    ) -> np.ndarray:
        """Insert a batch in one transaction; returns the new ids (n,) int64 in input order."""
        labels, paths, hashes, vectors = self._checked_batch(labels, paths, hashes, vectors)
        n = len(vectors)
        if n == 0:
            return np.empty(0, dtype=np.int64)
        rows = [(labels[i], paths[i], hashes[i], vectors[i].tobytes()) for i in range(n)]
        with self._transaction() as conn:
            # AUTOINCREMENT hands out ids above every id ever used (sqlite_sequence), and we hold the write lock:
            # the rows above that mark after one executemany are exactly this batch, in insertion order.
            row = conn.execute("SELECT seq FROM sqlite_sequence WHERE name = 'items'").fetchone()
            mark = int(row[0]) if row else 0
            conn.executemany("INSERT INTO items(label, path, sha256, vector) VALUES (?, ?, ?, ?)", rows)
            ids = np.fromiter(
                (r[0] for r in conn.execute("SELECT id FROM items WHERE id > ? ORDER BY id", (mark,))), dtype=np.int64
            )
            if len(ids) != n:  # cannot happen under the write lock; refuse to return wrong ids if it ever does
                raise CorruptIndexError(f"{self.path}: inserted {n} items but found {len(ids)} new ids")
            self._bump(rewrite=False)  # an append: ids above every id ever used (AUTOINCREMENT)
        return ids

    def _checked_batch(self, labels: Sequence[str], paths: Sequence[str | os.PathLike], hashes: Sequence[str],
                       vectors: np.ndarray) -> tuple[list[str], list[str], list[str], np.ndarray]:
        """The checks every backend shares (checks.py), before a batch is written: (n, dim) finite vectors as the
        on-disk little-endian float32 rows, n UTF-8 labels / paths / hashes (SQLite TEXT is UTF-8)."""
        if np.ndim(vectors) != 2:  # a store batch is always 2-D: no single vector promoted to one row
            raise InvalidInputError(f"vectors must be a 2-D array (n, {self.dim}), got shape {np.shape(vectors)}")
        vectors = np.ascontiguousarray(as_vectors(vectors, self.dim), dtype="<f4")
        labels, paths, hashes = as_item_fields(labels, paths, hashes, len(vectors))
        return labels, paths, hashes, vectors

    @_named_sqlite_errors
    def remove_ids(self, ids: Sequence[int] | np.ndarray) -> int:
        """Remove these ids in one transaction (unknown ones are ignored); returns how many rows went."""
        array = np.atleast_1d(np.asarray(ids))
        if array.size and not np.issubdtype(array.dtype, np.integer):
            raise InvalidInputError(f"ids must be integers, got dtype {array.dtype}")
        unique = sorted({int(i) for i in array.reshape(-1)})
        if not unique:
            return 0
        removed = 0
        with self._transaction() as conn:
            for start in range(0, len(unique), _MAX_PARAMS):
                chunk = unique[start : start + _MAX_PARAMS]
                marks = ",".join("?" * len(chunk))
                removed += conn.execute(f"DELETE FROM items WHERE id IN ({marks})", chunk).rowcount
            if removed:
                self._bump()
        return removed

    @_named_sqlite_errors
    def remove_label(self, label: str) -> np.ndarray:
        """Remove every item of `label` in one transaction; returns their ids (n,) int64 in id order."""
        with self._transaction() as conn:
            ids = np.fromiter(
                (r[0] for r in conn.execute("SELECT id FROM items WHERE label = ? ORDER BY id", (label,))),
                dtype=np.int64,
            )
            if len(ids):
                conn.execute("DELETE FROM items WHERE label = ?", (label,))
                self._bump()
        return ids

    # -------------------------------------------------------------------------------------------- reads

    @_named_sqlite_errors
    def count(self) -> int:
        return int(self._db.execute("SELECT COUNT(*) FROM items").fetchone()[0])

    @_named_sqlite_errors
    def label_counts(self) -> dict[str, int]:
        """{label: number of items}, labels sorted."""
        rows = self._db.execute("SELECT label, COUNT(*) FROM items GROUP BY label ORDER BY label")
        return {label: int(n) for label, n in rows}

    def _by_id(self, ids: Sequence[int] | np.ndarray, columns: str) -> tuple[list[int], dict[int, tuple]]:
        """(wanted ids in order, {id: row}) with `columns` fetched in IN (...) batches of at most _MAX_PARAMS."""
        array = np.atleast_1d(np.asarray(ids))
        if array.size and not np.issubdtype(array.dtype, np.integer):
            raise InvalidInputError(f"ids must be integers, got dtype {array.dtype}")
        wanted = [int(i) for i in array.reshape(-1)]
        unique = sorted(set(wanted))
        found: dict[int, tuple] = {}
        for start in range(0, len(unique), _MAX_PARAMS):
            chunk = unique[start : start + _MAX_PARAMS]
            marks = ",".join("?" * len(chunk))
            for row in self._db.execute(f"SELECT id, {columns} FROM items WHERE id IN ({marks})", chunk):
                found[row[0]] = row
        return wanted, found

    @_named_sqlite_errors
    def items(self, ids: Sequence[int] | np.ndarray) -> list[Item | None]:
        """Items in the order of `ids`; None for an id the store does not hold."""
        wanted, found = self._by_id(ids, "label, path, sha256")
        items = {i: Item(*row) for i, row in found.items()}
        return [items.get(i) for i in wanted]

    @_named_sqlite_errors
    def labels_and_paths(self, ids: Sequence[int] | np.ndarray) -> dict[int, tuple[str, str]]:
        """{id: (label, path)} for the ids the store holds (search results' lazy lookup: no Item objects)."""
        _, found = self._by_id(ids, "label, path")
        return {i: (row[1], row[2]) for i, row in found.items()}

    @_named_sqlite_errors
    def labels_of(self, ids: Sequence[int] | np.ndarray) -> list[str | None]:
        """Labels in the order of `ids`; None for an id the store does not hold."""
        wanted, found = self._by_id(ids, "label")
        return [found[i][1] if i in found else None for i in wanted]

    @_named_sqlite_errors
    def vectors(self, label: str | None = None) -> tuple[np.ndarray, np.ndarray]:
        """(ids (n,) int64, vectors (n, dim) float32) in id order, optionally of one label only."""
        if label is None:
            rows = self._db.execute("SELECT id, vector FROM items ORDER BY id").fetchall()
        else:
            rows = self._db.execute("SELECT id, vector FROM items WHERE label = ? ORDER BY id", (label,)).fetchall()
        ids = np.fromiter((r[0] for r in rows), dtype=np.int64, count=len(rows))
        # One join + one frombuffer instead of n small arrays: fast for 100k+ rows.
        blob = b"".join(r[1] for r in rows)
        if len(blob) != len(rows) * self.dim * 4:
            raise CorruptIndexError(f"{self.path}: a stored vector does not hold {self.dim} float32 values")
        # astype copies into a writable, native-endian array (frombuffer over bytes is read-only).
        vectors = np.frombuffer(blob, dtype="<f4").reshape(len(rows), self.dim).astype(np.float32)
        if not np.isfinite(vectors).all():  # add() refuses NaN / inf, so these are damaged bytes
            raise CorruptIndexError(f"{self.path}: a stored vector holds NaN or infinity (damaged store)")
        return ids, vectors

    @_named_sqlite_errors
    def all_labels(self) -> tuple[np.ndarray, list[str]]:
        """(ids, labels) of every item in id order."""
        rows = self._db.execute("SELECT id, label FROM items ORDER BY id").fetchall()
        return np.fromiter((r[0] for r in rows), dtype=np.int64, count=len(rows)), [r[1] for r in rows]

    @_named_sqlite_errors
    def known_hashes(self) -> set[str]:
        return {r[0] for r in self._db.execute("SELECT DISTINCT sha256 FROM items")}

    @_named_sqlite_errors
    def insert_with_ids(
        self, ids: np.ndarray, labels: Sequence[str], paths: Sequence[str], hashes: Sequence[str], vectors: np.ndarray
    ) -> None:
        """Insert a batch under the given ids (an import keeping its ids) in one transaction.

        Refuses (InvalidInputError, nothing written) ids that are negative, repeated, or already in use.
        """
        labels, paths, hashes, vectors = self._checked_batch(labels, paths, hashes, vectors)
        n = len(vectors)
        ids = as_ids(ids, n)  # integers, 1-D, one per vector, no repeats
        if n == 0:
            return
        if ids.min() < 1:  # SQLite rowids of this table start at 1
            raise InvalidInputError(f"ids must be positive, got {int(ids.min())}")
        rows = [(int(ids[i]), labels[i], paths[i], hashes[i], vectors[i].tobytes()) for i in range(n)]
        with self._transaction() as conn:
            try:
                conn.executemany("INSERT INTO items(id, label, path, sha256, vector) VALUES (?, ?, ?, ?, ?)", rows)
            except sqlite3.IntegrityError:
                raise InvalidInputError(f"{self.path}: an id of the batch is already in use") from None
            self._bump()

    def iter_rows(
        self, columns: str = "label, vector", chunk: int = 65536, after: int = 0
    ) -> Iterator[tuple[np.ndarray, list[tuple]]]:
        """(ids (n,) int64, rows) in id order, `chunk` rows at a time: all items (with an id above `after`) in
        bounded memory.

        `columns` is a comma-separated subset of label, path, sha256, vector (checked: never user text in SQL).
        """
        wanted = [c.strip() for c in columns.split(",")]
        if not wanted or any(c not in ("label", "path", "sha256", "vector") for c in wanted):
            raise InvalidInputError(f"unknown columns {columns!r}")
        try:
            cursor = self._db.execute(f"SELECT id, {', '.join(wanted)} FROM items WHERE id > ? ORDER BY id",
                                      (int(after),))
        except sqlite3.Error as exc:
            raise _named_error(self.path, exc) from None
        while True:
            try:  # a generator: the decorator's translation cannot reach errors raised while it is iterated
                rows = cursor.fetchmany(chunk)
            except sqlite3.Error as exc:
                raise _named_error(self.path, exc) from None
            if not rows:
                return
            yield np.fromiter((r[0] for r in rows), dtype=np.int64, count=len(rows)), [r[1:] for r in rows]

    @_named_sqlite_errors
    def label_path_hashes(self) -> dict[tuple[str, str], str]:
        """{(label, path): sha256} of every item: a resumed build re-hashes such a file but does not decode it again."""
        return {(r[0], r[1]): r[2] for r in self._db.execute("SELECT label, path, sha256 FROM items ORDER BY id")}

    @_named_sqlite_errors
    def known_label_hashes(self) -> set[tuple[str, str]]:
        """(label, sha256) of every item: what a resumed build skips."""
        return {(r[0], r[1]) for r in self._db.execute("SELECT label, sha256 FROM items")}

    @_named_sqlite_errors
    def ids_by_label_hash(self, pairs: Sequence[tuple[str, str]]) -> dict[tuple[str, str], int]:
        """{(label, sha256): id} for those of `pairs` already stored (the lowest id where one is held twice). Looked
        up through the sha256 index, so adding a few images to a large index does not read every hash."""
        found: dict[tuple[str, str], int] = {}
        for label, digest in dict.fromkeys(pairs):
            if not is_utf8(label):  # cannot be stored either: `add` refuses it with its own message
                continue
            row = self._db.execute(
                "SELECT MIN(id) FROM items WHERE sha256 = ? AND label = ?", (digest, label)
            ).fetchone()
            if row and row[0] is not None:
                found[(label, digest)] = int(row[0])
        return found

    @_named_sqlite_errors
    def reroot_paths(self, old: str, new: str) -> int:
        """Replace the leading `old` of every stored path with `new` (images moved to another folder); returns how
        many paths changed. `old` matches whole path components only: /data/a does not rewrite /data/ab/x.png."""
        old, new = old.rstrip("/\\") or old, new.rstrip("/\\") or new
        changed = 0
        with self._transaction() as conn:
            rows = conn.execute(
                "SELECT id, path FROM items WHERE path = ? OR substr(path, 1, ?) IN (?, ?)",
                (old, len(old) + 1, old + "/", old + "\\"),
            ).fetchall()
            for item_id, path in rows:
                conn.execute("UPDATE items SET path = ? WHERE id = ?", (new + path[len(old):], item_id))
                changed += 1
            if changed:
                self._bump()  # a committed write like any other: caches of paths (the item table) follow it
        return changed
