"""MilvusBackend: a VectorBackend on one Milvus collection, through pymilvus.MilvusClient.

uri: a file path ending in ".db" is Milvus Lite (embedded, pip `milvus-lite`; one process at a time per file);
an http(s):// URI is a Milvus standalone server or cluster (token: `token=`, else $SIAMESEDB_MILVUS_TOKEN).

The collection: id INT64 primary key (chosen by the caller, no auto id), label / path / sha256 VARCHAR, vector
FLOAT_VECTOR(D). Choices, and why:
- Metric: "cosine" is Milvus's IP (inner product), not COSINE: SiameseDB's vectors are already L2-normalised and
  the FAISS backend scores with the inner product, so IP gives the same numbers as FAISS (COSINE would normalise
  again: extra work, and different scores for a vector that is not exactly unit-length). "euclidean" is L2, whose
  Milvus distance is the squared distance: score = -sqrt(distance), so higher is more similar, as in index.py.
- Consistency: the collection is created with consistency level "Strong", and every search / query asks for
  "Strong" too (a collection someone else created may say otherwise): a write is visible to the very next search,
  from this handle or another. A server is never flushed (Strong already gives read-your-writes; flush is slow and
  rate-limited there, and the server seals and indexes segments itself). Milvus Lite is flushed lazily, before
  the first search after a write and on close: Lite searches unflushed rows on a slow path (measured 2026-12-01,
  20k x 64: 300 ms a query unflushed, 16 ms flushed), and one flush after a batch of adds is cheap.
- Label filters run inside Milvus (`label in ["a", "b"]`, each label a string literal with quotes, backslashes
  and line breaks escaped the way Milvus's parser reads them), so k hits of the wanted labels come back whenever
  they exist.
- Milvus has no multi-request transaction: `add` refuses ids already held (Milvus would keep both rows), sends
  batches under Milvus's 64 MB request limit, and deletes what it inserted if a later batch fails.
- Id allocation and the version live in Milvus itself, in a one-row second collection `<collection>_meta` (id 0;
  `mark`: the highest id ever handed out or stored; `version`; a dim-2 dummy vector, since Milvus wants a vector
  field in every collection), so every machine that reaches the collection shares them (an index folder's manifest
  is not shared). `add(None, ...)` hands out mark+1, mark+2, ... and records the new mark *before* inserting a row:
  a crash mid-add wastes ids, never reuses one (ids start at 1, as in the SQLite store). Every committed write then
  moves the version (after its rows are in, so a cache keyed on the version never outlives the data it saw; a
  crash between the rows and that bump leaves the version unmoved until the next write). Read-modify-write on one
  row: safe for **one writer at a time per collection** (SiameseDB's lock does that for Milvus Lite, a one-process
  file anyway); several writers on a Milvus server must take their ids from one allocator (one writer process, or
  ids passed to `add`), else two may hand out the same ids.
numpy only: no torch import (tests check it).
"""

from __future__ import annotations

import contextlib
import logging
import os
import threading
from collections.abc import Iterator, Sequence
from contextlib import AbstractContextManager
from pathlib import Path
from typing import Any

import numpy as np

from siamesedb.backends import Item, LabelFilter
from siamesedb.backends.checks import as_ids, as_item_fields, as_k, as_positive, as_vectors
from siamesedb.errors import (
    CorruptIndexError,
    DimensionMismatchError,
    IndexLockedError,
    IndexNotFoundError,
    InvalidInputError,
    SiameseDBError,
    StorageError,
)

INSTALL_HINT = "pip install siamesedb[milvus]"
TOKEN_ENV = "SIAMESEDB_MILVUS_TOKEN"
# SiameseDB metric -> Milvus metric type (see the module docstring for why IP and not COSINE).
METRICS = {"cosine": "IP", "euclidean": "L2"}
INDEX_TYPES = ("FLAT", "IVF_FLAT", "HNSW", "GPU_CAGRA", "GPU_IVF_FLAT")
# Build parameters when the caller names none: Milvus's own documented defaults / FAISS-like sizes.
DEFAULT_BUILD_PARAMS = {
    "FLAT": {},
    "IVF_FLAT": {"nlist": 1024},
    "HNSW": {"M": 32, "efConstruction": 200},  # the FAISS backend's graph is HNSW32
    "GPU_CAGRA": {},
    "GPU_IVF_FLAT": {"nlist": 1024},
}
FIELD_BYTES = {"label": 65_535, "path": 65_535, "sha256": 128}  # VARCHAR max_length (65,535 is Milvus's cap)
MAX_TOPK = 16_384  # Milvus's limits on topk and on queries per search request
MAX_NQ = 16_384
REQUEST_BYTES = 32 * 2**20  # aim well under Milvus's 64 MB per insert / search request
READ_BATCH = 4_096  # rows per query-iterator page, ids per query(ids=...) call
HASH_BATCH = 256  # content hashes per `sha256 in [...]` filter (ids_by_label_hash)
ROW_COLUMNS = ("label", "path", "sha256", "vector")  # what iter_rows may name
META_SUFFIX = "_meta"  # <collection>_meta: the id high-water mark and the version, one row (id 0)
META_FIELDS = ("id", "mark", "version", "vector")
# Which search knobs an index type takes, and what a search uses when neither the call nor the handle names one
# (the FAISS backend's measured auto defaults: nprobe 16, efSearch 64).
SEARCH_KNOBS = {"FLAT": (), "IVF_FLAT": ("nprobe",), "GPU_IVF_FLAT": ("nprobe",), "HNSW": ("ef_search",),
                "GPU_CAGRA": ("ef_search",)}
STARTING_DEFAULTS = {"nprobe": 16, "ef_search": 64}


class _QuietPymilvus(logging.Filter):
    """Drops log lines that would break the CLI's one-line errors or are noise: pymilvus's RPC errors and Milvus
    Lite's "failed to start" traceback (each is raised here as one named error instead), and the query iterator's
    timestamp probe, which Milvus Lite does not implement ("Method not implemented" from its in-process gRPC server,
    then "use client-side ts": the client-side timestamp still sees every write made before the read)."""

    NOISE = ("RPC error", "client-side ts", "Method not implemented", "Failed to start MilvusLite server")

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        return not any(noise in message for noise in self.NOISE)


_QUIETED = (
    "pymilvus.decorators",
    "pymilvus.client.iterator.query_iterator",
    "grpc._server",
    "milvus_lite.server_manager",
)
# Milvus Lite runs one in-process server per file, shared by every client of that file in this process and kept
# (holding the file's lock) until released: count our open handles per file, release it when the last one closes.
_LITE_HANDLES: dict[str, int] = {}
_LITE_LOCK = threading.Lock()


def _pymilvus() -> Any:
    try:
        import pymilvus
    except ImportError:
        raise InvalidInputError(f"the Milvus backend needs pymilvus: {INSTALL_HINT}") from None
    for name in _QUIETED:
        logger = logging.getLogger(name)
        if not any(isinstance(f, _QuietPymilvus) for f in logger.filters):
            logger.addFilter(_QuietPymilvus())
    return pymilvus


# Milvus's expression parser knows only the short escapes (\\ \" \n \r \t ...): no \uXXXX, \xNN or octal, and a raw
# line break ends the literal. So: escape those five, and pass every other character (other controls too) as is.
_ESCAPES = str.maketrans({"\\": "\\\\", '"': '\\"', "\n": "\\n", "\r": "\\r", "\t": "\\t"})


def label_literal(label: str) -> str:
    """`label` as a double-quoted string literal in a Milvus filter expression, read back by Milvus exactly
    (tests check quotes, backslashes, line breaks, other control characters and non-BMP Unicode)."""
    return '"' + label.translate(_ESCAPES) + '"'


def label_filter(labels: LabelFilter) -> str | None:
    """A Milvus boolean expression selecting `labels`; "" for no restriction; None when nothing can match."""
    if labels is None:
        return ""
    wanted = [labels] if isinstance(labels, str) else list(labels)
    if any(not isinstance(label, str) for label in wanted):
        raise InvalidInputError("labels to filter on must be strings")
    if not wanted:
        return None
    return f"label in [{', '.join(label_literal(label) for label in dict.fromkeys(wanted))}]"


def is_server_uri(uri: str) -> bool:
    return uri.startswith(("http://", "https://", "tcp://", "grpc://", "unix:"))


class MilvusBackend:
    """One Milvus collection as a VectorBackend (see siamesedb/backends/__init__.py for the contract).

    Opens the collection if it exists (checking its dimension and metric), else creates it (`must_exist=True`:
    IndexNotFoundError instead). `search_defaults` {"nprobe" / "ef_search": n}: the handle's starting knobs (those
    the collection's index type does not take are dropped); SiameseDB keeps them in its manifest.
    """

    def __init__(
        self,
        uri: str | os.PathLike,
        collection: str,
        dimension: int,
        metric: str = "cosine",
        index_type: str = "FLAT",
        token: str | None = None,
        build_params: dict | None = None,
        search_defaults: dict[str, int] | None = None,
        must_exist: bool = False,
    ):
        if metric not in METRICS:
            raise InvalidInputError(f"unknown metric {metric!r}; choose from {', '.join(METRICS)}")
        if index_type not in INDEX_TYPES:
            raise InvalidInputError(f"unknown Milvus index type {index_type!r}; choose from {', '.join(INDEX_TYPES)}")
        dimension = as_positive(dimension, "dimension")
        if dimension is None:
            raise InvalidInputError("dimension must be a positive integer, got None")
        self.dimension = dimension
        self.metric = metric
        self.index_type = index_type
        self.collection = str(collection)
        self.uri, self.lite = self._resolve_uri(uri)
        self._client: Any = None
        self.meta_collection = self.collection + META_SUFFIX
        self._unflushed = False  # Milvus Lite only: written since the last flush
        self._meta_unflushed = False
        self._search_defaults: dict[str, int] = {}
        pymilvus = _pymilvus()
        self._exception = pymilvus.MilvusException
        if token is None and not self.lite:
            token = os.environ.get(TOKEN_ENV, "")
        try:
            self._client = pymilvus.MilvusClient(uri=self.uri, token=token or "")
        except self._exception as exc:
            raise self._open_error(exc) from None
        if self.lite:
            with _LITE_LOCK:
                _LITE_HANDLES[self.uri] = _LITE_HANDLES.get(self.uri, 0) + 1
        try:
            if self._call("has_collection", self.collection):
                self._check_existing()
            elif must_exist:
                raise IndexNotFoundError(f"{self.uri}: no Milvus collection {self.collection!r} there")
            else:
                self._create(pymilvus.DataType, build_params)
            self._open_meta(pymilvus.DataType)
            # Starting knobs (the FAISS backend's measured auto defaults; Milvus accepts an nprobe above nlist).
            self._search_defaults = {knob: STARTING_DEFAULTS[knob] for knob in SEARCH_KNOBS.get(self.index_type, ())}
            for knob, value in (search_defaults or {}).items():
                # Settings recorded for another index type (the collection's own type decides) are dropped.
                if knob in SEARCH_KNOBS.get(self.index_type, ()) and value is not None:
                    self._search_defaults[knob] = as_positive(value, knob)
        except BaseException:
            self.close()
            raise

    # ------------------------------------------------------------------------------------------ opening

    @staticmethod
    def _resolve_uri(uri: str | os.PathLike) -> tuple[str, bool]:
        """(uri as pymilvus wants it, is Milvus Lite): a Lite file becomes an absolute path ending in .db."""
        text = os.fspath(uri)
        if not isinstance(text, str) or not text:
            raise InvalidInputError(f"a Milvus URI must be a non-empty string, got {uri!r}")
        if is_server_uri(text):
            return text, False
        path = Path(text).expanduser().absolute()
        if path.suffix != ".db":  # pymilvus starts Milvus Lite only for names ending in .db
            raise InvalidInputError(f"{path}: a Milvus Lite file name must end in .db (or give an http(s):// URI)")
        if not path.parent.is_dir():
            raise IndexNotFoundError(f"{path.parent}: folder not found (for the Milvus Lite file {path.name})")
        return str(path), True

    def _open_error(self, exc: Exception) -> SiameseDBError:
        reason = _reason(exc)
        if self.lite and "milvus-lite is required" in reason:
            return InvalidInputError(f"{self.uri}: Milvus Lite needs the milvus-lite package: {INSTALL_HINT}")
        if self.lite and "Open local milvus failed" in reason:
            return IndexLockedError(
                f"{self.uri}: Milvus Lite could not open this file; another process probably has it open. A Milvus "
                f"Lite file serves one process at a time: close the other one, or use a Milvus server "
                f"(http://...) for several processes"
            )
        return StorageError(f"{self.uri}: cannot reach Milvus ({reason})")

    def _create(self, DataType: Any, build_params: dict | None) -> None:
        schema = self._client.create_schema(auto_id=False, enable_dynamic_field=False)
        schema.add_field("id", DataType.INT64, is_primary=True)
        for field, most in FIELD_BYTES.items():
            schema.add_field(field, DataType.VARCHAR, max_length=most)
        schema.add_field("vector", DataType.FLOAT_VECTOR, dim=self.dimension)
        index = self._client.prepare_index_params()
        params = DEFAULT_BUILD_PARAMS[self.index_type] if build_params is None else dict(build_params)
        index.add_index(
            field_name="vector", index_type=self.index_type, metric_type=METRICS[self.metric], params=params
        )
        self._call("create_collection",
            self.collection,
            schema=schema,
            index_params=index,
            consistency_level="Strong",
        )

    def _check_existing(self) -> None:
        """The collection must have our fields, our dimension and our metric (else: some other collection)."""
        info = self._call("describe_collection", self.collection)
        fields = {f["name"]: f for f in info.get("fields", [])}
        if not {"id", "label", "path", "sha256", "vector"} <= set(fields):
            raise CorruptIndexError(
                f"{self.uri}: collection {self.collection!r} exists but is not a siamesedb collection "
                f"(fields: {', '.join(sorted(fields))})"
            )
        dim = int(fields["vector"].get("params", {}).get("dim", -1))
        if dim != self.dimension:
            raise DimensionMismatchError(
                f"{self.uri}: collection {self.collection!r} holds {dim}-d vectors, not {self.dimension}-d"
            )
        index = self._call("describe_index", self.collection, "vector") or {}
        held_metric = str(index.get("metric_type", "")).upper()
        if held_metric and held_metric != METRICS[self.metric]:
            raise CorruptIndexError(
                f"{self.uri}: collection {self.collection!r} uses metric {held_metric}, not "
                f"{METRICS[self.metric]} ({self.metric})"
            )
        self.index_type = str(index.get("index_type", self.index_type))  # what it was built with decides
        self._call("load_collection", self.collection)

    def _open_meta(self, DataType: Any) -> None:
        """Open (or create) <collection>_meta; a collection made before it existed gets mark = its highest id."""
        name = self.meta_collection
        if self._call("has_collection", name):
            info = self._call("describe_collection", name)
            fields = {f["name"] for f in info.get("fields", [])}
            if not set(META_FIELDS) <= fields:
                raise CorruptIndexError(
                    f"{self.uri}: collection {name!r} exists but is not the id / version record of {self.collection!r} "
                    f"(fields: {', '.join(sorted(fields))})"
                )
            self._call("load_collection", name)
        else:
            schema = self._client.create_schema(auto_id=False, enable_dynamic_field=False)
            schema.add_field("id", DataType.INT64, is_primary=True)
            schema.add_field("mark", DataType.INT64)
            schema.add_field("version", DataType.INT64)
            schema.add_field("vector", DataType.FLOAT_VECTOR, dim=2)  # unused: Milvus wants a vector field
            index = self._client.prepare_index_params()
            index.add_index(field_name="vector", index_type="FLAT", metric_type="L2", params={})
            self._call("create_collection", name, schema=schema, index_params=index, consistency_level="Strong")
        if not self._meta_row():  # new, or created by a process that died before writing its row
            held = self._ids_where("")
            self._write_meta(max(int(held[-1]) if len(held) else 0, 0), 0)

    def _meta_row(self) -> dict | None:
        rows = self._call("query", self.meta_collection, ids=[0], output_fields=["mark", "version"],
                          consistency_level="Strong")
        return rows[0] if rows else None

    def _read_meta(self) -> tuple[int, int]:
        """(mark: the highest id ever handed out or stored, version), as committed in Milvus now."""
        row = self._meta_row()
        if row is None:
            raise CorruptIndexError(
                f"{self.uri}: the id / version record {self.meta_collection!r} of {self.collection!r} lost its row"
            )
        return int(row["mark"]), int(row["version"])

    def _write_meta(self, mark: int, version: int) -> None:
        self._meta_unflushed = True
        self._call("upsert", self.meta_collection,
                   [{"id": 0, "mark": int(mark), "version": int(version), "vector": [0.0, 0.0]}])

    def _bump(self) -> None:
        """A write committed: move the version (after the write, see the module docstring)."""
        mark, version = self._read_meta()
        self._write_meta(mark, version + 1)

    # ------------------------------------------------------------------------------------------ plumbing

    @property
    def closed(self) -> bool:
        return self._client is None

    def _call(self, method: str | Any, *args: Any, **kwargs: Any) -> Any:
        """A pymilvus call (a MilvusClient method by name, or any callable), its MilvusException turned into one
        named line."""
        if self._client is None:
            raise InvalidInputError(f"{self.uri}: the Milvus backend is closed")
        if isinstance(method, str):
            method = getattr(self._client, method)
        try:
            return method(*args, **kwargs)
        except self._exception as exc:
            raise StorageError(f"{self.uri} ({self.collection}): Milvus refused: {_reason(exc)}") from None

    def _query(self, **kwargs: Any) -> list[dict]:
        return self._call("query", self.collection, consistency_level="Strong", **kwargs)

    def _iterate(self, filter: str, fields: list[str]) -> Iterator[list[dict]]:
        """Every row matching `filter`, READ_BATCH at a time (Milvus caps one query's result size)."""
        iterator = self._call("query_iterator",
            self.collection,
            batch_size=READ_BATCH,
            filter=filter,
            output_fields=fields,
            consistency_level="Strong",
        )
        try:
            while True:
                page = self._call(iterator.next)
                if not page:
                    return
                yield list(page)
        finally:
            iterator.close()

    def _held(self, ids: np.ndarray) -> np.ndarray:
        """Which of `ids` the collection holds, sorted."""
        held: list[int] = []
        for start in range(0, len(ids), READ_BATCH):
            chunk = ids[start : start + READ_BATCH].tolist()
            held.extend(int(row["id"]) for row in self._query(ids=chunk, output_fields=["id"]))
        return np.unique(np.asarray(held, dtype=np.int64))

    # ------------------------------------------------------------------------------------------ writes

    def add(
        self,
        ids: np.ndarray | None,
        labels: Sequence[str],
        paths: Sequence[str | os.PathLike],
        hashes: Sequence[str],
        vectors: np.ndarray,
    ) -> np.ndarray:
        """Store n items; returns their ids (n,) int64 in input order. `ids` None: fresh ids above every id this
        collection ever handed out or stored (its `_meta` mark); given ids: none may be held now (a removed id may
        come back only this way, as in the SQLite store's import). One writer at a time (module docstring)."""
        vectors = as_vectors(vectors, self.dimension)  # (n, D) float32, finite
        n = len(vectors)
        if ids is not None:
            ids = as_ids(ids, n)
        labels, paths, hashes = as_item_fields(labels, paths, hashes, n, FIELD_BYTES)
        if n == 0:
            return np.empty(0, dtype=np.int64)
        mark, version = self._read_meta()
        if ids is None:
            ids = np.arange(mark + 1, mark + 1 + n, dtype=np.int64)
        else:
            held = self._held(ids)
            if len(held):
                shown = ", ".join(str(i) for i in held[:5]) + (" ..." if len(held) > 5 else "")
                raise InvalidInputError(f"{len(held)} of these ids are already held ({shown}); ids are never reused")
        top = max(mark, int(ids.max()))
        if top != mark:
            self._write_meta(top, version)  # spend the ids before any row carries one: a crash never reuses them
        rows = [
            {"id": int(ids[i]), "label": labels[i], "path": paths[i], "sha256": hashes[i], "vector": vectors[i]}
            for i in range(n)
        ]
        done = 0
        try:
            for batch in _batches(rows, self.dimension):
                self._unflushed = True
                self._call("insert", self.collection, batch)
                done += len(batch)
        except BaseException:
            if done:  # undo the batches that went in, so the add is all or nothing (best effort)
                try:
                    self._client.delete(self.collection, ids=ids[:done].tolist())
                    self._write_meta(top, version + 1)  # readers may have seen the rows meanwhile
                except Exception:  # noqa: BLE001 - the first failure is the one to report
                    pass
            raise
        self._write_meta(top, version + 1)
        return ids.copy()

    def remove(self, ids: np.ndarray) -> int:
        """Remove these ids (unknown and negative ones are ignored, as in the SQLite store); returns how many were
        held."""
        _, ids = _lookup_ids(ids)
        held = self._held(ids)
        for start in range(0, len(held), READ_BATCH):
            self._unflushed = True
            self._call("delete", self.collection, ids=held[start : start + READ_BATCH].tolist())
        if len(held):
            self._bump()
        return len(held)

    def remove_label(self, label: str) -> np.ndarray:
        if not isinstance(label, str) or not label:
            raise InvalidInputError("a label must be a non-empty string")
        ids = self._ids_where(f"label == {label_literal(label)}")
        for start in range(0, len(ids), READ_BATCH):
            # By id, not by filter: exactly the ids returned go, even if another writer adds to the label meanwhile.
            self._unflushed = True
            self._call("delete", self.collection, ids=ids[start : start + READ_BATCH].tolist())
        if len(ids):
            self._bump()
        return ids

    def reroot_paths(self, old: str, new: str) -> int:
        """Replace the leading `old` of every stored path with `new`, whole components only (as the SQLite store:
        trailing separators of old / new dropped; /data/a matches /data/a, /data/a/x and /data/a\\x, not
        /data/ab/x); returns how many paths changed. Rows are upserted whole (same id, label, hash and vector).
        Scans every path (id + path only): a rare, whole-collection operation."""
        if not isinstance(old, str) or not isinstance(new, str):
            raise InvalidInputError("old and new must be strings")
        old, new = old.rstrip("/\\") or old, new.rstrip("/\\") or new
        prefixes = (old + "/", old + "\\")
        moved: dict[int, str] = {}
        for page in self._iterate("", ["id", "path"]):
            for row in page:
                path = row["path"]
                if path == old or path.startswith(prefixes):
                    moved[int(row["id"])] = new + path[len(old):]
        if not moved:
            return 0
        # Every new path must fit before any row changes (the SQLite store takes any text).
        as_item_fields(["x"] * len(moved), list(moved.values()), [""] * len(moved), len(moved), FIELD_BYTES)
        ids = np.fromiter(moved, dtype=np.int64, count=len(moved))
        try:
            for start in range(0, len(ids), READ_BATCH):
                rows = self._query(ids=ids[start : start + READ_BATCH].tolist(), output_fields=["id", *ROW_COLUMNS])
                for row in rows:
                    row["path"] = moved[int(row["id"])]
                    row["vector"] = np.asarray(row["vector"], dtype=np.float32)  # bit for bit what was stored
                for batch in _batches(rows, self.dimension):
                    self._unflushed = True
                    self._call("upsert", self.collection, batch)
        finally:
            self._bump()  # also after a partial reroot (running it again finishes the job)
        return len(moved)

    # ------------------------------------------------------------------------------------------ reads

    def search(
        self,
        queries: np.ndarray,
        k: int,
        labels: LabelFilter = None,
        *,
        nprobe: int | None = None,
        ef_search: int | None = None,
    ) -> tuple[np.ndarray, np.ndarray]:
        k = as_k(k, MAX_TOPK)
        queries = as_vectors(queries, self.dimension, "queries")  # (nq, D) float32
        nprobe, ef_search = as_positive(nprobe, "nprobe"), as_positive(ef_search, "ef_search")
        expression = label_filter(labels)
        nq = len(queries)
        scores = np.full((nq, k), -np.inf, dtype=np.float32)
        ids = np.full((nq, k), -1, dtype=np.int64)
        if nq == 0 or expression is None:
            return scores, ids
        nprobe = self._search_defaults.get("nprobe") if nprobe is None else nprobe
        ef_search = self._search_defaults.get("ef_search") if ef_search is None else ef_search
        self._flush_lite()
        params = {"params": self._search_params(k, nprobe, ef_search)}
        rows_per_request = max(1, min(MAX_NQ, REQUEST_BYTES // (4 * self.dimension)))
        for start in range(0, nq, rows_per_request):
            chunk = queries[start : start + rows_per_request]
            results = self._call("search",
                self.collection,
                data=list(chunk),
                filter=expression,
                limit=k,
                output_fields=["id"],  # an empty list would return every field, vectors included
                search_params=params,
                anns_field="vector",
                consistency_level="Strong",
            )
            for row, hits in enumerate(results, start=start):
                for column, hit in enumerate(hits):
                    ids[row, column] = int(hit["id"])
                    scores[row, column] = float(hit["distance"])
        if self.metric == "euclidean":  # Milvus's L2 is the squared distance
            scores = np.where(ids >= 0, np.subtract(0, np.sqrt(np.maximum(scores, 0))), -np.inf).astype(np.float32)
        return scores, ids

    def _flush_lite(self) -> None:
        """Milvus Lite: seal what was written since the last flush, so searches take its fast (indexed) path."""
        if self.lite and self._unflushed:
            self._call("flush", self.collection)
            self._unflushed = False

    def _search_params(self, k: int, nprobe: int | None, ef_search: int | None) -> dict:
        """Per-query knobs in Milvus's names: nprobe for IVF types, ef (HNSW) / itopk_size (CAGRA) for graphs.

        Milvus refuses ef < k (FAISS just returns fewer good hits), so ef_search is raised to k there.
        """
        if self.index_type in ("IVF_FLAT", "GPU_IVF_FLAT") and nprobe is not None:
            return {"nprobe": nprobe}
        if self.index_type == "HNSW" and ef_search is not None:
            return {"ef": max(ef_search, k)}
        if self.index_type == "GPU_CAGRA" and ef_search is not None:
            return {"itopk_size": max(ef_search, k)}
        return {}

    def count(self) -> int:
        rows = self._query(filter="", output_fields=["count(*)"])
        return int(rows[0]["count(*)"]) if rows else 0

    def label_counts(self) -> dict[str, int]:
        counts: dict[str, int] = {}
        for page in self._iterate("", ["label"]):
            for row in page:
                counts[row["label"]] = counts.get(row["label"], 0) + 1
        return dict(sorted(counts.items()))

    def _by_id(self, ids: np.ndarray, fields: list[str]) -> tuple[np.ndarray, dict[int, dict]]:
        """(wanted ids in order, {id: row} for those held); negative ids (a search's -1 padding) are never held."""
        wanted, unique = _lookup_ids(ids)
        found: dict[int, dict] = {}
        for start in range(0, len(unique), READ_BATCH):
            for row in self._query(ids=unique[start : start + READ_BATCH].tolist(), output_fields=["id", *fields]):
                found[int(row["id"])] = row
        return wanted, found

    def items(self, ids: np.ndarray) -> list[Item | None]:
        wanted, found = self._by_id(ids, list(FIELD_BYTES))
        items = {i: Item(i, row["label"], row["path"], row["sha256"]) for i, row in found.items()}
        return [items.get(int(i)) for i in wanted]

    def labels_and_paths(self, ids: np.ndarray) -> dict[int, tuple[str, str]]:
        _, found = self._by_id(ids, ["label", "path"])
        return {i: (row["label"], row["path"]) for i, row in sorted(found.items())}

    def labels_of(self, ids: np.ndarray) -> list[str | None]:
        wanted, found = self._by_id(ids, ["label"])
        return [found[i]["label"] if i in found else None for i in wanted.tolist()]

    def iter_rows(self, columns: str = "label, vector", chunk: int = 65536) -> Iterator[tuple[np.ndarray, list[tuple]]]:
        """(ids (n,) int64, rows) in id order, `chunk` rows at a time, as the SQLite store's iter_rows: each row a
        tuple of the named columns (a comma-separated subset of label, path, sha256, vector; a vector as D
        little-endian float32 values in bytes). Milvus's query iterator pages in primary-key order; each page is
        sorted again and the pages checked to ascend."""
        wanted = [c.strip() for c in columns.split(",")] if isinstance(columns, str) else []
        if not wanted or any(c not in ROW_COLUMNS for c in wanted):
            raise InvalidInputError(f"unknown columns {columns!r}")
        chunk = as_positive(chunk, "chunk")
        if chunk is None:
            raise InvalidInputError("chunk must be a positive integer, got None")
        return self._iter_rows(wanted, chunk)

    def _iter_rows(self, wanted: list[str], chunk: int) -> Iterator[tuple[np.ndarray, list[tuple]]]:
        fields = ["id", *dict.fromkeys(wanted)]
        ids_out: list[np.ndarray] = []
        rows_out: list[tuple] = []
        held = 0
        for page_ids, columns in self._ordered_pages(fields):
            cells = [columns[c] for c in wanted]
            ids_out.append(page_ids)
            rows_out.extend(zip(*cells))
            held += len(page_ids)
            while held >= chunk:
                ids = np.concatenate(ids_out)
                yield ids[:chunk], rows_out[:chunk]
                ids_out, rows_out, held = [ids[chunk:]], rows_out[chunk:], held - chunk
        if held:
            yield np.concatenate(ids_out), rows_out

    def _ordered_pages(self, fields: list[str]) -> Iterator[tuple[np.ndarray, dict[str, list]]]:
        """Every row in id order, a query-iterator page at a time: (ids, {field: values}), vectors as bytes."""
        last = -1
        for page in self._iterate("", fields):
            page.sort(key=lambda row: row["id"])
            ids = np.fromiter((row["id"] for row in page), dtype=np.int64, count=len(page))
            if ids[0] <= last:  # the iterator pages by primary key; refuse rather than return rows out of order
                raise StorageError(f"{self.uri} ({self.collection}): Milvus returned rows out of id order")
            last = int(ids[-1])
            columns: dict[str, list] = {}
            for field in fields[1:]:
                if field == "vector":
                    block = np.asarray([row["vector"] for row in page], dtype="<f4").reshape(len(page), self.dimension)
                    columns[field] = [vector.tobytes() for vector in block]
                else:
                    columns[field] = [row[field] for row in page]
            yield ids, columns

    def known_label_hashes(self) -> set[tuple[str, str]]:
        return {(row["label"], row["sha256"]) for page in self._iterate("", ["label", "sha256"]) for row in page}

    def label_path_hashes(self) -> dict[tuple[str, str], str]:
        """{(label, path): sha256}; where a (label, path) is held twice the higher id's hash wins (id order, as the
        SQLite store)."""
        found: dict[tuple[str, str], str] = {}
        for _, columns in self._ordered_pages(["id", "label", "path", "sha256"]):
            found.update(zip(zip(columns["label"], columns["path"]), columns["sha256"]))
        return found

    def ids_by_label_hash(self, pairs: Sequence[tuple[str, str]]) -> dict[tuple[str, str], int]:
        """{(label, sha256): id} for those of `pairs` held (the lowest id where one is held twice): a filter on the
        hashes, HASH_BATCH at a time. Pairs no UTF-8 field can hold are never held."""
        wanted = [pair for pair in dict.fromkeys(pairs) if all(isinstance(t, str) and _is_utf8(t) for t in pair)]
        found: dict[tuple[str, str], int] = {}
        for start in range(0, len(wanted), HASH_BATCH):
            batch = wanted[start : start + HASH_BATCH]
            keys = set(batch)
            hashes = ", ".join(label_literal(digest) for digest in sorted({digest for _, digest in batch}))
            for page in self._iterate(f"sha256 in [{hashes}]", ["id", "label", "sha256"]):
                for row in page:
                    key, item_id = (row["label"], row["sha256"]), int(row["id"])
                    if key in keys and item_id < found.get(key, item_id + 1):
                        found[key] = item_id
        return {pair: found[pair] for pair in wanted if pair in found}  # in the order asked

    def vectors(self, label: str | None = None) -> tuple[np.ndarray, np.ndarray]:
        expression = "" if label is None else f"label == {label_literal(label)}"
        id_pages, vector_pages = [], []
        for page in self._iterate(expression, ["id", "vector"]):
            id_pages.append(np.fromiter((row["id"] for row in page), dtype=np.int64, count=len(page)))
            vector_pages.append(np.asarray([row["vector"] for row in page], dtype=np.float32))
        if not id_pages:
            return np.empty(0, dtype=np.int64), np.empty((0, self.dimension), dtype=np.float32)
        ids, vectors = np.concatenate(id_pages), np.concatenate(vector_pages).reshape(-1, self.dimension)
        order = np.argsort(ids, kind="stable")
        return ids[order], np.ascontiguousarray(vectors[order])

    # ------------------------------------------------------------------------------------------ consistency, tuning

    @property
    def version(self) -> int:
        """Moved by every committed write (add, remove, remove_label, reroot_paths), stored in <collection>_meta:
        every handle, in any process or machine, reads the same number (one Strong query, about 1 ms on Lite)."""
        return self._read_meta()[1]

    def snapshot(self) -> AbstractContextManager[None]:
        """A no-op: Milvus has no multi-read snapshot; each read is Strong-consistent on its own."""
        return contextlib.nullcontext()

    @property
    def search_defaults(self) -> dict[str, int]:
        """{"nprobe": n} (IVF types) / {"ef_search": n} (HNSW, GPU_CAGRA) searches use when they pass none; {} for
        FLAT. Held by this handle only: SiameseDB records them in its manifest and passes them back at open
        (`search_defaults=`)."""
        return dict(self._search_defaults)

    def set_search_defaults(self, nprobe: int | None = None, ef_search: int | None = None) -> None:
        """Change this handle's nprobe / ef_search (None: leave as is). Refuses a knob the index type does not take
        (nprobe on HNSW, either on FLAT), as the FAISS index does."""
        knobs = SEARCH_KNOBS.get(self.index_type, ())
        for name, value in (("nprobe", nprobe), ("ef_search", ef_search)):
            value = as_positive(value, name)
            if value is None:
                continue
            if name not in knobs:
                takes = " / ".join(t for t, k in SEARCH_KNOBS.items() if name in k)
                raise InvalidInputError(f"{name} applies to {takes} collections; this one is {self.index_type}")
            self._search_defaults[name] = value

    def _ids_where(self, expression: str) -> np.ndarray:
        pages = [np.fromiter((r["id"] for r in page), dtype=np.int64) for page in self._iterate(expression, ["id"])]
        return np.sort(np.concatenate(pages)) if pages else np.empty(0, dtype=np.int64)

    def describe(self) -> dict:
        import pymilvus

        return {
            "backend": "milvus",
            "uri": self.uri,  # never the token
            "lite": self.lite,
            "collection": self.collection,
            "dimension": self.dimension,
            "metric": self.metric,
            "milvus_metric": METRICS[self.metric],
            "index_type": self.index_type,
            "search_defaults": self.search_defaults,
            "consistency": "Strong",
            "count": self.count(),
            "pymilvus": pymilvus.__version__,
        }

    def close(self) -> None:
        """Close the connection; for Milvus Lite, also stop this process's server of the file once no handle here
        uses it, so that another process can open the file."""
        if self._client is None:
            return
        try:
            self._flush_lite()
            if self.lite and self._meta_unflushed:  # not for durability (Lite keeps unflushed rows, kill -9 too):
                self._call("flush", self.meta_collection)  # keeps the one-row record's unsealed history short
                self._meta_unflushed = False
        finally:
            client, self._client = self._client, None
            client.close()
            if self.lite:
                _release_lite(self.uri)

    def __enter__(self) -> MilvusBackend:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"MilvusBackend({self.uri!r}, {self.collection!r}, dimension={self.dimension}, metric={self.metric!r})"


def _release_lite(uri: str) -> None:
    """One handle of Lite file `uri` closed: stop this process's Lite server of it when it was the last."""
    with _LITE_LOCK:
        left = _LITE_HANDLES.get(uri, 1) - 1
        if left > 0:
            _LITE_HANDLES[uri] = left
            return
        _LITE_HANDLES.pop(uri, None)
    from milvus_lite.server_manager import server_manager_instance

    server_manager_instance.release_server(uri)


def _lookup_ids(ids: np.ndarray | Sequence[int]) -> tuple[np.ndarray, np.ndarray]:
    """(ids as given, int64; the distinct non-negative ones, sorted) for reads and removal: integers, 1-D; negative
    ids are allowed and never held (a search's -1 padding), as in the SQLite store."""
    array = np.atleast_1d(np.asarray(ids))
    if array.ndim != 1:
        raise InvalidInputError(f"ids must be a 1-D array, got shape {array.shape}")
    if len(array) == 0:
        return np.empty(0, dtype=np.int64), np.empty(0, dtype=np.int64)
    if not np.issubdtype(array.dtype, np.integer):
        raise InvalidInputError(f"ids must be integers, got dtype {array.dtype}")
    array = array.astype(np.int64)
    unique = np.unique(array)
    return array, unique[unique >= 0]


def _is_utf8(text: str) -> bool:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def _batches(rows: list[dict], dim: int) -> Iterator[list[dict]]:
    """`rows` in insert requests of at most about REQUEST_BYTES each (vector + text fields)."""
    batch: list[dict] = []
    size = 0
    for row in rows:
        row_bytes = 4 * dim + 8 + len(row["label"]) * 4 + len(row["path"]) * 4 + len(row["sha256"]) + 64
        if batch and size + row_bytes > REQUEST_BYTES:
            yield batch
            batch, size = [], 0
        batch.append(row)
        size += row_bytes
    if batch:
        yield batch


def _reason(exc: Exception) -> str:
    """A MilvusException's own message, on one line."""
    message = getattr(exc, "message", None) or str(exc) or type(exc).__name__
    line = " ".join(str(message).split())
    return line if len(line) <= 300 else line[:297] + "..."

