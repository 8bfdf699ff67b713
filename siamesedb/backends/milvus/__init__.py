"""The Milvus backend: MilvusBackend on one Milvus collection (Milvus Lite in one file, or a server / cluster).

    backend.py      MilvusBackend: the collection's schema, creating and opening, writes, search, tuning
    client.py       CollectionClient: the pymilvus connection, Milvus Lite bookkeeping, named errors, paging
    meta.py         MetaRecord: the side collections (id reservations, the version, shared documents)
    rows.py         RowReads: reads of stored rows (items, counts, scans)
    expr.py         filter expressions (label literals and label filters)
    index_types.py  index types, build parameters, search knobs, metric types, request limits
    manifest.py     the manifest's "milvus" object (uri, collection) and the Lite file's name
"""

from siamesedb.backends.milvus.backend import MilvusBackend
from siamesedb.backends.milvus.client import (
                                                   INSTALL_HINT,
                                                   READ_BATCH,
                                                   REQUEST_BYTES,
                                                   TOKEN_ENV,
                                                   is_server_uri,
)
from siamesedb.backends.milvus.expr import label_filter, label_literal
from siamesedb.backends.milvus.index_types import (
                                                   DEFAULT_BUILD_PARAMS,
                                                   INDEX_TYPES,
                                                   MAX_NQ,
                                                   MAX_TOPK,
                                                   METRIC_TYPES,
                                                   SEARCH_KNOBS,
                                                   STARTING_DEFAULTS,
)
from siamesedb.backends.milvus.manifest import MILVUS_LITE_FILE
from siamesedb.backends.milvus.meta import META_FIELDS, META_SUFFIX
from siamesedb.backends.milvus.rows import FIELD_BYTES, HASH_BATCH, ROW_COLUMNS

__all__ = [
    "DEFAULT_BUILD_PARAMS",
    "FIELD_BYTES",
    "HASH_BATCH",
    "INDEX_TYPES",
    "INSTALL_HINT",
    "MAX_NQ",
    "MAX_TOPK",
    "META_FIELDS",
    "META_SUFFIX",
    "METRIC_TYPES",
    "MILVUS_LITE_FILE",
    "READ_BATCH",
    "REQUEST_BYTES",
    "ROW_COLUMNS",
    "SEARCH_KNOBS",
    "STARTING_DEFAULTS",
    "TOKEN_ENV",
    "MilvusBackend",
    "is_server_uri",
    "label_filter",
    "label_literal",
]
