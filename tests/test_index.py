"""VectorIndex: FAISS behind the (D, I) contract, checked against brute-force numpy."""

from __future__ import annotations

import numpy as np
import pytest

from siamesedb.errors import CorruptIndexError, DimensionMismatchError, InvalidInputError
from siamesedb.index import VectorIndex
from siamesedb.query import brute_force_search, normalize


def data(n=500, d=16, nq=20, seed=0):
    rng = np.random.default_rng(seed)
    return normalize(rng.normal(size=(n, d))), normalize(rng.normal(size=(nq, d)))


def test_flat_search_equals_brute_force_with_ids():
    corpus, queries = data()
    ids = np.arange(1000, 1000 + len(corpus), dtype=np.int64)
    index = VectorIndex.from_vectors(corpus, ids)
    D, I = index.search(queries, 10)
    D_ref, I_ref = brute_force_search(queries, corpus, 10)
    assert np.array_equal(I, ids[I_ref])
    assert np.allclose(D, D_ref, atol=1e-5)
    assert D.dtype == np.float32 and I.dtype == np.int64


def test_ivf_needs_training_and_recalls_most_neighbours():
    corpus, queries = data(n=2000)
    index = VectorIndex(16, factory="IVF16,Flat")
    assert not index.is_trained
    with pytest.raises(InvalidInputError, match="train"):
        index.add(corpus, np.arange(len(corpus)))
    index.train(corpus)
    index.add(corpus, np.arange(len(corpus)))
    _, I = index.search(queries, 10)
    _, I_ref = brute_force_search(queries, corpus, 10)
    recall = np.mean([len(set(a) & set(b)) / 10 for a, b in zip(I, I_ref)])
    assert recall > 0.3  # nprobe 1 of 16 lists: approximate by design


def test_padding_when_k_exceeds_the_collection():
    corpus, queries = data(n=3)
    index = VectorIndex.from_vectors(corpus, np.array([7, 8, 9]))
    D, I = index.search(queries[:2], 5)
    assert (I[:, 3:] == -1).all() and np.isneginf(D[:, 3:]).all()
    assert set(I[0, :3]) == {7, 8, 9}
    empty = VectorIndex(16)
    D, I = empty.search(queries[:1], 2)
    assert (I == -1).all()


def test_single_vector_query_is_one_row():
    corpus, queries = data()
    index = VectorIndex.from_vectors(corpus, np.arange(len(corpus)))
    D, I = index.search(queries[0], 3)
    assert D.shape == (1, 3) and I.shape == (1, 3)


def test_remove_then_search():
    corpus, queries = data()
    index = VectorIndex.from_vectors(corpus, np.arange(len(corpus)))
    _, I = index.search(queries, 1)
    gone = np.unique(I[:, 0])
    assert index.remove(gone) == len(gone)
    assert index.ntotal == len(corpus) - len(gone)
    _, I2 = index.search(queries, 5)
    assert not set(I2.ravel()) & set(gone.tolist())
    assert index.remove(np.array([], dtype=np.int64)) == 0


def test_save_load_round_trip(tmp_path):
    corpus, queries = data()
    index = VectorIndex.from_vectors(corpus, np.arange(len(corpus)) * 3)
    index.save(tmp_path / "v.faiss")
    again = VectorIndex.load(tmp_path / "v.faiss")
    assert again.dim == 16 and again.ntotal == index.ntotal
    for a, b in zip(index.search(queries, 7), again.search(queries, 7)):
        assert np.array_equal(a, b)
    assert np.array_equal(np.sort(again.ids()), np.arange(len(corpus)) * 3)
    assert not (tmp_path / "v.faiss.tmp").exists()


def test_corrupt_or_missing_file(tmp_path):
    (tmp_path / "bad.faiss").write_bytes(b"\x00garbage" * 10)
    with pytest.raises(CorruptIndexError, match="bad.faiss"):
        VectorIndex.load(tmp_path / "bad.faiss")
    with pytest.raises(CorruptIndexError, match="missing.faiss"):
        VectorIndex.load(tmp_path / "missing.faiss")


def test_boundary_checks():
    corpus, _ = data()
    index = VectorIndex(16)
    with pytest.raises(DimensionMismatchError, match="16"):
        index.add(corpus[:, :8], np.arange(len(corpus)))
    with pytest.raises(InvalidInputError, match="ids"):
        index.add(corpus, np.arange(3))
    bad = corpus.copy()
    bad[0, 0] = np.nan
    with pytest.raises(InvalidInputError, match="NaN"):
        index.add(bad, np.arange(len(bad)))
    with pytest.raises(InvalidInputError):
        index.search(corpus[:1], 0)
    with pytest.raises(InvalidInputError, match="factory"):
        VectorIndex(16, factory="NotAFactory")
    index.add(corpus.astype(np.float64), np.arange(len(corpus)))  # float64 is cast, not refused
    assert index.ntotal == len(corpus)
