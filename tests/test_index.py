"""VectorIndex: FAISS behind the (D, I) contract, checked against brute-force numpy."""

from __future__ import annotations

import faiss
import numpy as np
import pytest

from siamesedb.errors import CorruptIndexError, DimensionMismatchError, InvalidInputError
from siamesedb.backends.faiss.index import VectorIndex
from siamesedb.scoring import brute_force_search, normalize


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


def test_k_beyond_the_collection_returns_what_there_is():
    corpus, queries = data(n=3)
    index = VectorIndex.from_vectors(corpus, np.array([7, 8, 9]))
    D, I = index.search(queries[:2], 5)
    assert I.shape == D.shape == (2, 3) and np.isfinite(D).all()  # min(k, held) wide: memory bounded by the answer
    assert set(I[0, :3]) == {7, 8, 9}
    empty = VectorIndex(16)
    D, I = empty.search(queries[:1], 2)
    assert I.shape == D.shape == (1, 0)


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
    assert index.remove([10**9]) == 0  # unknown ids are ignored
    assert set(index.ids().tolist()) == set(range(len(corpus))) - set(gone.tolist())
    index.add(corpus[gone], gone)  # removed ids can be added again
    assert np.array_equal(index.search(queries, 1)[1][:, 0], I[:, 0])


def test_ivf_padding_when_probed_lists_hold_fewer_than_k():
    corpus, queries = data(n=400)
    index = VectorIndex.from_vectors(corpus, np.arange(len(corpus)), factory="IVF16,Flat")
    D, I = index.search(queries, 300)  # nprobe 1: one list of ~25 vectors cannot fill k = 300
    assert ((I == -1) == np.isneginf(D)).all() and (I == -1).any()
    assert np.isfinite(D[I >= 0]).all()


def test_save_load_round_trip(tmp_path):
    corpus, queries = data()
    index = VectorIndex.from_vectors(corpus, np.arange(len(corpus)) * 3)
    index.save(tmp_path / "v.faiss")
    again = VectorIndex.load(tmp_path / "v.faiss")
    assert again.dim == 16 and again.ntotal == index.ntotal
    for a, b in zip(index.search(queries, 7), again.search(queries, 7)):
        assert np.array_equal(a, b)
    assert np.array_equal(np.sort(again.ids()), np.arange(len(corpus)) * 3)
    assert again.factory == "Flat"
    assert [p.name for p in tmp_path.iterdir()] == ["v.faiss"]  # no temporary file left behind
    index.remove(np.arange(10) * 3)
    index.save(tmp_path / "v.faiss")  # overwrite in place
    assert VectorIndex.load(tmp_path / "v.faiss", factory="Flat").ntotal == len(corpus) - 10


def test_ivf_save_load_keeps_training(tmp_path):
    corpus, queries = data(n=1000)
    index = VectorIndex.from_vectors(corpus, np.arange(len(corpus)), factory="IVF8,Flat")
    index.save(tmp_path / "ivf.faiss")
    again = VectorIndex.load(tmp_path / "ivf.faiss", factory="IVF8,Flat")
    assert again.is_trained and again.factory == "IVF8,Flat"
    for a, b in zip(index.search(queries, 5), again.search(queries, 5)):
        assert np.array_equal(a, b)


def test_corrupt_or_missing_file(tmp_path):
    (tmp_path / "bad.faiss").write_bytes(b"\x00garbage" * 10)
    with pytest.raises(CorruptIndexError, match="bad.faiss"):
        VectorIndex.load(tmp_path / "bad.faiss")
    with pytest.raises(CorruptIndexError, match="missing.faiss: missing"):
        VectorIndex.load(tmp_path / "missing.faiss")
    (tmp_path / "empty.faiss").write_bytes(b"")
    with pytest.raises(CorruptIndexError, match="empty.faiss"):
        VectorIndex.load(tmp_path / "empty.faiss")
    good = VectorIndex.from_vectors(data(n=50)[0], np.arange(50))
    good.save(tmp_path / "cut.faiss")
    whole = (tmp_path / "cut.faiss").read_bytes()
    (tmp_path / "cut.faiss").write_bytes(whole[: len(whole) // 2])
    with pytest.raises(CorruptIndexError, match="cut.faiss"):
        VectorIndex.load(tmp_path / "cut.faiss")
    faiss.write_index(faiss.IndexFlatIP(16), str(tmp_path / "plain.faiss"))  # a FAISS file, but not ours
    with pytest.raises(CorruptIndexError, match="id map"):
        VectorIndex.load(tmp_path / "plain.faiss")


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
    with pytest.raises(InvalidInputError, match="ids"):
        index.add(corpus[:2], np.array([0.5, 1.5]))  # float ids are not silently truncated
    with pytest.raises(InvalidInputError, match="non-negative"):
        index.add(corpus[:2], np.array([-1, 3]))  # -1 means "no result" in I
    with pytest.raises(InvalidInputError, match="repeat"):
        index.add(corpus[:2], np.array([4, 4]))
    with pytest.raises(InvalidInputError, match="numeric"):
        index.add(corpus.astype(np.complex64), np.arange(len(corpus)))
    with pytest.raises(InvalidInputError, match="2-D"):
        index.add(corpus[None], np.arange(len(corpus)))
    for k in (0, -3, 2.5):
        with pytest.raises(InvalidInputError, match="k must"):
            index.search(corpus[:1], k)
    with pytest.raises(DimensionMismatchError, match="dimension 8.*16-d"):
        index.search(corpus[:1, :8], 3)
    inf = corpus[:1].copy()
    inf[0, 3] = np.inf
    with pytest.raises(InvalidInputError, match="infinity"):
        index.search(inf, 3)
    assert index.ntotal == 0  # nothing slipped in through a failed call
    with pytest.raises(InvalidInputError, match="factory"):
        VectorIndex(16, factory="NotAFactory")
    index.add(corpus.astype(np.float64), np.arange(len(corpus)))  # float64 is cast, not refused
    assert index.ntotal == len(corpus)
    with pytest.raises(InvalidInputError, match="id 3 is already"):
        index.add(corpus[:2], np.array([len(corpus) + 7, 3]))
    assert index.ntotal == len(corpus)
    D, I = index.search(np.asfortranarray(corpus[:4]), 1)  # non-contiguous input is copied, not refused
    assert I[:, 0].tolist() == [0, 1, 2, 3]


def test_training_errors_are_one_line():
    corpus, _ = data(n=100)
    index = VectorIndex(16, factory="PQ4")  # 256 centroids per sub-quantiser: 100 vectors are too few
    with pytest.raises(InvalidInputError, match="cannot train") as info:
        index.train(corpus)
    assert "\n" not in str(info.value) and ".cpp" not in str(info.value)


def test_hnsw_removal_is_tombstones_filtered_in_search(tmp_path):
    corpus, queries = data()
    index = VectorIndex.from_vectors(corpus, np.arange(len(corpus)), factory="HNSW16")
    assert not index.removes_natively and VectorIndex(16).removes_natively
    _, I = index.search(queries, 10)
    _, I_ref = brute_force_search(queries, corpus, 10)
    assert np.mean([len(set(a) & set(b)) / 10 for a, b in zip(I, I_ref)]) > 0.8
    gone = np.unique(I[:, 0])
    assert index.remove(np.concatenate([gone, [10**9]])) == len(gone)  # unknown ids are ignored
    assert index.remove(gone) == 0  # already removed
    assert index.ntotal == len(corpus) - len(gone) and index.removed_pending == len(gone)
    D, I2 = index.search(queries, 10)
    assert not set(I2.ravel()) & set(gone.tolist())
    assert (I2 >= 0).all()  # the selector skips tombstones inside the graph search: still k live results
    index.save(tmp_path / "h.faiss")
    assert (tmp_path / "h.faiss.removed.npy").exists()
    again = VectorIndex.load(tmp_path / "h.faiss", factory="HNSW16")
    assert again.removed_pending == len(gone) and np.array_equal(again.search(queries, 10)[1], I2)
    assert set(again.ids().tolist()) == set(range(len(corpus))) - set(gone.tolist())
    assert again.needs_compaction  # 500 vectors: small enough to rebuild at once
    again.compact()
    assert again.removed_pending == 0 and again.ntotal == len(corpus) - len(gone)
    again.save(tmp_path / "h.faiss")
    assert not (tmp_path / "h.faiss.removed.npy").exists()
    index.add(corpus[gone], gone)  # a tombstoned id comes back: compacted first, then added
    assert index.removed_pending == 0 and index.ntotal == len(corpus)
    assert np.array_equal(index.search(corpus[gone], 1, ef_search=64)[1][:, 0], gone)  # each finds itself
