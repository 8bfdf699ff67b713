"""Odd search input (issue 29): a huge k is clamped to the collection on every path (memory bounded by the answer,
never by k), k must be an integer, a rule never calibrated does not borrow another rule's threshold, a calibration
says when the index changed since, and kNN scores are similarities on the index's scale."""

from __future__ import annotations

import resource
from pathlib import Path

import numpy as np
import pytest

from siamesedb.backends.faiss.index import VectorIndex
from siamesedb.backends.faiss.torch_search import TorchExactSearch
from siamesedb.db import SiameseDB
from siamesedb.errors import InvalidInputError, NotCalibratedError
from siamesedb.scoring import brute_force_search

from helpers import TINY_DIM, tiny_encoder, unit_rows

HUGE = 10**9  # (2, HUGE) float32 + int64 arrays would be 24 GB: the guard below turns that into a MemoryError
LABELS = ["a"] * 5 + ["b"] * 4 + ["c"] * 3


def _vm_bytes() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmSize:"):
            return int(line.split()[1]) * 1024
    return 0


@pytest.fixture
def memory_guard():
    """An address-space limit of what the process maps now + 2 GiB while the test runs: allocating (nq, 10**9)
    arrays raises MemoryError instead of exhausting the shared machine."""
    soft, hard = resource.getrlimit(resource.RLIMIT_AS)
    limit = _vm_bytes() + (2 << 30)
    if hard != resource.RLIM_INFINITY:
        limit = min(limit, hard)
    resource.setrlimit(resource.RLIMIT_AS, (limit, hard))
    try:
        yield
    finally:
        resource.setrlimit(resource.RLIMIT_AS, (soft, hard))


def _encoder(pair_threshold: float | None = 0.5):
    encoder = tiny_encoder(seed=0)
    if pair_threshold is not None:
        encoder.config.notes["pair_threshold"] = pair_threshold
    return encoder


@pytest.fixture
def db(tmp_path):
    db = SiameseDB.create(tmp_path / "index", encoder=_encoder(), device="cpu")
    db.add_vectors(unit_rows(len(LABELS), seed=3), LABELS)
    yield db
    db.close()


# ---------------------------------------------------------------------------------------------- item 1: a huge k


def test_a_huge_k_search_returns_what_there_is(db, memory_guard):
    queries = unit_rows(2, seed=4)
    results = db.search_vectors(queries, k=HUGE)
    assert results.ids.shape == results.scores.shape == (2, len(LABELS))
    assert (results.ids >= 0).all() and np.isfinite(results.scores).all()
    assert [len(row) for row in results] == [len(LABELS)] * 2
    small = db.search_vectors(queries, k=3)
    assert small.ids.shape == (2, 3) and np.array_equal(small.ids, results.ids[:, :3])


def test_a_huge_k_knn_classify_and_label_filter(db, memory_guard):
    queries = unit_rows(2, seed=5)
    predictions = db.classify_vectors(queries, method="knn", k=HUGE)
    assert {label for label, _ in predictions[0].ranking} == {"a", "b", "c"}  # every item voted
    within = db.classify_vectors(queries, method="knn", k=HUGE, classes=["b"])
    assert [p.label for p in within] == ["b", "b"]
    D, I = db.backend.search(queries, HUGE, ["c"])  # filtered: padded only up to the items held
    assert I.shape == (2, len(LABELS)) and (I[:, :3] >= 0).all() and (I[:, 3:] == -1).all()
    assert np.isneginf(D[:, 3:]).all()


def test_a_huge_k_on_the_array_paths(memory_guard):
    corpus, queries = unit_rows(7, seed=6), unit_rows(2, seed=7)
    ids = np.arange(10, 17, dtype=np.int64)
    D, I = brute_force_search(queries, corpus, HUGE)
    assert D.shape == I.shape == (2, 7) and sorted(I[0].tolist()) == list(range(7))
    D, I = TorchExactSearch(corpus, ids).search(queries, HUGE)
    assert D.shape == I.shape == (2, 7) and sorted(I[0].tolist()) == ids.tolist()
    for factory in ("Flat", "HNSW16"):
        index = VectorIndex.from_vectors(corpus, ids, factory=factory)
        D, I = index.search(queries, HUGE)
        assert D.shape == I.shape == (2, 7), factory
        D, I = VectorIndex.from_vectors(corpus, ids, factory=factory, backend="torch").search(queries, HUGE)
        assert D.shape == I.shape == (2, 7), factory
    D, I = VectorIndex(TINY_DIM).search(queries, HUGE)  # empty: nothing to return
    assert D.shape == I.shape == (2, 0)
    D, I = brute_force_search(queries, np.empty((0, TINY_DIM), np.float32), HUGE)
    assert D.shape == I.shape == (2, 0)


def test_a_huge_k_while_an_ivf_index_cannot_train_yet(tmp_path, memory_guard):
    with SiameseDB.create(tmp_path / "ivf", encoder=_encoder(), factory="IVF16,Flat", device="cpu") as db:
        db.add_vectors(unit_rows(6, seed=8), ["x"] * 3 + ["y"] * 3)  # too few to train 16 lists: exact search
        results = db.search_vectors(unit_rows(1, seed=9), k=HUGE)
        assert results.ids.shape == (1, 6) and (results.ids >= 0).all()


def test_fewer_than_k_items_pads_up_to_the_items_held_only(db):
    results = db.search_vectors(unit_rows(1, seed=4), k=50)
    assert results.ids.shape == (1, len(LABELS))


def test_milvus_clamps_a_huge_k_to_what_it_holds_and_refuses_over_its_cap(tmp_path, monkeypatch, memory_guard):
    pytest.importorskip("pymilvus")
    pytest.importorskip("milvus_lite")
    import hashlib

    import siamesedb.backends.milvus.backend as milvus_backend
    from siamesedb.backends.milvus import MilvusBackend

    backend = MilvusBackend(tmp_path / "m.db", "items", dimension=TINY_DIM)
    try:
        vectors = unit_rows(5, seed=10)
        ids = np.arange(5, dtype=np.int64)
        backend.add(ids, ["a", "a", "b", "b", "b"], [f"/d/{i}.png" for i in ids],
                    [hashlib.sha256(bytes([i])).hexdigest() for i in ids], vectors)
        D, I = backend.search(vectors[:2], HUGE)
        assert D.shape == I.shape == (2, 5) and (I >= 0).all() and I[0, 0] == 0
        D, I = backend.search(vectors[:2], HUGE, ["a"])
        assert I.shape == (2, 5) and (I[:, :2] >= 0).all() and (I[:, 2:] == -1).all()
        monkeypatch.setattr(milvus_backend, "MAX_TOPK", 3)  # a collection larger than the cap: the clean error
        with pytest.raises(InvalidInputError, match="k must be at most 3"):
            backend.search(vectors[:1], HUGE)
        assert backend.search(vectors[:1], 3)[1].shape == (1, 3)
    finally:
        backend.close()


# ---------------------------------------------------------------------------------------------- item 11: k's type


@pytest.mark.parametrize("k", [None, "3", 2.5])
def test_k_that_is_not_an_integer_is_refused_by_name(db, k):
    queries = unit_rows(1, seed=4)
    with pytest.raises(InvalidInputError, match="k must be an integer"):
        db.search_vectors(queries, k=k)
    with pytest.raises(InvalidInputError, match="k must be an integer"):
        db.classify_vectors(queries, method="knn", k=k)


def test_k_below_one_is_refused(db):
    with pytest.raises(InvalidInputError, match="k must be at least 1"):
        db.search_vectors(unit_rows(1, seed=4), k=0)


# ---------------------------------------------------------------------------------------------- item 9: rules


def test_a_rule_never_calibrated_does_not_borrow_another_scale(db):
    query = unit_rows(1, seed=11)[0]
    db.calibrate(rule="prototype")
    with pytest.raises(NotCalibratedError) as caught:
        db.verify_vector(query, "a", rule="relative")
    message = str(caught.value)
    assert "relative" in message and f"siamesedb calibrate --index {db.path} --rule relative" in message
    # Rules scored as cosines take the encoder's pair threshold, and say so.
    for rule in ("max", "mean_top3"):
        answer = db.verify_vector(query, "a", rule=rule)
        assert answer.threshold == 0.5 and answer.threshold_source == "encoder"
    db.calibrate(rule="relative")
    answer = db.verify_vector(query, "a", rule="relative")
    assert answer.threshold_source.startswith("index:relative:")
    assert answer.threshold == db.calibrations["relative"]["threshold"]


def test_relative_without_any_calibration_is_refused_too(db):
    with pytest.raises(NotCalibratedError, match="--rule relative"):
        db.verify_vector(unit_rows(1, seed=11)[0], "a", rule="relative")
    assert db.verify_vector(unit_rows(1, seed=11)[0], "a").threshold_source == "encoder"  # prototype: its scale


def test_a_calibration_says_when_the_index_changed_since(db):
    query = unit_rows(1, seed=11)[0]
    db.calibrate()
    assert db.info()["calibrations"]["prototype"]["stale"] is False
    assert db.info()["calibration_stale"] is False
    assert "stale" not in db.verify_vector(query, "a").threshold_source
    db.add_vectors(unit_rows(3, seed=12), ["a", "b", "c"])
    info = db.info()
    assert info["calibration_stale"] is True
    stale = info["calibrations"]["prototype"]
    assert stale["stale"] is True and stale["items"] == len(LABELS) and stale["items_now"] == len(LABELS) + 3
    answer = db.verify_vector(query, "a")
    assert answer.threshold_source.startswith("index:prototype:") and "stale" in answer.threshold_source
    assert f"{len(LABELS)} items then, {len(LABELS) + 3} now" in answer.threshold_source
    db.calibrate()
    assert db.info()["calibration_stale"] is False


# ---------------------------------------------------------------------------------------------- item 12: kNN scores


def test_knn_scores_are_similarities_on_the_index_scale(db):
    ids, vectors = db.vectors()
    queries = vectors[[0, 6]]  # items of "a" and "b" themselves
    predictions = db.classify_vectors(queries, method="knn", k=len(LABELS))
    D, I = db.backend.search(queries, len(LABELS))
    labels = dict(zip(ids.tolist(), db.labels_of(ids)))
    for prediction, d_row, i_row in zip(predictions, D, I):
        for label, score in prediction.ranking:
            mine = [s for s, i in zip(d_row, i_row) if labels[int(i)] == label]
            assert score == pytest.approx(float(np.mean(mine)), abs=1e-5)  # the mean similarity, not a sum
            assert -1 - 1e-6 <= score <= 1 + 1e-6
        assert prediction.score == prediction.ranking[0][1]
    # k = 1: the neighbour is the item itself, similarity 1
    assert db.classify_vectors(queries[:1], method="knn", k=1)[0].score == pytest.approx(1.0, abs=1e-5)
