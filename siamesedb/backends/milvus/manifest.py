"""How an index folder names its Milvus collection: the manifest's "milvus" object, made at create, read at open.

    "milvus": {"uri": "milvus.db" | "/abs/file.db" | "http(s)://host:19530", "collection": "...", "index_type": ...}

A Lite file inside the index folder is recorded relative to it ("milvus.db"), so the folder can move; a server URI
as given (the token never: it comes from $SIAMESEDB_MILVUS_TOKEN).
"""

from __future__ import annotations

import re
import uuid
from pathlib import Path
from typing import Any

from siamesedb.backends.milvus.client import is_server_uri
from siamesedb.errors import CorruptIndexError

MILVUS_LITE_FILE = "milvus.db"  # the Lite file a Milvus index keeps in its folder when no server URI is given


def _collection_name(path: Path) -> str:
    """A Milvus collection name (letters, digits, underscores; a letter first) from the index folder's name, made
    unique with a random suffix: many indexes may share one Milvus server."""
    stem = re.sub(r"[^A-Za-z0-9_]", "_", path.resolve().name)[:40] or "index"
    return f"siamesedb_{stem}_{uuid.uuid4().hex[:8]}"


def resolve_uri(path: Path, uri: str) -> str:
    """The URI to connect to: a server's as recorded, a Lite file's relative to the index folder."""
    return uri if is_server_uri(uri) else str(path / uri) if not Path(uri).is_absolute() else uri


def new_record(path: Path, uri: str | None) -> dict[str, str]:
    """{"uri", "collection"} of a new index at `path`: `uri` None is a Lite file in the folder ("items"), a Lite
    file elsewhere is recorded absolute, a server under a collection name of its own."""
    if uri is None:
        recorded = MILVUS_LITE_FILE
    elif is_server_uri(uri):
        recorded = uri
    else:
        recorded = str(Path(uri).expanduser().absolute())
    collection = "items" if not is_server_uri(recorded) else _collection_name(path)
    return {"uri": recorded, "collection": collection}


def read_record(path: Path, manifest: dict[str, Any]) -> dict[str, Any]:
    """The manifest's "milvus" object (CorruptIndexError when it has none)."""
    record = manifest.get("milvus")
    if not isinstance(record, dict):
        raise CorruptIndexError(f"{path}: unreadable manifest (a Milvus index needs its 'milvus' object (uri, "
                                "collection))")
    return record
