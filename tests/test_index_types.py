"""Index types end to end: every factory's add / search / remove / save / open, the auto rule, per-query nprobe and
efSearch, and the exact torch search (run on CPU tensors here) against FAISS Flat."""

from __future__ import annotations


import faiss
import numpy as np
import pytest

from siamesedb.backends.faiss import kernels
from siamesedb.backends.faiss.gpu import faiss_has_gpu
from siamesedb.devices import torch_cuda_available
from siamesedb.errors import InvalidInputError
from siamesedb.backends.faiss.factory import auto_search_defaults, choose_factory, ivf_lists
from siamesedb.backends.faiss.index import VectorIndex
from siamesedb.scoring import brute_force_search, normalize

FACTORIES = ["Flat", "IVF16,Flat", "HNSW16", "IVF16,PQ8x4", "PQ8x4"]


pytestmark = pytest.mark.usefixtures("one_faiss_thread")  # tests/conftest.py


def clustered(n: int, d: int = 16, centres: int = 40, spread: float = 0.35, seed: int = 0) -> np.ndarray:
    """Gaussian blobs around random unit centres, normalised: shaped like real embeddings, not uniform noise."""
    rng = np.random.default_rng(seed)
    middle = normalize(rng.normal(size=(centres, d)))
    return normalize(middle[rng.integers(0, centres, n)] + spread / np.sqrt(d) * rng.normal(size=(n, d)))


def recall(found: np.ndarray, truth: np.ndarray) -> float:
    return float(np.mean([len(set(a) & set(b)) / len(b) for a, b in zip(found, truth)]))


@pytest.fixture(scope="module")
def corpus():
    vectors = clustered(3000)
    return vectors, np.arange(len(vectors), dtype=np.int64) * 7 + 3, clustered(50, seed=1)


def wide(index: VectorIndex) -> dict:
    """Search parameters that make each approximate type close to exact on this small corpus."""
    return {"nprobe": 16} if "IVF" in index.factory else {"ef_search": 128} if "HNSW" in index.factory else {}


@pytest.mark.parametrize("factory", FACTORIES)
def test_every_type_adds_searches_removes_saves_and_opens(factory, corpus, tmp_path):
    vectors, ids, queries = corpus
    index = VectorIndex.from_vectors(vectors, ids, factory=factory)
    assert index.ntotal == len(vectors) and index.is_trained
    D, I = index.search(queries, 10, **wide(index))
    _, rows = brute_force_search(queries, vectors, 10)
    floor = 0.3 if "PQ" in factory else 0.95  # 4-byte PQ codes are lossy by design (chance: 0.003)
    assert recall(I, ids[rows]) >= floor
    assert np.all(np.diff(D, axis=1) <= 1e-6)  # best first
    gone = np.unique(I[:, :3])
    assert index.remove(gone) == len(gone)
    assert index.ntotal == len(vectors) - len(gone)
    D2, I2 = index.search(queries, 10, **wide(index))
    assert not np.isin(I2, gone).any() and (I2 >= 0).all()
    assert set(index.ids().tolist()) == set(ids.tolist()) - set(gone.tolist())
    index.save(tmp_path / "v.faiss")
    again = VectorIndex.load(tmp_path / "v.faiss", factory=factory)
    assert again.ntotal == index.ntotal
    for a, b in zip(again.search(queries, 10, **wide(index)), (D2, I2)):
        assert np.array_equal(a, b)
    back = vectors[np.isin(ids, gone)]
    again.add(back, ids[np.isin(ids, gone)])  # removed ids can come back
    assert again.ntotal == len(vectors) and again.removed_pending == 0
    _, I3 = again.search(back, 1, **wide(index))
    assert np.mean(I3[:, 0] == ids[np.isin(ids, gone)]) >= (0.3 if "PQ" in factory else 0.95)


def test_pre_transformed_ivf_filters_removed_and_takes_nprobe(tmp_path):
    vectors = clustered(600)
    index = VectorIndex.from_vectors(vectors, np.arange(600) + 1000, factory="PCAR16,IVF8,Flat")
    index.set_search_defaults(nprobe=8)
    assert index.search_defaults == {"nprobe": 8} and not index.removes_natively
    _, I = index.search(vectors[:20], 5)
    gone = np.unique(I[:, :2])
    assert index.remove(gone) == len(gone)
    _, after = index.search(vectors[:20], 5, nprobe=8)
    assert not np.isin(after, gone).any() and (after >= 0).all()
    index.save(tmp_path / "o.faiss")
    _, again = VectorIndex.load(tmp_path / "o.faiss", factory="PCAR16,IVF8,Flat").search(vectors[:20], 5, nprobe=8)
    assert np.array_equal(again, after)


def test_nprobe_per_query_has_effect_and_does_not_stick():
    vectors, queries = clustered(4000, d=16, centres=200, seed=2), clustered(100, d=16, centres=200, seed=3)
    index = VectorIndex.from_vectors(vectors, np.arange(len(vectors)), factory="IVF64,Flat")
    _, truth = brute_force_search(queries, vectors, 10)
    low = recall(index.search(queries, 10, nprobe=1)[1], truth)
    full_D, full_I = index.search(queries, 10, nprobe=64)  # every list: exact
    assert recall(full_I, truth) == 1.0 and low < 0.9
    assert index.search_defaults == {"nprobe": 1}  # the per-query value did not replace the default
    assert recall(index.search(queries, 10)[1], truth) == low
    index.set_search_defaults(nprobe=64)
    assert np.array_equal(index.search(queries, 10)[1], full_I)


def test_ef_search_per_query_has_effect():
    rng = np.random.default_rng(4)
    vectors, queries = normalize(rng.normal(size=(5000, 32))), normalize(rng.normal(size=(100, 32)))
    index = VectorIndex.from_vectors(vectors, np.arange(len(vectors)), factory="HNSW4")  # one thread: deterministic
    _, truth = brute_force_search(queries, vectors, 10)
    narrow = recall(index.search(queries, 10, ef_search=10)[1], truth)
    broad = recall(index.search(queries, 10, ef_search=400)[1], truth)
    assert broad > narrow + 0.1 and broad > 0.9
    assert index.search_defaults == {"ef_search": 16}


def test_search_parameter_errors():
    vectors = clustered(500)
    flat = VectorIndex.from_vectors(vectors, np.arange(500))
    with pytest.raises(InvalidInputError, match="nprobe applies to IVF.*'Flat'"):
        flat.search(vectors[:2], 3, nprobe=4)
    with pytest.raises(InvalidInputError, match="ef_search applies to HNSW"):
        flat.search(vectors[:2], 3, ef_search=4)
    ivf = VectorIndex.from_vectors(vectors, np.arange(500), factory="IVF4,Flat")
    for bad in (0, -1, 2.5):
        with pytest.raises(InvalidInputError, match="nprobe must"):
            ivf.search(vectors[:2], 3, nprobe=bad)
    hybrid = VectorIndex.from_vectors(vectors, np.arange(500), factory="IVF8_HNSW8,Flat")  # HNSW coarse quantiser
    assert hybrid.search(vectors[:5], 1, nprobe=8, ef_search=32)[1][:, 0].tolist() == [0, 1, 2, 3, 4]


@pytest.mark.parametrize(
    "n, budget, expected",
    [
        (0, None, "Flat"),
        (9_999, None, "Flat"),
        (50_000, None, "HNSW32"),
        (1_000_000, None, "HNSW32"),
        (50_000, 50_000 * (4 * 64 + 24 + 8 * 8), "HNSW8"),  # just room for M = 8
        (50_000, 50_000 * (4 * 64 + 24 + 8 * 8) - 50_000, "IVF1024,Flat"),  # not quite: full vectors in IVF lists
        (2_000_000, 2_000_000 * 100, "IVF4096,PQ32"),  # IVF,Flat would not fit: 32-byte codes do
        (2_000_000, 2_000_000 * 40, "IVF4096,PQ8"),
    ],
)
def test_auto_rule(n, budget, expected):
    assert choose_factory(n, 64, budget) == expected


def test_auto_rule_limits():
    assert ivf_lists(10_000) == 256  # 4*sqrt(n) = 400 -> 512, capped at n/39 = 256 for k-means
    assert ivf_lists(1_000_000) == 4096 and ivf_lists(1) == 1
    with pytest.raises(InvalidInputError, match="raise the memory budget"):
        choose_factory(1_000_000, 64, 1_000_000)
    with pytest.raises(InvalidInputError, match="auto"):
        VectorIndex(16, factory="auto")


def test_auto_from_vectors_sets_search_defaults():
    vectors = clustered(12_000, d=16)
    small = VectorIndex.from_vectors(vectors[:500], np.arange(500), factory="auto")
    assert small.factory == "Flat" and small.search_defaults == {}
    ivf = VectorIndex.from_vectors(vectors, np.arange(len(vectors)), factory="auto", memory_budget=1_500_000)
    assert ivf.factory == "IVF256,Flat" and ivf.search_defaults == auto_search_defaults("IVF256,Flat")
    assert auto_search_defaults("HNSW32", 100_000) == {"ef_search": 64}
    assert auto_search_defaults("HNSW32", 1_000_000) == {"ef_search": 128}


# ---------------------------------------------------------------------------------------------- torch exact search


def test_torch_search_matches_faiss_flat_on_cpu_tensors():
    from siamesedb.backends.faiss.torch_search import TorchExactSearch

    vectors, queries = clustered(5000, d=24, seed=5), clustered(300, d=24, seed=6)
    ids = np.arange(len(vectors), dtype=np.int64) * 3 + 1
    flat = VectorIndex.from_vectors(vectors, ids)
    D_ref, I_ref = flat.search(queries, 10)
    for block in (1 << 26, 4096):  # one block, and many corpus chunks merged through the running top-k
        D, I = TorchExactSearch(vectors, ids, device="cpu", block_entries=block).search(queries, 10)
        assert D.dtype == np.float32 and I.dtype == np.int64
        assert np.allclose(D, D_ref, atol=1e-5)
        tie = np.isclose(D, D_ref, atol=1e-6) & (I != I_ref)  # same score, other id: a tie, ordered either way
        assert np.array_equal(I[~tie], I_ref[~tie]) and tie.mean() < 0.01
    D, I = TorchExactSearch(vectors[:3], ids[:3]).search(queries[:2], 5)  # fewer than k: what there is
    assert I.shape == D.shape == (2, 3) and set(I[0]) == set(ids[:3]) and np.isfinite(D).all()


@pytest.mark.parametrize("factory", ["Flat", "HNSW16", "IVF16,Flat"])
def test_vector_index_torch_backend_is_exact_and_honours_removal(factory, corpus):
    vectors, ids, queries = corpus
    index = VectorIndex.from_vectors(vectors, ids, factory=factory, backend="torch")
    assert index.backend == "torch" and index.device == "cpu"
    index.remove(ids[:100])
    live = ~np.isin(ids, ids[:100])
    D, I = index.search(queries, 10, **wide(index))  # parameters accepted, exact search ignores them
    D_ref, rows = brute_force_search(queries, vectors[live], 10)
    assert np.allclose(D, D_ref, atol=1e-5) and recall(I, ids[live][rows]) > 0.99
    index.add(vectors[:100], ids[:100])  # a change rebuilds the searcher
    assert np.isin(index.search(vectors[:5], 1)[1][:, 0], ids[:5]).all()


def test_device_choice_errors():
    with pytest.raises(InvalidInputError, match="device"):
        VectorIndex(8, device="tpu")
    with pytest.raises(InvalidInputError, match="backend"):
        VectorIndex(8, backend="annoy")
    if not faiss_has_gpu() and not torch_cuda_available():
        with pytest.raises(InvalidInputError, match="GPU"):
            VectorIndex(8, device="cuda")
        assert VectorIndex(8, device="auto").backend == "faiss"


def test_blas_settings_follow_the_batch_size_at_any_thread_count():
    """BLAS forced from SMALL_BATCH queries on, whatever FAISS's thread count; FAISS's own scan below it, run on
    one thread for a Flat index without changing the caller's thread count (tools/bench_exact.py)."""
    vectors = clustered(200)
    index = VectorIndex.from_vectors(vectors, np.arange(200))
    threads = faiss.omp_get_max_threads()
    try:
        for count in (1, 2):
            faiss.omp_set_num_threads(count)
            D, I = index.search(vectors[:3], 2)
            assert faiss.cvar.distance_compute_blas_threshold == kernels.FAISS_BLAS_DEFAULT[0]
            assert I[:, 0].tolist() == [0, 1, 2] and faiss.omp_get_max_threads() == count
            index.search(vectors[: kernels.SMALL_BATCH], 2)
            assert faiss.cvar.distance_compute_blas_threshold == kernels.CPU_BLAS_THRESHOLD == 0
            assert faiss.cvar.distance_compute_blas_database_bs == kernels.CPU_BLAS_DATABASE_BS
    finally:
        faiss.omp_set_num_threads(threads)
