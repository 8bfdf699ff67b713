"""The fast search paths give the answers of the plain ones: hit labels / paths served from the in-memory ItemTable
equal the store's, across writes; the exact kernels VectorIndex picks return FAISS Flat's ids (up to float ties)."""

from __future__ import annotations

import faiss
import numpy as np
import pytest

from siamesedb.backends.faiss import kernels
from siamesedb.db import SiameseDB
from siamesedb.backends.faiss.index import VectorIndex
from siamesedb.item_table import ItemTable

from helpers import tiny_encoder, unit_rows  # tests/helpers.py


@pytest.fixture
def db(tmp_path):
    with SiameseDB.create(tmp_path / "index", encoder=tiny_encoder(size=16), device="cpu") as handle:
        yield handle


def hits_of(results) -> list[list[tuple[int, str, str]]]:
    return [[(h.id, h.label, h.path) for h in row] for row in results]


def test_item_table_answers_as_the_store_does(db):
    vectors = unit_rows(300, 0)
    labels = [f"class{i % 7}" for i in range(300)]
    paths = [f"/photos/é{i}.jpg" if i % 3 else "" for i in range(300)]
    ids = db.add_vectors(vectors, labels, paths=paths)
    with db.store.snapshot():
        table = ItemTable.from_store(db.store)
    asked = np.concatenate([ids[::5], [0, 10_000_000]])  # two ids the store does not hold
    assert table.lookup(asked) == db.store.labels_and_paths(asked)
    assert table.lookup(np.empty(0, np.int64)) == {}


def test_search_hits_stay_right_across_writes(db):
    """Repeated searches switch to the in-memory table; every write (add, remove) is seen by the next search."""
    first = db.add_vectors(unit_rows(200, 1), [f"a{i % 5}" for i in range(200)], paths=[f"p{i}" for i in range(200)])
    queries = unit_rows(20, 2)
    expected = hits_of(db.search_vectors(queries, k=5))  # from the store (first read at this version)
    for _ in range(2):  # the second read builds the table, the third uses it
        assert hits_of(db.search_vectors(queries, k=5)) == expected
    assert db._item_table is not None and db._item_table.version == db.store.version
    db.remove(ids=first[:100])
    db.add_vectors(queries, ["new"] * len(queries), paths=[f"q{i}" for i in range(len(queries))])
    after = [hits_of(db.search_vectors(queries, k=5)) for _ in range(3)]
    assert after[0] == after[1] == after[2]
    assert all(row[0][1] == "new" for row in after[2])  # each query finds itself, labelled as just added
    removed = set(first[:100].tolist())
    assert not any(hit[0] in removed for row in after[2] for hit in row)


def test_reopened_index_reads_labels_of_another_writer(db, tmp_path):
    db.add_vectors(unit_rows(50, 3), ["old"] * 50)
    queries = unit_rows(5, 4)
    for _ in range(3):
        db.search_vectors(queries, k=3)[0]
    with SiameseDB.open(db.path, device="cpu") as other:
        other.remove(label="old")
        other.add_vectors(queries, ["fresh"] * 5)
    # This handle's FAISS index is stale: its hits are items the other writer removed, which are left out.
    assert all(row == [] for row in db.search_vectors(queries, k=1))
    db.refresh()
    assert [row[0].label for row in db.search_vectors(queries, k=1)] == ["fresh"] * 5


def flat_reference(vectors: np.ndarray, ids: np.ndarray, queries: np.ndarray, k: int, metric: str):
    """FAISS Flat with FAISS's own settings: the ids every exact kernel must return."""
    flat = faiss.IndexIDMap2(faiss.IndexFlatIP(vectors.shape[1]) if metric == "inner_product"
                             else faiss.IndexFlatL2(vectors.shape[1]))
    flat.add_with_ids(vectors, ids)
    saved = (faiss.cvar.distance_compute_blas_threshold, faiss.cvar.distance_compute_blas_database_bs)
    faiss.cvar.distance_compute_blas_threshold, faiss.cvar.distance_compute_blas_database_bs = kernels.FAISS_BLAS_DEFAULT
    try:
        return flat.search(queries, k)
    finally:
        faiss.cvar.distance_compute_blas_threshold, faiss.cvar.distance_compute_blas_database_bs = saved


def same_up_to_ties(D, I, D_ref, I_ref, atol=1e-5) -> bool:
    """Equal ids, except where neighbouring scores tie within float rounding (their order may swap)."""
    if not np.allclose(D, D_ref, atol=atol):
        return False
    differ = I != I_ref
    if not differ.any():
        return True
    # Wherever ids differ, the reference must hold a score tie at that rank (with the rank before or after).
    gaps = np.abs(np.diff(D_ref, axis=1)) <= atol
    tied = np.zeros_like(differ)
    tied[:, 1:] |= gaps
    tied[:, :-1] |= gaps
    return bool(tied[differ].all())


@pytest.mark.parametrize("metric", ["inner_product", "l2"])
@pytest.mark.parametrize("batch", [1, 7, kernels.SMALL_BATCH, 300])
@pytest.mark.parametrize("threads", [1, 2])
def test_exact_kernels_return_faiss_flat_ids(metric, batch, threads):
    rng = np.random.default_rng(batch)
    n, dim, k = 5000, 32, 10
    vectors = rng.normal(size=(n, dim)).astype(np.float32)
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    ids = rng.permutation(np.arange(10, 10 + 3 * n, 3)).astype(np.int64)  # ids that are not positions
    queries = vectors[rng.integers(0, n, batch)] + 0.05 * rng.normal(size=(batch, dim)).astype(np.float32)
    index = VectorIndex(dim, "Flat", metric=metric)
    index.add(vectors, ids)
    before = faiss.omp_get_max_threads()
    try:
        faiss.omp_set_num_threads(threads)
        D, I = index.search(queries, k)
        assert faiss.omp_get_max_threads() == threads  # the one-thread scan restored the caller's count
    finally:
        faiss.omp_set_num_threads(before)
    D_ref, I_ref = flat_reference(vectors, ids, queries, k, metric)
    if metric == "l2":
        D_ref = -np.sqrt(np.maximum(D_ref, 0))  # VectorIndex scores L2 hits as minus the distance
    assert kernels.exact_kernel(batch) == ("faiss-scan" if batch < kernels.SMALL_BATCH else "faiss-blas")
    assert same_up_to_ties(D, I, D_ref, I_ref)
