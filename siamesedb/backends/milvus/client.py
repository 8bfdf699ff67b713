"""CollectionClient: one pymilvus.MilvusClient on one collection, the plumbing under MilvusBackend
(backend.py): importing pymilvus (and quieting its log noise), resolving the URI, Milvus Lite's
one-server-per-file bookkeeping, naming Milvus's errors in one line, Strong reads and paging, request batching.
numpy only: no torch import (tests check it).
"""

from __future__ import annotations

import logging
import os
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np

from siamesedb.errors import (
    IndexLockedError,
    IndexNotFoundError,
    InvalidInputError,
    SiameseDBError,
    StorageError,
)

INSTALL_HINT = "pip install siamesedb[milvus]"
TOKEN_ENV = "SIAMESEDB_MILVUS_TOKEN"
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


def is_server_uri(uri: str) -> bool:
    return uri.startswith(("http://", "https://", "tcp://", "grpc://", "unix:"))


class CollectionClient:
    """The connection half of MilvusBackend: `uri` / `lite` / `collection`, the client, and the calls every part of
    the backend makes through it (`_call`, `_query`, `_iterate`, `_held`, `_ids_where`)."""

    uri: str
    lite: bool
    collection: str
    _client: Any
    _exception: type[Exception]

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

    def _connect(self, token: str | None) -> Any:
        """Open the client (token None: $SIAMESEDB_MILVUS_TOKEN for a server) and count a Lite file's handle;
        returns the pymilvus module."""
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
        return pymilvus

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

    def _disconnect(self) -> None:
        """Close the client; for Milvus Lite, release this process's server of the file if this was its last
        handle here."""
        client, self._client = self._client, None
        client.close()
        if self.lite:
            _release_lite(self.uri)

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

    def _load(self, name: str) -> None:
        """load_collection `name`. Milvus Lite only: a load that fails is retried once after the collection's index
        sidecars (`<file>.db/collections/<name>/.../indexes/*.idx`) are deleted. Lite writes a sidecar in place (no
        temporary file and rename) and loads any that exists, so a process killed while writing one leaves a short
        file that every later open trips on ("No data left in file", measured by tools/torture.py); the sidecars are
        derived, and Lite builds them again from the segments' stored vectors when they are absent."""
        try:
            self._call("load_collection", name)
        except (StorageError, ValueError, EOFError) as exc:  # Lite may raise the reader's own error unwrapped
            if not self.lite or not _drop_index_sidecars(self.uri, name):
                if isinstance(exc, StorageError):
                    raise
                raise StorageError(f"{self.uri} ({name}): Milvus Lite could not load the collection ({exc})") from None
            self._call("load_collection", name)

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

    def _ids_where(self, expression: str) -> np.ndarray:
        pages = [np.fromiter((r["id"] for r in page), dtype=np.int64) for page in self._iterate(expression, ["id"])]
        return np.sort(np.concatenate(pages)) if pages else np.empty(0, dtype=np.int64)


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


def _drop_index_sidecars(uri: str, collection: str) -> int:
    """Delete the derived vector-index files Milvus Lite keeps for `collection` in the Lite folder `uri`; returns how
    many went (0: nothing to retry with)."""
    folder = Path(uri) / "collections" / collection
    dropped = 0
    for sidecar in folder.glob("partitions/*/indexes/*.idx") if folder.is_dir() else ():
        try:
            sidecar.unlink()
            dropped += 1
        except OSError:
            pass
    return dropped
