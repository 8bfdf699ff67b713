"""MetaRecord: MilvusBackend's id high-water mark and version, kept in Milvus itself (backend.py).

Id allocation and the version live in a one-row second collection `<collection>_meta` (id 0; `mark`: the highest id
ever handed out or stored; `version`; a dim-2 dummy vector, since Milvus wants a vector field in every collection),
so every machine that reaches the collection shares them (an index folder's manifest is not shared).
`add(None, ...)` hands out mark+1, mark+2, ... and records the new mark *before* inserting a row: a crash mid-add
wastes ids, never reuses one (ids start at 1, as in the SQLite store). Every committed write then moves the version
(after its rows are in, so a cache keyed on the version never outlives the data it saw; a crash between the rows
and that bump leaves the version unmoved until the next write). Read-modify-write on one row: safe for **one writer
at a time per collection** (SiameseDB's lock does that for Milvus Lite, a one-process file anyway); several writers
on a Milvus server must take their ids from one allocator (one writer process, or ids passed to `add`), else two
may hand out the same ids.
numpy only: no torch import (tests check it).
"""

from __future__ import annotations

from typing import Any

from siamesedb.backends.milvus.client import CollectionClient
from siamesedb.errors import CorruptIndexError

META_SUFFIX = "_meta"  # <collection>_meta: the id high-water mark and the version, one row (id 0)
META_FIELDS = ("id", "mark", "version", "vector")


class MetaRecord(CollectionClient):
    """The `<collection>_meta` record of a MilvusBackend: open / create it, read it, write it, bump the version."""

    meta_collection: str
    _meta_unflushed: bool

    @property
    def version(self) -> int:
        """Moved by every committed write (add, remove, remove_label, reroot_paths), stored in <collection>_meta:
        every handle, in any process or machine, reads the same number (one Strong query, about 1 ms on Lite)."""
        return self._read_meta()[1]

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
            self._load(name)
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

    def _flush_meta_lite(self) -> None:
        """On close, Milvus Lite only: flush the record if written. Not for durability (Lite keeps unflushed rows,
        kill -9 too): it keeps the one-row record's unsealed history short."""
        if self.lite and self._meta_unflushed:
            self._call("flush", self.meta_collection)
            self._meta_unflushed = False
