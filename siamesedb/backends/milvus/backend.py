"""MilvusBackend: a VectorBackend on one Milvus collection, through pymilvus.MilvusClient.

uri: a file path ending in ".db" is Milvus Lite (embedded, pip `milvus-lite`; one process at a time per file);
an http(s):// URI is a Milvus standalone server or cluster (token: `token=`, else $SIAMESEDB_MILVUS_TOKEN).

The backend in parts: this module (the collection's schema, creating and opening, writes, search, tuning, close),
over client.py (the connection: pymilvus, Milvus Lite bookkeeping, named errors, paging, request batching), meta.py
(the `<collection>_meta` record: id high-water mark + version), rows.py (reads of stored rows), expr.py (filter
expressions), index_types.py (index types, knobs, metric types) and manifest.py (what the manifest records).
backend_options: "uri" (a Milvus server http(s)://..., or a Lite file; default a Lite file in the index folder).

The collection: id INT64 primary key (chosen by the caller, no auto id), label / path / sha256 VARCHAR, vector
FLOAT_VECTOR(D). Choices, and why:
- Metric: "cosine" is Milvus's IP, "euclidean" L2 (index_types.py says why not COSINE); Milvus's L2 distance is
  the squared distance: score = -sqrt(distance), so higher is more similar, as in the FAISS backend.
- Consistency: the collection is created with consistency level "Strong", and every search / query asks for
  "Strong" too (a collection someone else created may say otherwise): a write is visible to the very next search,
  from this handle or another. A server is never flushed (Strong already gives read-your-writes; flush is slow and
  rate-limited there, and the server seals and indexes segments itself). Milvus Lite is flushed lazily, before
  the first search after a write and on close: Lite searches unflushed rows on a slow path (measured 2026-12-01,
  20k x 64: 300 ms a query unflushed, 16 ms flushed), and one flush after a batch of adds is cheap.
- Label filters run inside Milvus (expr.py), so k hits of the wanted labels come back whenever they exist.
- Milvus has no multi-request transaction: `add` refuses ids already held (Milvus would keep both rows), sends
  batches under Milvus's 64 MB request limit, and deletes what it inserted if a later batch fails.
- Id reservations, the version and the documents every host shares (calibrations) live in Milvus itself, in side
  collections (meta.py), so every machine that reaches the collection shares them: `add(None, ...)` reserves its
  ids through `<collection>_log` (server-assigned keys; a claim wins only if no other overlaps it), so **any number
  of writers on any hosts** may add at once and no id is ever handed out twice; a crash wastes ids, never reuses
  one. Every committed write appends a log row after its rows are in, which moves the version.
numpy only: no torch import (tests check it).
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Mapping, Sequence
from contextlib import AbstractContextManager
from pathlib import Path
from typing import Any, ClassVar

import numpy as np

from siamesedb.backends.base import BackendBase, scores_from_squared_l2
from siamesedb.backends.items import LabelFilter
from siamesedb.backends.milvus.client import READ_BATCH, REQUEST_BYTES, _batches
from siamesedb.backends.milvus.expr import label_filter, label_literal
from siamesedb.backends.milvus.index_types import (
    DEFAULT_BUILD_PARAMS,
    INDEX_TYPES,
    MAX_NQ,
    MAX_TOPK,
    METRIC_TYPES,
    SEARCH_KNOBS,
    STARTING_DEFAULTS,
    milvus_index_type,
)
from siamesedb.backends.milvus.manifest import new_record, read_record, resolve_uri
from siamesedb.backends.milvus.meta import META_SUFFIX, MetaRecord
from siamesedb.backends.milvus.rows import (
    FIELD_BYTES,
    ROW_COLUMNS,
    RowReads,
    _lookup_ids,
)
from siamesedb.checks import as_ids, as_item_fields, as_k, as_positive, as_vectors
from siamesedb.errors import (
    CorruptIndexError,
    DimensionMismatchError,
    IndexNotFoundError,
    InvalidInputError,
)


class MilvusBackend(BackendBase, RowReads, MetaRecord):
    """One Milvus collection as a VectorBackend (see siamesedb/backends/__init__.py for the contract).

    Opens the collection if it exists (checking its dimension and metric), else creates it (`must_exist=True`:
    IndexNotFoundError instead). `search_defaults` {"nprobe" / "ef_search": n}: the handle's starting knobs (those
    the collection's index type does not take are dropped); SiameseDB keeps them in its manifest. Its connection
    plumbing, `_meta` record and row reads come from CollectionClient, MetaRecord and RowReads; the lifecycle hooks
    are BackendBase's no-ops (the collection is its own truth and index).
    """

    name: ClassVar[str] = "milvus"
    # The side collections hold what every host shares (BackendBase, first in the bases, has no-ops for these).
    shared_fields = MetaRecord.shared_fields
    publish = MetaRecord.publish

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
        if metric not in METRIC_TYPES:
            raise InvalidInputError(f"unknown metric {metric!r}; choose from {', '.join(METRIC_TYPES)}")
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
        pymilvus = self._connect(token)
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

    # ------------------------------------------------------------------------------------------ index types, opening

    @classmethod
    def check_factory(cls, factory: str, dimension: int) -> None:
        """A Milvus type name, or a factory string with a Milvus counterpart (index_types.milvus_index_type)."""
        if factory != "auto":
            milvus_index_type(factory)

    @classmethod
    def resolve_factory(cls, factory: str, dimension: int, expected_items: int = 0,
                        memory_budget: int | None = None) -> tuple[str, dict[str, int]]:
        """"auto": the FAISS backend's size rule and search defaults (its factory strings are this backend's index
        type vocabulary too), then checked for a Milvus counterpart; any other type as given."""
        if factory != "auto":
            return super().resolve_factory(factory, dimension, expected_items, memory_budget)
        from siamesedb.backends.faiss.factory import resolve_factory

        factory, defaults = resolve_factory(factory, dimension, expected_items, memory_budget)
        cls.check_factory(factory, dimension)
        return factory, defaults

    @classmethod
    def create(cls, path: Path, dimension: int, metric: str, factory: str, search_defaults: dict[str, int],
               options: Mapping[str, Any]) -> tuple[MilvusBackend, dict[str, Any]]:
        """A new collection for the index at `path` (options["uri"]: a server, or a Lite file; default a Lite file
        in the folder): (MilvusBackend, the manifest's "milvus" fields)."""
        index_type, params = milvus_index_type(factory)
        record = new_record(path, options.get("uri"))
        backend = cls(resolve_uri(path, record["uri"]), record["collection"], dimension, metric=metric,
                      index_type=index_type, build_params=params, search_defaults=search_defaults)
        return backend, {"milvus": {**record, "index_type": index_type}}

    @classmethod
    def open(cls, path: Path, manifest: dict[str, Any], metric: str, options: Mapping[str, Any]) -> MilvusBackend:
        """The collection the manifest of the index at `path` names (it must exist)."""
        record = read_record(path, manifest)
        return cls(resolve_uri(path, str(record["uri"])), str(record["collection"]), int(manifest["dimension"]),
                   metric=metric, index_type=str(record.get("index_type", "FLAT")),
                   search_defaults=manifest.get("search_defaults") or {}, must_exist=True)

    def _create(self, DataType: Any, build_params: dict | None) -> None:
        schema = self._client.create_schema(auto_id=False, enable_dynamic_field=False)
        schema.add_field("id", DataType.INT64, is_primary=True)
        for field, most in FIELD_BYTES.items():
            schema.add_field(field, DataType.VARCHAR, max_length=most)
        schema.add_field("vector", DataType.FLOAT_VECTOR, dim=self.dimension)
        index = self._client.prepare_index_params()
        params = DEFAULT_BUILD_PARAMS[self.index_type] if build_params is None else dict(build_params)
        index.add_index(
            field_name="vector", index_type=self.index_type, metric_type=METRIC_TYPES[self.metric], params=params
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
        if held_metric and held_metric != METRIC_TYPES[self.metric]:
            raise CorruptIndexError(
                f"{self.uri}: collection {self.collection!r} uses metric {held_metric}, not "
                f"{METRIC_TYPES[self.metric]} ({self.metric})"
            )
        self.index_type = str(index.get("index_type", self.index_type))  # what it was built with decides
        self._load(self.collection)

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
        come back only this way, as in the SQLite store's import; not arbitrated against other writers: meta.py)."""
        vectors = as_vectors(vectors, self.dimension)  # (n, D) float32, finite
        n = len(vectors)
        if ids is not None:
            ids = as_ids(ids, n)
        labels, paths, hashes = as_item_fields(labels, paths, hashes, n, FIELD_BYTES)
        if n == 0:
            return np.empty(0, dtype=np.int64)
        if ids is None:
            ids = self._reserve(n)  # ids no other writer can be handed (meta.py says why)
        else:
            held = self._held(ids)
            if len(held):
                shown = ", ".join(str(i) for i in held[:5]) + (" ..." if len(held) > 5 else "")
                raise InvalidInputError(f"{len(held)} of these ids are already held ({shown}); ids are never reused")
            self._note_stored(ids)  # before any row carries one: later reservations start above them
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
                    self._bump()  # readers may have seen the rows meanwhile
                except Exception:  # noqa: BLE001 - the first failure is the one to report
                    pass
            raise
        self._bump()
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

    # ------------------------------------------------------------------------------------------ search

    def search(
        self,
        queries: np.ndarray,
        k: int,
        labels: LabelFilter = None,
        *,
        nprobe: int | None = None,
        ef_search: int | None = None,
    ) -> tuple[np.ndarray, np.ndarray]:
        k = as_k(k)
        queries = as_vectors(queries, self.dimension, "queries")  # (nq, D) float32
        nprobe, ef_search = as_positive(nprobe, "nprobe"), as_positive(ef_search, "ef_search")
        expression = label_filter(labels)
        nq = len(queries)
        # Rows of min(k, items held) columns (VectorBackend.search): a k beyond the collection returns what there
        # is; Milvus's cap on k refuses only a search that would really need more than MAX_TOPK results.
        held = self.count()
        if min(k, held) > MAX_TOPK:
            raise InvalidInputError(f"k must be at most {MAX_TOPK} on this backend (it holds {held} items), got {k}")
        k = min(k, held)
        scores = np.full((nq, k), -np.inf, dtype=np.float32)
        ids = np.full((nq, k), -1, dtype=np.int64)
        if nq == 0 or k == 0 or expression is None:
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
            scores = np.where(ids >= 0, scores_from_squared_l2(scores), -np.inf).astype(np.float32)
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

    # ------------------------------------------------------------------------------------------ consistency, tuning

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

    def describe(self) -> dict[str, Any]:
        """The keys VectorBackend.describe names, plus what identifies the collection (never the token)."""
        import pymilvus

        details = {"uri": self.uri, "lite": self.lite, "collection": self.collection, "index_type": self.index_type}
        return {
            "backend": self.name,
            "uri": self.uri,  # never the token
            "lite": self.lite,
            "collection": self.collection,
            "dimension": self.dimension,
            "metric": self.metric,
            "milvus_metric": METRIC_TYPES[self.metric],
            "index_type": self.index_type,
            "search_defaults": self.search_defaults,
            "consistency": "Strong",
            "count": self.count(),
            "pymilvus": pymilvus.__version__,
            "removed_pending": 0,
            "summary": f"Milvus {self.index_type}",
            "location": f"Milvus {'Lite ' if self.lite else ''}{self.uri}, collection {self.collection}, "
                        f"{self.index_type}",
            "details": details,
        }

    def drop(self) -> None:
        """Drop the collection and its side collections from Milvus (everything this index stored there), then
        close. For tests and for deleting an index for good; the index folder is left as it is."""
        for name in (self.collection, *self.side_collections()):
            if self._call("has_collection", name):
                self._call("drop_collection", name)
        self.close()

    def close(self) -> None:
        """Close the connection; for Milvus Lite, also stop this process's server of the file once no handle here
        uses it, so that another process can open the file."""
        if self._client is None:
            return
        try:
            self._flush_lite()
            self._flush_meta_lite()
        finally:
            self._disconnect()

    def __enter__(self) -> MilvusBackend:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"MilvusBackend({self.uri!r}, {self.collection!r}, dimension={self.dimension}, metric={self.metric!r})"
