"""RowReads: MilvusBackend's reads of stored rows (backend.py): items by id, counts, and the
whole-collection scans (iter_rows, vectors, label / hash lookups) the VectorBackend protocol asks for.

Every read is Strong (a write is visible to the very next read, from this handle or another); scans page through
Milvus's query iterator, READ_BATCH rows at a time.
numpy only: no torch import (tests check it).
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import numpy as np

from siamesedb.backends.items import Item
from siamesedb.backends.milvus.client import READ_BATCH, CollectionClient
from siamesedb.backends.milvus.expr import label_literal
from siamesedb.checks import as_positive, is_utf8
from siamesedb.errors import InvalidInputError, StorageError

FIELD_BYTES = {"label": 65_535, "path": 65_535, "sha256": 128}  # VARCHAR max_length (65,535 is Milvus's cap)
HASH_BATCH = 256  # content hashes per `sha256 in [...]` filter (ids_by_label_hash)
ROW_COLUMNS = ("label", "path", "sha256", "vector")  # what iter_rows may name


class RowReads(CollectionClient):
    """Reads of a MilvusBackend's rows (id, label, path, sha256, vector), as the SQLite store answers them."""

    dimension: int

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
        wanted = [pair for pair in dict.fromkeys(pairs) if all(isinstance(t, str) and is_utf8(t) for t in pair)]
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

