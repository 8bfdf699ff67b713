"""Every item's label and path held in memory, columnar, so search results name their hits without a store query.

One table mirrors one store version (SiameseDB rebuilds it when the store has moved on, or, after its own add to a
table of up to FOLLOW_MAX_ITEMS items, extends it: `with_added`). Memory: 8 bytes of id,
4 of label code and 8 of path offset per item, plus the paths' UTF-8 bytes once (about 20 MB + paths at 1M items),
never a Python object per item.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from siamesedb.errors import CorruptIndexError

FOLLOW_MAX_ITEMS = 1 << 18


def appends_after(held: np.ndarray, ids: np.ndarray) -> bool:
    """Whether new (n,) `ids` extend the ascending id column `held` and stay ascending (what a table can follow)."""
    return bool(len(ids)) and not (len(held) and ids.min() <= held[-1]) and bool((np.diff(ids) > 0).all())


@dataclass
class ItemTable:
    version: int  # the store version this table mirrors
    ids: np.ndarray  # (N,) int64, ascending
    codes: np.ndarray  # (N,) int32: label of ids[i] is names[codes[i]]
    names: list[str]  # label per code
    path_bytes: bytes  # every path's UTF-8 bytes, in id order, back to back
    path_offsets: np.ndarray  # (N + 1,) int64: path of ids[i] is path_bytes[offsets[i]:offsets[i + 1]]

    @classmethod
    def from_store(cls, store, chunk: int = 65536) -> ItemTable:
        """Read ids, labels and paths in one pass (call inside `store.snapshot()` for one committed state)."""
        version = store.version
        code_of: dict[str, int] = {}
        id_chunks, code_chunks, length_chunks, blobs = [], [], [], []
        for ids, rows in store.iter_rows("label, path", chunk=chunk):
            codes = np.fromiter((code_of.setdefault(r[0], len(code_of)) for r in rows), dtype=np.int32, count=len(rows))
            encoded = [r[1].encode("utf-8", "surrogateescape") for r in rows]
            id_chunks.append(ids)
            code_chunks.append(codes)
            length_chunks.append(np.fromiter(map(len, encoded), dtype=np.int64, count=len(encoded)))
            blobs.append(b"".join(encoded))
        ids = np.concatenate(id_chunks) if id_chunks else np.empty(0, np.int64)
        if len(ids) > 1 and not (np.diff(ids) > 0).all():
            raise CorruptIndexError(f"{store.path}: item ids are not unique")
        offsets = np.zeros(len(ids) + 1, dtype=np.int64)
        if length_chunks:
            np.cumsum(np.concatenate(length_chunks), out=offsets[1:])
        return cls(
            version=version,
            ids=ids,
            codes=np.concatenate(code_chunks) if code_chunks else np.empty(0, np.int32),
            names=list(code_of),
            path_bytes=b"".join(blobs),
            path_offsets=offsets,
        )

    def with_added(self, version: int, ids: np.ndarray, labels: Sequence[str], paths: Sequence[str]) -> ItemTable | None:
        """The table after one add of (n,) new ascending `ids` after the held ones (None otherwise: rebuild), at the
        store's new `version`. Copy on write, as readers share this table."""
        ids = np.asarray(ids, dtype=np.int64)
        if len(self.ids) > FOLLOW_MAX_ITEMS:  # each add copies the columns: beyond this a rebuild costs less
            return None
        if not appends_after(self.ids, ids):
            return None
        names = list(self.names)
        code_of = {name: code for code, name in enumerate(names)}
        codes = np.fromiter((code_of.setdefault(label, len(code_of)) for label in labels), dtype=np.int32,
                            count=len(labels))
        names.extend(list(code_of)[len(names):])
        encoded = [path.encode("utf-8", "surrogateescape") for path in paths]
        lengths = np.fromiter(map(len, encoded), dtype=np.int64, count=len(encoded))
        offsets = np.concatenate([self.path_offsets, self.path_offsets[-1] + np.cumsum(lengths)])
        return ItemTable(version=version, ids=np.concatenate([self.ids, ids]),
                         codes=np.concatenate([self.codes, codes]), names=names,
                         path_bytes=self.path_bytes + b"".join(encoded), path_offsets=offsets)

    def lookup(self, ids: np.ndarray) -> dict[int, tuple[str, str]]:
        """{id: (label, path)} for the ids held (the same answer as ItemStore.labels_and_paths, from memory)."""
        wanted = np.unique(np.asarray(ids, dtype=np.int64).reshape(-1))
        if not len(self.ids) or not len(wanted):
            return {}
        where = np.minimum(np.searchsorted(self.ids, wanted), len(self.ids) - 1)
        held = self.ids[where] == wanted
        wanted, where = wanted[held], where[held]
        names = self.names
        labels = [names[c] for c in self.codes[where].tolist()]
        if not self.path_bytes:  # no item has a path (vectors brought in with add_vectors): skip the slicing
            return dict(zip(wanted.tolist(), ((label, "") for label in labels)))
        starts, stops = self.path_offsets[where].tolist(), self.path_offsets[where + 1].tolist()
        blob = self.path_bytes
        paths = [blob[a:b].decode("utf-8", "surrogateescape") for a, b in zip(starts, stops)]
        return dict(zip(wanted.tolist(), zip(labels, paths)))
