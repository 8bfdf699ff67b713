"""ItemStore: the SQLite truth of an index."""

from __future__ import annotations

import sqlite3
from pathlib import Path

import numpy as np
import pytest

from siamesedb.errors import CorruptIndexError, DimensionMismatchError, IndexNotFoundError, InvalidInputError
from siamesedb.backends.faiss.store import ItemStore
from siamesedb.backends.items import Item


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
    assert store.labels_of([ids[1], 999]) == ["b", None]
    assert store.known_hashes() == {"h0", "h1", "h2"}
    all_ids, all_labels = store.all_labels()
    assert np.array_equal(all_ids, ids) and all_labels == ["a", "b", "a"]
    assert got.dtype == np.float32 and got.flags.writeable
    assert store.known_label_hashes() == {("a", "h0"), ("b", "h1"), ("a", "h2")}


def test_every_write_bumps_the_version(store):
    v0 = store.version
    ids = store.add(["a", "b"], ["p", "q"], ["h", "i"], vectors(2))
    v1 = store.version
    store.remove_ids(ids[:1])
    v2 = store.version
    store.remove_label("b")
    v3 = store.version
    assert v0 == 0 and v1 == 1 and v2 == 2 and v3 == 3  # one step per write, however many rows it touches
    # Writes that change nothing leave the version alone (a FAISS file mirroring it stays fresh).
    assert len(store.add([], [], [], np.empty((0, 4), np.float32))) == 0
    assert store.remove_ids([ids[0], 12345]) == 0
    assert len(store.remove_label("nobody")) == 0
    assert store.version == v3


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
    n = 2500  # more ids than one IN (...) statement may carry
    ids = store.add(["x"] * n, [f"p{i}" for i in range(n)], ["h"] * n, vectors(n))
    assert np.array_equal(ids, np.arange(ids[0], ids[0] + n))  # input order
    lookup = np.concatenate([ids[::-1], ids[:5]])  # reversed, with repeats
    assert [item.id for item in store.items(lookup)] == lookup.tolist()
    assert store.items([ids[7]])[0].path == "p7"
    assert store.remove_ids(np.concatenate([ids[:2000], ids[:3]])) == 2000  # repeats count once
    assert store.count() == n - 2000


def test_float64_vectors_and_path_objects_are_accepted(store):
    v = np.random.default_rng(1).normal(size=(2, 4))  # float64
    ids = store.add(["a", "b"], [Path("x/a.png"), "b.png"], ["h", "i"], v)
    assert store.items(ids)[0].path == str(Path("x/a.png"))
    assert np.allclose(store.vectors()[1], v.astype(np.float32))


def test_persistence_after_reopen(tmp_path):
    path = tmp_path / "items.sqlite"
    with ItemStore(path, dim=4) as s:
        ids = s.add(["a"], ["p"], ["h"], vectors(1))
        version = s.version
    with ItemStore(path) as again:
        assert again.dim == 4 and again.count() == 1 and again.version == version
        assert again.items(ids)[0].label == "a"
    with ItemStore.open_existing(path) as again:
        assert again.dim == 4 and np.array_equal(again.vectors()[0], ids)
        again.remove_ids(ids)
    with ItemStore(path, dim=4) as again:
        assert again.count() == 0 and again.version == version + 1
        assert again.add(["b"], ["p"], ["h"], vectors(1))[0] > ids[0]  # ids are not reused across sessions
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
    with pytest.raises(InvalidInputError, match="hash"):
        store.add(["a"], ["p"], [None], vectors(1))
    with pytest.raises(InvalidInputError, match="2-D"):
        store.add(["a"], ["p"], ["h"], vectors(1)[0])
    with pytest.raises(InvalidInputError, match="numeric"):
        store.add(["a"], ["p"], ["h"], np.array([["1", "2", "3", "4"]]))
    assert store.count() == 0 and store.version == 0


def test_a_batch_that_fails_midway_leaves_nothing(store):
    store.add(["keep"], ["p"], ["h"], vectors(1))
    version = store.version
    # A trigger makes the database itself refuse the third row of the batch, after two rows went in.
    store._conn.execute(
        "CREATE TRIGGER refuse BEFORE INSERT ON items WHEN NEW.label = 'bad' "
        "BEGIN SELECT RAISE(ABORT, 'refused'); END"
    )
    with pytest.raises(CorruptIndexError, match="refused"):  # named: an unexpected constraint is damage
        store.add(["a", "a", "bad", "a"], ["p"] * 4, ["h"] * 4, vectors(4))
    assert store.count() == 1 and store.version == version
    assert store.label_counts() == {"keep": 1}
    ids = store.add(["a"], ["p"], ["h"], vectors(1))  # the store still works after the rollback
    assert store.count() == 2 and store.version == version + 1 and store.items(ids)[0].label == "a"


def test_missing_and_corrupt_files(tmp_path):
    with pytest.raises(IndexNotFoundError):
        ItemStore(tmp_path / "nothing.sqlite")
    junk = tmp_path / "junk.sqlite"
    junk.write_bytes(b"this is not a database" * 100)
    with pytest.raises(CorruptIndexError, match="junk.sqlite") as info:
        ItemStore(junk, dim=4)
    assert "\n" not in str(info.value)
    with pytest.raises(CorruptIndexError, match="junk.sqlite"):
        ItemStore.open_existing(junk)
    with pytest.raises(IndexNotFoundError, match="nothing.sqlite"):
        ItemStore.open_existing(tmp_path / "nothing.sqlite")
    with pytest.raises(IndexNotFoundError, match="no-such-folder"):
        ItemStore(tmp_path / "no-such-folder" / "items.sqlite", dim=4)


def test_a_foreign_sqlite_file_is_refused_and_left_alone(tmp_path):
    other = tmp_path / "other.sqlite"
    with sqlite3.connect(other) as conn:
        conn.execute("CREATE TABLE songs (title TEXT)")
    with pytest.raises(CorruptIndexError, match="not a siamesedb item store"):
        ItemStore(other, dim=4)
    with sqlite3.connect(other) as conn:
        tables = {r[0] for r in conn.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
    assert tables == {"songs"}


def test_a_newer_format_is_refused(tmp_path):
    path = tmp_path / "items.sqlite"
    ItemStore(path, dim=4).close()
    with sqlite3.connect(path) as conn:
        conn.execute("UPDATE meta SET value = '99' WHERE key = 'schema_version'")
    with pytest.raises(CorruptIndexError, match="newer"):
        ItemStore(path)


def test_closed_store_says_so(tmp_path):
    s = ItemStore(tmp_path / "items.sqlite", dim=4)
    s.close()
    s.close()  # twice is harmless
    with pytest.raises(InvalidInputError, match="closed"):
        s.count()
