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
numpy only: no torch import (tests check it).
"""

from __future__ import annotations

import logging
import os
import threading
from collections.abc import Iterator, Sequence
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

    Opens the collection if it exists (checking its dimension and metric), else creates it.
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
        self._unflushed = False  # Milvus Lite only: written since the last flush
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
            else:
                self._create(pymilvus.DataType, build_params)
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
        ids: np.ndarray,
        labels: Sequence[str],
        paths: Sequence[str | os.PathLike],
        hashes: Sequence[str],
        vectors: np.ndarray,
    ) -> None:
        vectors = as_vectors(vectors, self.dimension)  # (n, D) float32, finite
        n = len(vectors)
        ids = as_ids(ids, n)
        labels, paths, hashes = as_item_fields(labels, paths, hashes, n, FIELD_BYTES)
        if n == 0:
            return
        held = self._held(ids)
        if len(held):
            shown = ", ".join(str(i) for i in held[:5]) + (" ..." if len(held) > 5 else "")
            raise InvalidInputError(f"{len(held)} of these ids are already held ({shown}); ids are never reused")
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
                except Exception:  # noqa: BLE001 - the first failure is the one to report
                    pass
            raise

    def remove(self, ids: np.ndarray) -> int:
        ids = np.unique(as_ids(ids, unique=False))
        held = self._held(ids)
        for start in range(0, len(held), READ_BATCH):
            self._unflushed = True
            self._call("delete", self.collection, ids=held[start : start + READ_BATCH].tolist())
        return len(held)

    def remove_label(self, label: str) -> np.ndarray:
        if not isinstance(label, str) or not label:
            raise InvalidInputError("a label must be a non-empty string")
        ids = self._ids_where(f"label == {label_literal(label)}")
        for start in range(0, len(ids), READ_BATCH):
            # By id, not by filter: exactly the ids returned go, even if another writer adds to the label meanwhile.
            self._unflushed = True
            self._call("delete", self.collection, ids=ids[start : start + READ_BATCH].tolist())
        return ids

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

    def items(self, ids: np.ndarray) -> list[Item | None]:
        wanted = as_ids(ids, unique=False)
        found: dict[int, Item] = {}
        unique = np.unique(wanted)
        for start in range(0, len(unique), READ_BATCH):
            rows = self._query(ids=unique[start : start + READ_BATCH].tolist(), output_fields=["id", *FIELD_BYTES])
            for row in rows:
                found[int(row["id"])] = Item(int(row["id"]), row["label"], row["path"], row["sha256"])
        return [found.get(int(i)) for i in wanted]

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

