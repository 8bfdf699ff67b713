"""MetaRecord: MilvusBackend's id reservations, version and shared documents, kept in Milvus itself (backend.py).

Three small side collections beside `<collection>`, so every process on every machine that reaches the collection
shares them (an index folder's manifest is not shared); each has a dim-2 dummy vector, since Milvus wants one:

    <collection>_log     seq INT64 primary key, *server-assigned* (auto_id); kind, start, end INT64. Append-only.
                         kind CLAIM: ids [start, end) reserved by one add; STORED: ids given by the caller (an
                         import) lie in [start, end); WRITE: a write committed; SHARED: a shared document
                         changed (start = end = -1 for both).
    <collection>_meta    one row (id 0): `mark`, a hint (every claim up to mark+1 is known, so a new handle reads
                         only the log rows above it), and `version`, the legacy counter of collections made before
                         the log (frozen now).
    <collection>_shared  key VARCHAR primary key, doc (JSON): what every host must see (calibrations, per rule).

Why reservations cannot collide (README "Scaling out"): Milvus does not refuse a second row with a primary key it
holds, and an upsert is no compare-and-swap, so neither can arbitrate. What it does guarantee: every insert gets a
timestamp from one oracle, and a Strong read sees every insert stamped before the read began. A writer reserving n
ids reads the highest `end` in the log (E), inserts its claim [E, E+n), then reads again every row with end > E:
it wins only when no other row overlaps its claim, else it waits a random moment and claims above the highest end
seen. Of two overlapping claims, the one inserted later reads after the other was stamped, so it sees it and loses:
at most one of any two overlapping claims wins, whatever the timing (both may lose; then both retry). A winner's
ids are its alone; a crash after the claim wastes them, never reuses them (ids start at 1). Ids given by the caller
(an import) are recorded as STORED before their rows go in, so later claims start above them; such an import must
not run while other writers add (two writers given the same ids are not arbitrated).

The version is the log's count of CLAIM / STORED / WRITE rows plus the legacy counter: every committed write appends one WRITE row after its
rows are in (an add also appends its claim before), so two writers' writes always move it twice, and a cache keyed
on the version never outlives the data it saw. Publishing a shared document appends a SHARED row instead (a
calibration does not make itself stale); a host re-reads the documents when their count moved. numpy only: no torch import (tests check it).
"""

from __future__ import annotations

import json
import random
import time
from typing import Any

import numpy as np

from siamesedb.backends.milvus.client import CollectionClient
from siamesedb.errors import CorruptIndexError, StorageError

META_SUFFIX = "_meta"  # <collection>_meta: the mark hint and the legacy version, one row (id 0)
LOG_SUFFIX = "_log"  # <collection>_log: reservations and committed writes, server-assigned keys
SHARED_SUFFIX = "_shared"  # <collection>_shared: documents every host reads (calibrations)
META_FIELDS = ("id", "mark", "version", "vector")
LOG_FIELDS = ("seq", "kind", "start", "end", "vector")
SHARED_FIELDS = ("key", "doc", "vector")
CLAIM, STORED, WRITE, SHARED = 0, 1, 2, 3  # the log's row kinds
CLAIM_SECONDS = 300.0  # how long an add keeps claiming before it gives up (each loss: another writer claimed too)
QUERY_CAP = 16_384  # rows one Milvus query may return
DOC_BYTES = 65_535  # one shared document's JSON, at most (Milvus's VARCHAR cap)
_ZERO = [0.0, 0.0]


class MetaRecord(CollectionClient):
    """The side collections of a MilvusBackend: id reservations, the version, shared documents."""

    meta_collection: str
    _meta_unflushed: bool

    # ------------------------------------------------------------------------------------------ opening

    def _open_meta(self, DataType: Any) -> None:
        """Open (or create) the three side collections; a collection made before the log gets mark = its highest
        id held and keeps its old version as the legacy counter."""
        self.log_collection = self.collection + LOG_SUFFIX
        self.shared_collection = self.collection + SHARED_SUFFIX
        self._open_side(self.meta_collection, META_FIELDS, DataType, lambda s: (
            s.add_field("id", DataType.INT64, is_primary=True), s.add_field("mark", DataType.INT64),
            s.add_field("version", DataType.INT64)), auto_id=False)
        self._open_side(self.log_collection, LOG_FIELDS, DataType, lambda s: (
            s.add_field("seq", DataType.INT64, is_primary=True), s.add_field("kind", DataType.INT64),
            s.add_field("start", DataType.INT64), s.add_field("end", DataType.INT64)), auto_id=True)
        self._open_side(self.shared_collection, SHARED_FIELDS, DataType, lambda s: (
            s.add_field("key", DataType.VARCHAR, is_primary=True, max_length=512),
            s.add_field("doc", DataType.VARCHAR, max_length=DOC_BYTES)), auto_id=False)
        row = self._meta_row()
        if row is None:  # new, or created by a process that died before writing its row
            held = self._ids_where("")
            self._write_meta(max(int(held[-1]) if len(held) else 0, 0), 0)
            row = self._meta_row()
        self._legacy_version = int(row["version"])
        self._hint = int(row["mark"]) + 1  # no reservation ends above this without a log row saying so
        self._shared_cache: tuple[int, dict[str, Any]] | None = None

    def _open_side(self, name: str, fields: tuple[str, ...], DataType: Any, add_fields: Any, auto_id: bool) -> None:
        if self._call("has_collection", name):
            info = self._call("describe_collection", name)
            held = {f["name"] for f in info.get("fields", [])}
            if not set(fields) <= held:
                raise CorruptIndexError(
                    f"{self.uri}: collection {name!r} exists but is not a side collection of {self.collection!r} "
                    f"(fields: {', '.join(sorted(held))})"
                )
            self._load(name)
            return
        schema = self._client.create_schema(auto_id=auto_id, enable_dynamic_field=False)
        add_fields(schema)
        schema.add_field("vector", DataType.FLOAT_VECTOR, dim=2)  # unused: Milvus wants a vector field
        index = self._client.prepare_index_params()
        index.add_index(field_name="vector", index_type="FLAT", metric_type="L2", params={})
        self._call("create_collection", name, schema=schema, index_params=index, consistency_level="Strong")

    def side_collections(self) -> list[str]:
        """The side collections' names (dropped with the collection)."""
        return [self.meta_collection, self.collection + LOG_SUFFIX, self.collection + SHARED_SUFFIX]

    # ------------------------------------------------------------------------------------------ the version

    @property
    def version(self) -> int:
        """Moved by every committed write (add, remove, remove_label, reroot_paths), from any handle in any
        process or machine: the log's count of its rows but SHARED ones (one Strong count) plus the legacy
        counter."""
        return self._legacy_version + self._count_log(f"kind < {SHARED}")

    def _count_log(self, expression: str) -> int:
        rows = self._call("query", self.log_collection, filter=expression, output_fields=["count(*)"],
                          consistency_level="Strong")
        return int(rows[0]["count(*)"]) if rows else 0

    def _bump(self) -> None:
        """A write committed: append a WRITE row (after the write's rows are in, see the module docstring)."""
        self._log(WRITE, -1, -1)

    def _log(self, kind: int, start: int, end: int) -> int:
        """Append one log row; returns its server-assigned seq."""
        self._meta_unflushed = True
        done = self._call("insert", self.log_collection,
                          [{"kind": int(kind), "start": int(start), "end": int(end), "vector": _ZERO}])
        return int(done["ids"][0])

    # ------------------------------------------------------------------------------------------ reservations

    def _rows_above(self, floor: int) -> list[dict]:
        """Every reservation / STORED row whose end is above `floor` (Strong): one query (a few rows: those since
        the hint), paging only past Milvus's cap on one query's rows."""
        expression, fields = f"end > {int(floor)}", ["seq", "start", "end"]
        rows = self._call("query", self.log_collection, filter=expression, output_fields=fields, limit=QUERY_CAP,
                          consistency_level="Strong")
        if len(rows) < QUERY_CAP:
            return list(rows)
        rows = []
        iterator = self._call("query_iterator", self.log_collection, batch_size=4096, filter=expression,
                              output_fields=fields, consistency_level="Strong")
        try:
            while page := self._call(iterator.next):
                rows.extend(page)
        finally:
            iterator.close()
        return rows

    def _reserve(self, n: int) -> np.ndarray:
        """n fresh ids (n,) int64, ascending, that no other writer anywhere can be handed (module docstring)."""
        rows = self._rows_above(self._hint - 1)
        start = max([self._hint, *(int(r["end"]) for r in rows)])
        deadline, attempt = time.monotonic() + CLAIM_SECONDS, 0
        while time.monotonic() < deadline:
            began = time.monotonic()
            seq = self._log(CLAIM, start, start + n)
            rows = self._rows_above(start)
            rivals = [r for r in rows if int(r["seq"]) != seq and int(r["start"]) < start + n]
            if not rivals:
                self._hint = max(self._hint, start + n)
                self._write_meta(start + n - 1, self._legacy_version)  # a hint only: a stale one costs a longer read
                return np.arange(start, start + n, dtype=np.int64)
            start = max(int(r["end"]) for r in rows)
            # Writers that lost to each other part ways: a random wait of up to 2^attempt claim-and-check rounds
            # (exponential backoff, capped), so one of them soon claims alone.
            time.sleep(random.uniform(0, (time.monotonic() - began) * 2 ** min(attempt, 5)))
            attempt += 1
        raise StorageError(f"{self.uri} ({self.collection}): could not reserve ids in {CLAIM_SECONDS:.0f} s ({attempt} "
                           "claims, each overlapped by another writer's); nothing was stored, try again")

    def _note_stored(self, ids: np.ndarray) -> None:
        """Ids given by the caller: record them before their rows go in, so later reservations start above."""
        low, high = int(ids.min()), int(ids.max())
        if high + 1 > self._hint:
            self._log(STORED, low, high + 1)
            self._hint = high + 1

    def _meta_row(self) -> dict | None:
        rows = self._call("query", self.meta_collection, ids=[0], output_fields=["mark", "version"],
                          consistency_level="Strong")
        return rows[0] if rows else None

    def _write_meta(self, mark: int, version: int) -> None:
        self._meta_unflushed = True
        self._call("upsert", self.meta_collection,
                   [{"id": 0, "mark": int(mark), "version": int(version), "vector": _ZERO}])

    # ------------------------------------------------------------------------------------------ shared documents

    def shared_fields(self) -> dict[str, Any]:
        """The manifest fields every host shares ({name: value}; a dict value merged from one row per entry),
        re-read only when another document was published (the log's SHARED rows)."""
        version = self._count_log(f"kind == {SHARED}")
        if self._shared_cache is not None and self._shared_cache[0] == version:
            return json.loads(json.dumps(self._shared_cache[1]))
        fields: dict[str, Any] = {}
        iterator = self._call("query_iterator", self.shared_collection, batch_size=1024, filter="",
                              output_fields=["key", "doc"], consistency_level="Strong")
        try:
            while page := self._call(iterator.next):
                for row in sorted(page, key=lambda r: r["key"]):
                    name, _, entry = row["key"].partition("/")
                    value = json.loads(row["doc"])
                    if entry:
                        fields.setdefault(name, {})[entry] = value
                    else:
                        fields[name] = value
        finally:
            iterator.close()
        self._shared_cache = (version, fields)
        return json.loads(json.dumps(fields))

    def publish(self, fields: dict[str, Any], per_entry: tuple[str, ...] = ()) -> None:
        """Store manifest fields for every host: each field one row, except those named in `per_entry` (dicts),
        one row per entry (entries added or replaced, never dropped: two hosts calibrating two rules at once both
        keep theirs). Last write wins per row. Does not move the version."""
        rows = []
        for name, value in fields.items():
            entries = value.items() if name in per_entry else [("", value)]
            for entry, doc in entries:
                text = json.dumps(doc, sort_keys=True)
                if len(text.encode()) > DOC_BYTES:
                    raise StorageError(f"{self.uri} ({self.collection}): shared field {name!r} is too large "
                                       f"({len(text.encode())} bytes, at most {DOC_BYTES})")
                rows.append({"key": f"{name}/{entry}" if entry else name, "doc": text, "vector": _ZERO})
        if rows:
            self._meta_unflushed = True
            self._call("upsert", self.shared_collection, rows)
            self._log(SHARED, -1, -1)  # after the documents: a host that sees the count move reads them

    def _flush_meta_lite(self) -> None:
        """On close, Milvus Lite only: flush the side collections if written. Not for durability (Lite keeps
        unflushed rows, kill -9 too): it keeps their unsealed history short."""
        if self.lite and self._meta_unflushed:
            for name in self.side_collections():
                self._call("flush", name)
            self._meta_unflushed = False
