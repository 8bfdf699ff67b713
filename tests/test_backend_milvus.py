"""MilvusBackend (siamesedb/backends/milvus.py) on Milvus Lite: exactness against numpy brute force, label filters,
removal, persistence across reopening, the one-process-per-Lite-file error, and inputs refused before any write."""

from __future__ import annotations

import hashlib
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("pymilvus", reason="the Milvus backend needs pymilvus + milvus-lite: pip install siamesedb[milvus]")
pytest.importorskip("milvus_lite", reason="Milvus Lite tests need milvus-lite: pip install siamesedb[milvus]")

from siamesedb.backends import VectorBackend  # noqa: E402
from siamesedb.backends.milvus import MilvusBackend, label_filter  # noqa: E402
from siamesedb.errors import (  # noqa: E402
    CorruptIndexError,
    DimensionMismatchError,
    IndexLockedError,
    InvalidInputError,
)

ROOT = Path(__file__).resolve().parents[1]
OMNIGLOT_EVALUATION = ROOT.parent / "shared" / "data" / "omniglot" / "images_evaluation.zip"
DIM = 32
# Labels a filter expression must carry exactly: quotes, backslash, line breaks, tab, other controls, non-BMP.
AWKWARD_LABELS = [
    'say "hi"', "it's", "back\\slash", "two\nlines", "cr\rlf", "tab\there", "bell\x07", "𝔘nicode", "plain"
]


def clustered(n: int, dim: int = DIM, clusters: int = 9, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """(vectors (n, dim) float32 L2-normalised around `clusters` centres, cluster index (n,))."""
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((clusters, dim))
    which = rng.integers(0, clusters, n)
    vectors = centres[which] + 0.35 * rng.standard_normal((n, dim))
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    return vectors.astype(np.float32), which


def brute_force(queries: np.ndarray, vectors: np.ndarray, ids: np.ndarray, k: int, metric: str):
    """Exact (scores (nq, k), ids (nq, k)) in float64: inner product, or minus the Euclidean distance."""
    q, v = queries.astype(np.float64), vectors.astype(np.float64)
    if metric == "cosine":
        scores = q @ v.T
    else:
        scores = -np.sqrt(np.maximum((q**2).sum(1)[:, None] + (v**2).sum(1)[None] - 2 * q @ v.T, 0))
    order = np.argsort(-scores, axis=1, kind="stable")[:, :k]
    return np.take_along_axis(scores, order, 1), ids[order]


def assert_same_hits(D, I, D_exact, I_exact, tie: float = 1e-5) -> None:
    """Scores within 1e-5; ids equal wherever the exact ranking has no near-tie that could swap them."""
    np.testing.assert_allclose(D, D_exact, atol=1e-5, rtol=0)
    gaps = np.abs(np.diff(D_exact, axis=1))
    isolated = np.ones(D_exact.shape, dtype=bool)
    isolated[:, 1:] &= gaps > tie
    isolated[:, :-1] &= gaps > tie
    assert isolated.mean() > 0.9  # the check below must actually compare most ids
    np.testing.assert_array_equal(I[isolated], I_exact[isolated])


def fill(backend: MilvusBackend, vectors: np.ndarray, labels: list[str], first_id: int = 0) -> np.ndarray:
    ids = np.arange(first_id, first_id + len(vectors), dtype=np.int64)
    paths = [f"/data/{label}/{i}.png" for label, i in zip(labels, ids)]
    hashes = [hashlib.sha256(str(int(i)).encode()).hexdigest() for i in ids]
    backend.add(ids, labels, paths, hashes, vectors)
    return ids


@pytest.fixture
def lite(tmp_path):
    """Open MilvusBackends on Lite files in tmp_path; all closed at the end."""
    opened: list[MilvusBackend] = []

    def open_backend(name: str = "index.db", **kwargs) -> MilvusBackend:
        kwargs.setdefault("dimension", DIM)
        backend = MilvusBackend(tmp_path / name, kwargs.pop("collection", "items"), **kwargs)
        opened.append(backend)
        return backend

    yield open_backend
    for backend in opened:
        backend.close()


@pytest.mark.parametrize("metric", ["cosine", "euclidean"])
def test_flat_search_equals_numpy_brute_force(lite, metric):
    vectors, which = clustered(3000)
    labels = [AWKWARD_LABELS[c] for c in which]
    backend = lite(metric=metric)
    assert isinstance(backend, VectorBackend)
    ids = fill(backend, vectors, labels, first_id=1000)  # ids are the caller's, not positions
    queries, _ = clustered(40, seed=1)

    D, I = backend.search(queries, 10)
    assert D.dtype == np.float32 and I.dtype == np.int64 and D.shape == I.shape == (40, 10)
    assert_same_hits(D, I, *brute_force(queries, vectors, ids, 10, metric))
    assert (np.diff(D, axis=1) <= 1e-6).all()  # best first, higher = more similar

    # Filtered inside Milvus: k hits of the wanted labels (not k hits filtered down afterwards).
    wanted = ["two\nlines", 'say "hi"']
    keep = np.isin(np.asarray(labels, dtype=object), wanted)
    D, I = backend.search(queries, 10, labels=wanted)
    assert_same_hits(D, I, *brute_force(queries, vectors[keep], ids[keep], 10, metric))


def test_label_filter_carries_every_awkward_label_exactly(lite):
    vectors, which = clustered(900)
    labels = [AWKWARD_LABELS[c] for c in which]
    backend = lite()
    ids = fill(backend, vectors, labels)
    for label in AWKWARD_LABELS:
        expected = {int(i) for i, lab in zip(ids, labels) if lab == label}
        _, I = backend.search(vectors[:1], 900, labels=label)
        assert {int(i) for i in I[0] if i >= 0} == expected, repr(label)
    assert backend.label_counts() == {label: labels.count(label) for label in sorted(AWKWARD_LABELS)}
    assert label_filter([]) is None
    D, I = backend.search(vectors[:2], 3, labels=[])
    assert (I == -1).all() and np.isneginf(D).all()
    D, I = backend.search(vectors[:2], 3, labels="no such label")
    assert (I == -1).all() and np.isneginf(D).all()


def test_fewer_than_k_pads_with_minus_one_and_minus_inf(lite):
    backend = lite(metric="euclidean")
    vectors, _ = clustered(4)
    fill(backend, vectors, ["a"] * 4)
    D, I = backend.search(vectors, 6)
    assert (I[:, 4:] == -1).all() and np.isneginf(D[:, 4:]).all()
    assert (I[:, :4] >= 0).all() and np.isfinite(D[:, :4]).all()
    assert (D[:, 0] == 0).all()  # each query finds itself at distance 0 (score 0, not -0 or a squared distance)
    empty = lite("empty.db")
    D, I = empty.search(vectors, 3)
    assert (I == -1).all() and empty.count() == 0 and empty.label_counts() == {}


def test_remove_by_id_and_by_label_then_reopen_keeps_everything(lite, tmp_path):
    vectors, which = clustered(600)
    labels = [f"class{c}" for c in which]
    backend = lite()
    ids = fill(backend, vectors, labels, first_id=10)
    assert backend.count() == 600

    gone = ids[[0, 5, 7]]
    assert backend.remove(np.concatenate([gone, gone[:1], [999_999]])) == 3  # repeats and unknown ids ignored
    assert backend.remove(gone) == 0
    removed = backend.remove_label("class3")
    expected = np.sort(ids[(which == 3) & ~np.isin(ids, gone)])
    np.testing.assert_array_equal(removed, expected)
    assert len(backend.remove_label("class3")) == 0
    live = ~np.isin(ids, np.concatenate([gone, removed]))
    assert backend.count() == live.sum()
    counts = {f"class{c}": int(((which == c) & live).sum()) for c in range(9) if c != 3}
    assert backend.label_counts() == counts

    # Removed items never come back from a search, even as the exact match.
    _, I = backend.search(vectors[[0, 5]], 5)
    assert not np.isin(I, gone).any()
    D_before, I_before = backend.search(vectors[:20], 8)
    items_before = backend.items(ids[:30])
    first_live = int(np.flatnonzero(live)[0])
    assert items_before[0] is None and items_before[first_live].label == labels[first_live]
    assert items_before[first_live].path == f"/data/{labels[first_live]}/{ids[first_live]}.png"
    assert [item is not None for item in items_before] == live[:30].tolist()

    backend.close()
    backend.close()  # idempotent
    with pytest.raises(InvalidInputError, match="closed"):
        backend.count()
    reopened = lite()
    assert reopened.count() == live.sum()
    assert reopened.label_counts() == counts
    assert reopened.items(ids[:30]) == items_before
    held_ids, held_vectors = reopened.vectors()
    np.testing.assert_array_equal(held_ids, ids[live])
    np.testing.assert_array_equal(held_vectors, vectors[live])  # float32 round trip, bit for bit
    one_ids, one_vectors = reopened.vectors("class1")
    np.testing.assert_array_equal(one_ids, ids[live & (which == 1)])
    D_after, I_after = reopened.search(vectors[:20], 8)
    np.testing.assert_array_equal(I_after, I_before)
    np.testing.assert_array_equal(D_after, D_before)
    info = reopened.describe()
    assert info["backend"] == "milvus" and info["lite"] and info["count"] == live.sum()
    assert info["metric"] == "cosine" and info["milvus_metric"] == "IP" and info["consistency"] == "Strong"


def test_bad_inputs_are_refused_before_anything_is_written(lite):
    backend = lite()
    vectors, _ = clustered(5)
    ids = fill(backend, vectors, ["a"] * 5)
    good = dict(ids=np.arange(100, 103), labels=["b"] * 3, paths=["p"] * 3, hashes=["h"] * 3, vectors=vectors[:3])
    nan = vectors[:3].copy()
    nan[1, 4] = np.nan
    refusals = [
        (DimensionMismatchError, dict(vectors=np.ones((3, DIM + 1), np.float32))),
        (InvalidInputError, dict(vectors=nan)),
        (InvalidInputError, dict(vectors=np.full((3, DIM), np.inf, np.float32))),
        (InvalidInputError, dict(ids=np.array([100, 100, 101]))),  # repeated within the batch
        (InvalidInputError, dict(ids=np.array([100, 101, ids[2]]))),  # already held: Milvus would keep both
        (InvalidInputError, dict(ids=np.array([-1, 101, 102]))),
        (InvalidInputError, dict(ids=np.array([1.5, 2.5, 3.5]))),
        (InvalidInputError, dict(labels=["b", "", "b"])),
        (InvalidInputError, dict(labels=["b", "b"])),  # lengths differ
        (InvalidInputError, dict(paths=["p", "\udcff.png", "p"])),  # not UTF-8 (a name in another encoding)
        (InvalidInputError, dict(hashes=["h", "h", "x" * 129])),  # longer than the sha256 field holds
    ]
    for error, change in refusals:
        with pytest.raises(error):
            backend.add(**{**good, **change})
    assert backend.count() == 5 and backend.label_counts() == {"a": 5}

    with pytest.raises(DimensionMismatchError):
        backend.search(np.ones((1, DIM + 1), np.float32), 3)
    with pytest.raises(InvalidInputError):
        backend.search(nan, 3)
    for k in (0, 2.5, 20_000):
        with pytest.raises(InvalidInputError):
            backend.search(vectors[:1], k)
    with pytest.raises(InvalidInputError):
        backend.search(vectors[:1], 3, nprobe=0)
    backend.close()
    with pytest.raises(DimensionMismatchError, match="holds 32-d"):
        lite(dimension=16)
    with pytest.raises(CorruptIndexError, match="metric IP"):
        lite(metric="euclidean")
    with pytest.raises(InvalidInputError, match="must end in .db"):
        lite("index.sqlite")
    with pytest.raises(InvalidInputError, match="index type"):
        lite("other.db", index_type="IVF_PQ")


def test_approximate_index_types_take_per_query_parameters(lite):
    vectors, _ = clustered(2000)
    queries = vectors[:20]
    exact = brute_force(queries, vectors, np.arange(2000), 10, "cosine")[1]
    for index_type, params in (("IVF_FLAT", {"nprobe": 64}), ("HNSW", {"ef_search": 4})):  # ef < k is raised to k
        backend = lite(f"{index_type}.db", index_type=index_type)
        fill(backend, vectors, ["x"] * 2000)
        _, I = backend.search(queries, 10, **params)
        recall = np.mean([len(set(a) & set(b)) / 10 for a, b in zip(I, exact)])
        assert recall > 0.9, (index_type, recall)
        assert backend.describe()["index_type"] == index_type


def _run(code: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True, timeout=120, cwd=ROOT
    )


def test_a_second_process_is_told_one_process_per_lite_file(lite, tmp_path):
    holder = lite()
    fill(holder, clustered(3)[0], ["a"] * 3)
    code = f"""
        from siamesedb.backends.milvus import MilvusBackend
        from siamesedb.errors import SiameseDBError
        try:
            backend = MilvusBackend({str(tmp_path / "index.db")!r}, "items", {DIM})
            print("OPENED", backend.count())
        except SiameseDBError as exc:
            print(type(exc).__name__, exc)
    """
    second = _run(code)
    assert second.stdout.startswith("IndexLockedError"), second.stdout + second.stderr
    assert "one process at a time" in second.stdout and "Milvus server" in second.stdout
    assert len(second.stdout.strip().splitlines()) == 1 and second.stderr == ""  # one line, no traceback logged
    holder.close()
    third = _run(code)  # once the holder closes it, another process opens the file and sees what was written
    assert third.stdout.strip() == "OPENED 3", third.stdout + third.stderr


def test_backend_import_is_numpy_only_and_names_the_extra_when_pymilvus_is_missing(tmp_path):
    checked = _run(f"""
        import sys
        import numpy as np
        from siamesedb.backends.milvus import MilvusBackend
        backend = MilvusBackend({str(tmp_path / "t.db")!r}, "items", 4)
        backend.add(np.arange(2), ["a", "b"], ["p", "q"], ["h", "h"], np.eye(2, 4, dtype=np.float32))
        backend.search(np.eye(1, 4, dtype=np.float32), 1)
        backend.close()
        print("torch" in sys.modules)
    """)
    assert checked.stdout.strip() == "False", checked.stdout + checked.stderr  # torch was not imported
    assert checked.stderr == ""  # no log noise from pymilvus / Milvus Lite either
    missing = _run("""
        import sys
        sys.modules["pymilvus"] = None  # as if not installed
        from siamesedb.backends.milvus import MilvusBackend
        from siamesedb.errors import InvalidInputError
        try:
            MilvusBackend("x.db", "items", 4)
        except InvalidInputError as exc:
            print(exc)
    """)
    assert "pip install siamesedb[milvus]" in missing.stdout, missing.stdout + missing.stderr


@pytest.mark.skipif(not OMNIGLOT_EVALUATION.exists(), reason=f"{OMNIGLOT_EVALUATION} not present (real data absent)")
def test_real_omniglot_vectors_match_brute_force(lite):
    from siamesedb import datasets
    from siamesedb.encoder import Encoder

    root = datasets.omniglot("evaluation", source=OMNIGLOT_EVALUATION)
    characters = sorted(p for p in (root / "Atlantean").iterdir() if p.is_dir())[:8]
    paths = [png for character in characters for png in sorted(character.glob("*.png"))]  # 8 x 20 drawers
    labels = [f"Atlantean/{png.parent.name}" for png in paths]
    vectors = Encoder.load("default").encode([str(p) for p in paths])  # (160, D) float32, L2-normalised
    backend = lite("omniglot.db", collection="omniglot", dimension=vectors.shape[1])
    ids = np.arange(len(paths), dtype=np.int64)
    hashes = [hashlib.sha256(p.read_bytes()).hexdigest() for p in paths]
    backend.add(ids, labels, [str(p) for p in paths], hashes, vectors)
    D, I = backend.search(vectors, 5)
    assert_same_hits(D, I, *brute_force(vectors, vectors, ids, 5, "cosine"))
    _, I = backend.search(vectors[:3], 20, labels=labels[0])
    assert sorted(I[0].tolist()) == list(range(20))  # the 20 drawings of the first character, and only them
    assert backend.items([0])[0].sha256 == hashes[0]
