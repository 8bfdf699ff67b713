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
    IndexNotFoundError,
    InvalidInputError,
)

from helpers import OMNIGLOT_EVALUATION, needs  # noqa: E402 - tests/helpers.py

ROOT = Path(__file__).resolve().parents[1]
DIM = 32
# Labels a filter expression must carry exactly: quotes, backslash, line breaks, tab, other controls, non-BMP.
AWKWARD_LABELS = [
    # Valid under the label rule (README "Labels": no control characters, backslashes or path tricks) but
    # awkward for a filter expression: quotes, apostrophes, Milvus's operators and wildcards, other scripts.
    'say "hi"', "it's", "a/b", "semi;colon", "per%cent_", "a..b", "spaces  two", "𝔘nicode", "plain"
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


def test_k_beyond_the_collection_returns_what_there_is(lite):
    backend = lite(metric="euclidean")
    vectors, _ = clustered(4)
    fill(backend, vectors, ["a"] * 4)
    D, I = backend.search(vectors, 6)
    assert I.shape == D.shape == (4, 4)  # rows as wide as what is held (VectorBackend: min(k, held))
    assert (I >= 0).all() and np.isfinite(D).all()
    assert (D[:, 0] == 0).all()  # each query finds itself at distance 0 (score 0, not -0 or a squared distance)
    empty = lite("empty.db")
    D, I = empty.search(vectors, 3)
    assert I.shape == (4, 0) and empty.count() == 0 and empty.label_counts() == {}


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
    for k in (0, 2.5, None):
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
    with pytest.raises(IndexNotFoundError, match="no Milvus collection 'elsewhere'"):
        lite(collection="elsewhere", must_exist=True)


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
        import numpy as np
        from siamesedb.backends.milvus import MilvusBackend
        from siamesedb.errors import SiameseDBError
        try:
            backend = MilvusBackend({str(tmp_path / "index.db")!r}, "items", {DIM})
            fresh = backend.add(None, ["b"], ["q"], ["h"], np.ones((1, {DIM}), np.float32))
            print("OPENED", backend.count(), backend.version, fresh.tolist())
        except SiameseDBError as exc:
            print(type(exc).__name__, exc)
    """
    second = _run(code)
    assert second.stdout.startswith("IndexLockedError"), second.stdout + second.stderr
    assert "one process at a time" in second.stdout and "Milvus server" in second.stdout
    assert len(second.stdout.strip().splitlines()) == 1 and second.stderr == ""  # one line, no traceback logged
    assert holder.remove([2]) == 1  # version 3 (the add's STORED + WRITE log rows, the remove's WRITE), ids to 3
    holder.close()
    third = _run(code)  # once the holder closes it, another process opens the file and sees what was written
    # Id 2 is not handed out again; the add moved the version by two (its claim, then its WRITE row).
    assert third.stdout.strip() == "OPENED 3 5 [3]", third.stdout + third.stderr


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


@needs(OMNIGLOT_EVALUATION)
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


# ---------------------------------------------------------------- the full protocol, against the SQLite store


def _twin_items(n: int = 150, seed: int = 3) -> tuple[list[str], list[str], list[str], np.ndarray]:
    """Items with the awkward cases: (label, hash) held twice, (label, path) held twice, paths that a reroot of
    /data/a must and must not touch (/data/ab, a backslash path, the folder itself)."""
    vectors, which = clustered(n, seed=seed)
    labels = [AWKWARD_LABELS[c] for c in which]
    folders = ["/data/a", "/data/ab", "/data/a/sub", "C:\\data\\a", "/other"]
    paths = [f"{folders[i % len(folders)]}/{i}.png" for i in range(n)]
    hashes = [hashlib.sha256(str(i % (n - 10)).encode()).hexdigest() for i in range(n)]  # last 10 repeat 0..9
    labels[n - 10 : n] = labels[:10]  # ... under the same labels: (label, hash) held twice
    paths[5], labels[5] = "/data/a", labels[4]  # the folder itself as a path
    paths[6], labels[6] = paths[4], labels[4]  # (label, path) held twice, with another hash
    return labels, paths, hashes, vectors


def _same_reads(backend: MilvusBackend, store, probe: np.ndarray) -> None:
    """Every read of the protocol gives the SQLite store's answer."""
    assert backend.count() == store.count() and backend.label_counts() == store.label_counts()
    assert backend.items(probe) == store.items(probe)
    assert backend.labels_and_paths(probe) == store.labels_and_paths(probe)
    assert backend.labels_of(probe) == store.labels_of(probe)
    assert backend.known_label_hashes() == store.known_label_hashes()
    assert backend.label_path_hashes() == store.label_path_hashes()
    for columns, chunk in (("label, vector", 65536), ("sha256", 7), ("path, label, vector, sha256", 64)):
        ours, theirs = list(backend.iter_rows(columns, chunk)), list(store.iter_rows(columns, chunk))
        assert [len(ids) for ids, _ in ours] == [len(ids) for ids, _ in theirs]  # the same chunking
        assert all(ids.dtype == np.int64 for ids, _ in ours)
        np.testing.assert_array_equal(np.concatenate([i for i, _ in ours]), np.concatenate([i for i, _ in theirs]))
        assert [row for _, rows in ours for row in rows] == [row for _, rows in theirs for row in rows]
    ids, vectors = backend.vectors()
    held, expected = store.vectors()
    np.testing.assert_array_equal(ids, held)
    np.testing.assert_array_equal(vectors, expected)


def test_every_read_and_write_answers_as_the_sqlite_store(lite, tmp_path):
    from siamesedb.backends.faiss.store import ItemStore

    labels, paths, hashes, vectors = _twin_items()
    backend, store = lite(), ItemStore(tmp_path / "items.sqlite", dim=DIM)
    try:
        versions = [backend.version]
        assert len(backend.add(None, [], [], [], np.empty((0, DIM), np.float32))) == 0
        ids = backend.add(None, labels, paths, hashes, vectors)
        assert ids.dtype == np.int64
        np.testing.assert_array_equal(ids, store.add(labels, paths, hashes, vectors))  # 1..n, ascending
        versions.append(backend.version)
        probe = np.array([ids[3], -1, ids[0], 10**9, ids[3], ids[-1]])  # order, repeats, search padding, unknown
        _same_reads(backend, store, probe)

        pairs = [(labels[0], hashes[0]), (labels[-1], hashes[-1]), (labels[1], hashes[0]), ("nope", hashes[2]),
                 ("\udcff", hashes[0]), (labels[0], hashes[0])]
        found = backend.ids_by_label_hash(pairs)
        assert found == store.ids_by_label_hash(pairs)
        assert found[(labels[-1], hashes[-1])] == ids[9]  # held twice (ids 10 and n): the lowest id

        assert backend.remove(np.array([ids[1], ids[1], -1, 10**9])) == store.remove_ids([ids[1], -1, 10**9]) == 1
        versions.append(backend.version)
        assert backend.remove([10**9]) == 0 and backend.version == versions[-1]  # nothing removed: no move
        np.testing.assert_array_equal(backend.remove_label(labels[2]), store.remove_label(labels[2]))
        versions.append(backend.version)
        assert len(backend.remove_label("no such label")) == 0 and backend.version == versions[-1]
        # Fresh ids after removals: above every id ever handed out, in both.
        more = backend.add(None, labels[:3], paths[:3], hashes[:3], vectors[:3])
        np.testing.assert_array_equal(more, store.add(labels[:3], paths[:3], hashes[:3], vectors[:3]))
        assert more[0] == ids[-1] + 1
        versions.append(backend.version)

        reroots = (("/data/a/", "/mnt/x"), ("C:\\data", "D:\\d"), ("/nowhere", "/x"), ("/data/ab", "/y/"))
        for (old, new), expected in zip(reroots, (True, True, False, True)):
            before = backend.version
            changed = backend.reroot_paths(old, new)
            assert changed == store.reroot_paths(old, new) and (changed > 0) == expected, (old, new)
            assert (backend.version > before) == expected
        assert backend.labels_and_paths(ids[4:7])[ids[5]] == (labels[5], "/mnt/x")  # the folder itself
        assert backend.labels_and_paths(ids[:5])[ids[0]][1] == "/mnt/x/0.png"  # not /data/ab/..., nor C:\\...
        every = np.concatenate([ids, more, [-1]])
        _same_reads(backend, store, every)  # vectors, labels and hashes untouched by the reroot, bit for bit
        assert versions == sorted(set(versions))  # every write moved it
    finally:
        store.close()


def test_ids_are_never_reused_and_the_version_survives_reopening(lite):
    def add(handle, n=1, ids=None):
        vectors, _ = clustered(n, seed=n)
        return handle.add(ids, ["a"] * n, ["p"] * n, ["h"] * n, vectors)

    first = lite()
    np.testing.assert_array_equal(add(first, 5), [1, 2, 3, 4, 5])
    assert first.remove([4, 5]) == 2
    np.testing.assert_array_equal(add(first), [6])  # not 4: a removed id never comes back
    np.testing.assert_array_equal(add(first, 2, ids=np.array([100, 4])), [100, 4])  # an import may name ids
    second = lite()  # another handle on the same collection: the same mark and version
    assert second.version == first.version
    np.testing.assert_array_equal(add(second), [101])
    assert first.version == second.version
    np.testing.assert_array_equal(add(first), [102])
    assert first.remove([101, 102]) == 2
    version = first.version
    first.close()
    second.close()

    reopened = lite()
    assert reopened.version == version
    np.testing.assert_array_equal(add(reopened), [103])
    assert reopened.version == version + 2  # its claim, then its WRITE row
    with reopened.snapshot():  # a no-op on Milvus, but a context manager as the protocol says
        assert reopened.count() == 7  # 1 2 3 4 6 100 103
    # A collection made before the id record existed: its mark starts at the highest id held.
    for name in reopened.side_collections():  # the meta record and the log came later
        reopened._call("drop_collection", name)
    reopened.close()
    legacy = lite()
    assert legacy.version == 0
    np.testing.assert_array_equal(add(legacy), [104])


def test_search_defaults_are_held_by_the_handle_and_used_by_searches(lite):
    flat = lite("knobs.db", collection="flat")
    assert flat.search_defaults == {} and flat.describe()["search_defaults"] == {}
    with pytest.raises(InvalidInputError, match="nprobe applies to"):
        flat.set_search_defaults(nprobe=4)
    ivf = lite("knobs.db", collection="ivf", index_type="IVF_FLAT", build_params={"nlist": 16})
    assert ivf.search_defaults == {"nprobe": 16}
    ivf.set_search_defaults(nprobe=2)
    ivf.set_search_defaults()  # None: leave as is
    assert ivf.search_defaults == {"nprobe": 2}
    with pytest.raises(InvalidInputError, match="ef_search applies to"):
        ivf.set_search_defaults(ef_search=10)
    with pytest.raises(InvalidInputError):
        ivf.set_search_defaults(nprobe=0)
    hnsw = lite("knobs.db", collection="hnsw", index_type="HNSW", search_defaults={"ef_search": 40, "nprobe": 3})
    assert hnsw.search_defaults == {"ef_search": 40}  # a knob HNSW does not take is dropped at open
    searched = []
    hnsw._search_params = lambda k, nprobe, ef_search: searched.append((nprobe, ef_search)) or {}
    hnsw.add(None, ["a"], ["p"], ["h"], clustered(1)[0])
    hnsw.search(clustered(1)[0], 1)
    hnsw.search(clustered(1)[0], 1, ef_search=90)
    assert searched == [(None, 40), (None, 90)]  # the handle's default, unless the call names one


def test_a_short_index_sidecar_left_by_a_kill_is_rebuilt_on_open(lite, tmp_path):
    """Milvus Lite writes each segment's index file in place; a process killed mid-write leaves a short file that
    made every later open fail ("No data left in file", tools/torture.py: 1 trial in 200). Opening drops the
    collection's derived sidecars and loads again: every row comes back, searches answer as before."""
    backend = lite()
    vectors, which = clustered(300)
    ids = fill(backend, vectors, [f"c{w}" for w in which])
    expected = backend.search(vectors[:5], 5)
    uri = backend.uri
    backend.close()
    sidecars = sorted(Path(uri).glob("collections/*/partitions/*/indexes/*.idx"))
    assert sidecars, "Milvus Lite wrote no index sidecar to damage"
    for sidecar in sidecars:
        sidecar.write_bytes(sidecar.read_bytes()[:20])  # what a kill during the write leaves: a short file
    with MilvusBackend(uri, "items", DIM) as reopened:
        assert reopened.count() == len(ids)
        D, I = reopened.search(vectors[:5], 5)
        np.testing.assert_array_equal(I, expected[1])
        np.testing.assert_allclose(D, expected[0], atol=1e-6)
