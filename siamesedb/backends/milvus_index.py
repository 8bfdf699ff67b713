"""How an index folder names its Milvus collection: the manifest's "milvus" object, made at create, read at open.

    "milvus": {"uri": "milvus.db" | "/abs/file.db" | "http(s)://host:19530", "collection": "...", "index_type": ...}

A Lite file inside the index folder is recorded relative to it ("milvus.db"), so the folder can move; a server URI
as given (the token never: it comes from $SIAMESEDB_MILVUS_TOKEN). The index type comes from the factory string
the rest of siamesedb speaks (Flat, IVF<n>,Flat, HNSW<M>) or a Milvus type named directly (GPU_CAGRA...).
"""

from __future__ import annotations

import re
import uuid
from pathlib import Path
from typing import Any

from siamesedb.errors import InvalidInputError
from siamesedb.layout import MILVUS_LITE_FILE

URI_ENV = "SIAMESEDB_MILVUS_URI"


def milvus_index_type(factory: str) -> tuple[str, dict[str, int]]:
    """(Milvus index type, build params) for a FAISS factory string or a Milvus type name."""
    from siamesedb.backends.milvus import DEFAULT_BUILD_PARAMS, INDEX_TYPES

    if factory.upper() in INDEX_TYPES:
        kind = factory.upper()
        return kind, dict(DEFAULT_BUILD_PARAMS[kind])
    if factory == "Flat":
        return "FLAT", {}
    if match := re.fullmatch(r"IVF(\d+),Flat", factory):
        return "IVF_FLAT", {"nlist": int(match.group(1))}
    if match := re.fullmatch(r"HNSW(\d+)(,Flat)?", factory):
        return "HNSW", {"M": int(match.group(1)), "efConstruction": 200}
    raise InvalidInputError(
        f"index type {factory!r} has no Milvus counterpart; use Flat, IVF<n>,Flat, HNSW<M> or a Milvus type "
        f"({', '.join(INDEX_TYPES)})"
    )


def _collection_name(path: Path) -> str:
    """A Milvus collection name (letters, digits, underscores; a letter first) from the index folder's name, made
    unique with a random suffix: many indexes may share one Milvus server."""
    stem = re.sub(r"[^A-Za-z0-9_]", "_", path.resolve().name)[:40] or "index"
    return f"siamesedb_{stem}_{uuid.uuid4().hex[:8]}"


def resolve_uri(path: Path, uri: str) -> str:
    """The URI to connect to: a server's as recorded, a Lite file's relative to the index folder."""
    from siamesedb.backends.milvus import is_server_uri

    return uri if is_server_uri(uri) else str(path / uri) if not Path(uri).is_absolute() else uri


def create_milvus(path: Path, dimension: int, metric: str, factory: str, uri: str | None,
                  search_defaults: dict[str, int]) -> tuple[Any, dict[str, Any]]:
    """A new collection for the index at `path`: (MilvusBackend, manifest fields)."""
    from siamesedb.backends.milvus import MilvusBackend, is_server_uri

    index_type, params = milvus_index_type(factory)
    if uri is None:
        recorded = MILVUS_LITE_FILE
    elif is_server_uri(uri):
        recorded = uri
    else:
        recorded = str(Path(uri).expanduser().absolute())
    collection = "items" if not is_server_uri(recorded) else _collection_name(path)
    backend = MilvusBackend(resolve_uri(path, recorded), collection, dimension, metric=metric,
                            index_type=index_type, build_params=params, search_defaults=search_defaults)
    fields = {"milvus": {"uri": recorded, "collection": collection, "index_type": index_type}}
    return backend, fields


def open_milvus(path: Path, manifest: dict[str, Any], metric: str) -> Any:
    """The MilvusBackend the manifest of the index at `path` names (its collection must exist)."""
    from siamesedb.backends.milvus import MilvusBackend

    record = manifest["milvus"]
    return MilvusBackend(resolve_uri(path, str(record["uri"])), str(record["collection"]), int(manifest["dimension"]),
                         metric=metric, index_type=str(record.get("index_type", "FLAT")),
                         search_defaults=manifest.get("search_defaults") or {}, must_exist=True)
