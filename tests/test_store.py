"""ItemStore: the SQLite truth of an index."""

from __future__ import annotations

import numpy as np
import pytest

from siamesedb.errors import CorruptIndexError, DimensionMismatchError, IndexNotFoundError, InvalidInputError
from siamesedb.store import Item, ItemStore


def vectors(n, d=4, seed=0):
    return np.random.default_rng(seed).normal(size=(n, d)).astype(np.float32)


@pytest.fixture()
def store(tmp_path):
    s = ItemStore(tmp_path / "items.sqlite", dim=4)
    yield s
    s.close()


def test_add_and_read_back(store):
    v = vectors(3)
    ids = store.add(["a", "b", "a"], ["p0", "p1", "p2"], ["h0", "h1", "h2"], v)
    assert ids.dtype == np.int64 and len(set(ids.tolist())) == 3
    assert store.count() == 3
    assert store.label_counts() == {"a": 2, "b": 1}
    got_ids, got = store.vectors()
    assert np.array_equal(got_ids, ids) and np.array_equal(got, v)
    a_ids, a_vectors = store.vectors(label="a")
    assert np.array_equal(a_ids, ids[[0, 2]]) and np.array_equal(a_vectors, v[[0, 2]])
    assert store.items([ids[2], 999, ids[0]]) == [Item(int(ids[2]), "a", "p2", "h2"), None, Item(int(ids[0]), "a", "p0", "h0")]
    assert store.labels_of(ids) == ["a", "b", "a"]
    assert store.known_label_hashes() == {("a", "h0"), ("b", "h1"), ("a", "h2")}


def test_every_write_bumps_the_version(store):
    v0 = store.version
    ids = store.add(["a"], ["p"], ["h"], vectors(1))
    v1 = store.version
    store.remove_ids(ids)
    v2 = store.version
    assert v0 < v1 < v2


def test_removal_and_ids_never_reused(store):
    ids = store.add(["a", "b", "b"], ["p"] * 3, ["h"] * 3, vectors(3))
    assert store.remove_ids([ids[0]]) == 1
    removed = store.remove_label("b")
    assert sorted(removed.tolist()) == sorted(ids[1:].tolist())
    assert store.count() == 0
    assert len(store.remove_label("b")) == 0
    new = store.add(["c"], ["p"], ["h"], vectors(1))
    assert new[0] > ids.max()


def test_many_ids_in_one_lookup(store):
    ids = store.add(["x"] * 2500, ["p"] * 2500, ["h"] * 2500, vectors(2500))
    assert [item.id for item in store.items(ids[::-1])] == ids[::-1].tolist()
    assert store.remove_ids(ids[:2000]) == 2000


def test_persistence_after_reopen(tmp_path):
    path = tmp_path / "items.sqlite"
    with ItemStore(path, dim=4) as s:
        ids = s.add(["a"], ["p"], ["h"], vectors(1))
        version = s.version
    with ItemStore(path) as again:
        assert again.dim == 4 and again.count() == 1 and again.version == version
        assert again.items(ids)[0].label == "a"
    with pytest.raises(DimensionMismatchError):
        ItemStore(path, dim=8)


def test_failed_validation_stores_nothing(store):
    with pytest.raises(InvalidInputError):
        store.add(["a", "b"], ["p"], ["h", "h"], vectors(2))
    bad = vectors(2)
    bad[1, 1] = np.inf
    with pytest.raises(InvalidInputError):
        store.add(["a", "b"], ["p", "p"], ["h", "h"], bad)
    with pytest.raises(DimensionMismatchError):
        store.add(["a"], ["p"], ["h"], vectors(1, d=5))
    with pytest.raises(InvalidInputError):
        store.add([""], ["p"], ["h"], vectors(1))
    assert store.count() == 0 and store.version == 0


def test_missing_and_corrupt_files(tmp_path):
    with pytest.raises(IndexNotFoundError):
        ItemStore(tmp_path / "nothing.sqlite")
    junk = tmp_path / "junk.sqlite"
    junk.write_bytes(b"this is not a database" * 100)
    with pytest.raises(CorruptIndexError, match="junk.sqlite"):
        ItemStore(junk, dim=4)
