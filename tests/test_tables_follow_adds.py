"""After this handle's own add, the cached class table (prototypes) and item table follow the add
(ClassTable / ItemTable.with_added) instead of rereading every item: the followed tables must equal tables read
afresh from the store, for both metrics, and anything they cannot follow (a new class, a removal, another handle's
write) must fall back to a reread, never to a stale table."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from siamesedb import classes
from siamesedb.classes import read_class_table
from siamesedb.db import SiameseDB
from siamesedb.encoder import Encoder, EncoderConfig
from siamesedb.item_table import ItemTable

DIM = 8


def make(metric: str, where) -> SiameseDB:
    torch.manual_seed(0)
    if metric == "euclidean":
        encoder = Encoder(EncoderConfig(backbone="mlp", embedding_dim=DIM, metric="euclidean"))
    else:
        encoder = Encoder(EncoderConfig(embedding_dim=DIM, width=8))
    return SiameseDB.create(where, encoder=encoder, device="cpu")


def rows(n: int, seed: int) -> np.ndarray:
    vectors = np.random.default_rng(seed).normal(size=(n, DIM)).astype(np.float32)
    return vectors / np.linalg.norm(vectors, axis=1, keepdims=True)


def fresh(db):
    with db.backend.snapshot():
        return read_class_table(db.backend, db.metric, db.path), ItemTable.from_store(db.backend)


def assert_same(followed, reread):
    assert followed.version == reread.version and followed.names == reread.names
    np.testing.assert_array_equal(followed.ids, reread.ids)
    np.testing.assert_array_equal(followed.codes, reread.codes)
    np.testing.assert_allclose(followed.prototypes, reread.prototypes, rtol=0, atol=1e-6)


@pytest.mark.parametrize("metric", ["cosine", "euclidean"])
def test_followed_tables_equal_tables_read_afresh(metric, tmp_path):
    db = make(metric, tmp_path / "index")
    labels = [f"c{n % 5}" for n in range(40)]
    db.add_vectors(rows(40, 0), labels, paths=[f"/data/{n}.png" for n in range(40)])
    db.classify_vectors(rows(2, 1))  # caches the class table ...
    db._labels_and_paths(np.arange(1, 41))  # ... and, looking up every id, the item table
    assert db._prototype_cache is not None and db._item_table is not None
    for step in range(3):
        new = rows(3, 10 + step)
        ids = db.add_vectors(new, ["c1", "c3", "c1"], paths=[f"/new/{step}-{n}.png" for n in range(3)])
        classes_now, items_now = db._prototype_cache, db._item_table
        assert classes_now is not None and classes_now.version == db.backend.version  # followed, not dropped
        assert items_now is not None and items_now.version == db.backend.version
        reread_classes, reread_items = fresh(db)
        assert_same(classes_now, reread_classes)
        assert items_now.lookup(ids) == reread_items.lookup(ids)
        assert items_now.lookup(np.arange(1, ids[-1] + 1)) == reread_items.lookup(np.arange(1, ids[-1] + 1))
    db.close()


def test_what_cannot_be_followed_is_reread(tmp_path):
    db = make("cosine", tmp_path / "index")
    db.add_vectors(rows(20, 0), [f"c{n % 4}" for n in range(20)])
    db.classify_vectors(rows(1, 1))
    db.add_vectors(rows(2, 2), ["brand-new", "c0"])  # a new class moves the codes: dropped, then reread
    assert db._prototype_cache is None
    table = db._class_table()
    assert "brand-new" in table.names
    assert_same(table, fresh(db)[0])
    db.remove(ids=[1])  # a removal is never followed: the version moved, the next read rebuilds
    assert db._class_table().version == db.backend.version and 1 not in set(db._class_table().ids.tolist())
    other = SiameseDB.open(tmp_path / "index", device="cpu")  # another handle writes: this one's tables are stale
    other.add_vectors(rows(1, 3), ["c2"])
    other.close()
    db.refresh()
    assert_same(db._class_table(), fresh(db)[0])
    db.close()


def test_large_tables_keep_no_sums_and_are_reread(tmp_path, monkeypatch):
    monkeypatch.setattr(classes, "FOLLOW_MAX_CELLS", 3 * DIM)  # 4 classes x 8 dims is "large" now
    db = make("cosine", tmp_path / "index")
    db.add_vectors(rows(20, 0), [f"c{n % 4}" for n in range(20)])
    assert db._class_table().sums is None
    db.add_vectors(rows(1, 5), ["c1"])
    assert db._prototype_cache is None
    assert_same(db._class_table(), fresh(db)[0])
    db.close()


def test_another_handles_appends_are_followed_and_anything_else_rebuilds(tmp_path, monkeypatch):
    """A second handle (another server process) catching up with the first one's adds takes the appended rows
    alone (FaissBackend.follow_appends: no rebuild of its FAISS index, tables followed); after a removal or an
    import with given ids it rebuilds, and every answer matches a fresh read."""
    from siamesedb.backends.faiss.backend import FaissBackend

    writer = make("cosine", tmp_path / "index")
    writer.add_vectors(rows(30, 0), [f"c{n % 5}" for n in range(30)], paths=[f"/d/{n}.png" for n in range(30)])
    reader = SiameseDB.open(tmp_path / "index", device="cpu")
    reader.classify_vectors(rows(1, 1))
    reader._labels_and_paths(np.arange(1, 31))
    rebuilds = []
    original = FaissBackend.index_from_store
    monkeypatch.setattr(FaissBackend, "index_from_store",
                        lambda self, *args, **kwargs: rebuilds.append(1) or original(self, *args, **kwargs))

    new = rows(4, 7)
    ids = writer.add_vectors(new, ["c2", "c4", "c2", "c0"], paths=[f"/n/{n}.png" for n in range(4)])
    assert reader.refresh()
    assert rebuilds == []  # followed, not rebuilt
    assert reader._prototype_cache is not None and reader._prototype_cache.version == reader.backend.version
    assert_same(reader._prototype_cache, fresh(reader)[0])
    found = reader.search_vectors(new, k=1, fetch=True)
    assert [results[0].id for results in found] == [int(i) for i in ids]
    assert [results[0].label for results in found] == ["c2", "c4", "c2", "c0"]

    more = writer.add_vectors(rows(2, 8), ["c1", "c3"])  # then the reader writes: its catch-up follows too
    reader.add_vectors(rows(1, 9), ["c1"])
    assert rebuilds == []
    assert [r[0].id for r in reader.search_vectors(rows(2, 8), k=1, fetch=True)] == [int(i) for i in more]
    assert_same(reader._class_table(), fresh(reader)[0])

    writer.remove(ids=[int(ids[0])])  # a removal is never followed: the reader loads the saved file (or rebuilds)
    reader.refresh()
    assert int(ids[0]) not in {r[0].id for r in reader.search_vectors(new, k=1, fetch=True)}
    assert_same(reader._class_table(), fresh(reader)[0])
    rebuilds.clear()
    writer.backend.add(np.array([int(ids[0])]), ["c3"], [""], ["h" * 64], rows(1, 10))  # an import keeping an id
    writer.backend.end_write(None, False)
    reader.refresh()
    assert rebuilds, "an insert under a given id is not an append: rebuilt"
    assert reader.search_vectors(rows(1, 10), k=1, fetch=True)[0][0].label == "c3"
    reader.close()
    writer.close()
