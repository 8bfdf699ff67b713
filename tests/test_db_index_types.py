"""SiameseDB over every index type: add_vectors / search / classify / remove / reopen, training that waits for enough
vectors, HNSW tombstones on disk, `auto`, reindex, the torch search backend, and the CLI's --factory auto,
--nprobe, --ef-search and reindex."""

from __future__ import annotations

import json

import numpy as np
import pytest
from click.testing import CliRunner
from PIL import Image, ImageDraw

import siamesedb.backends.faiss.tombstones as tombstones_module
from siamesedb.cli import cli
from siamesedb.db import VECTORS_FILE, SiameseDB
from siamesedb.errors import InvalidInputError
from siamesedb.scoring import brute_force_search, normalize


pytestmark = pytest.mark.usefixtures("one_faiss_thread")  # tests/conftest.py


def collection(n=400, classes=20, d=16, seed=0):
    """Class-clustered unit vectors and their labels: each class a blob around its own random centre."""
    rng = np.random.default_rng(seed)
    centres = normalize(rng.normal(size=(classes, d)))
    which = rng.integers(0, classes, n)
    vectors = normalize(centres[which] + 0.4 / np.sqrt(d) * rng.normal(size=(n, d)))
    return vectors, [f"class{c:02d}" for c in which]


def exact_ids(db: SiameseDB, queries: np.ndarray, k: int) -> np.ndarray:
    ids, corpus = db.store.vectors()
    _, rows = brute_force_search(queries, corpus, k)
    return np.where(rows >= 0, ids[np.maximum(rows, 0)], -1)


def found_ids(db: SiameseDB, queries: np.ndarray, k: int, **params) -> np.ndarray:
    return np.array([[hit.id for hit in hits] for hits in db.search_vectors(queries, k, **params)])


@pytest.mark.parametrize("factory, params", [("Flat", {}), ("IVF8,Flat", {"nprobe": 8}), ("HNSW8", {"ef_search": 64}),
                                             ("IVF8,PQ4x4", {"nprobe": 8})])
def test_every_type_through_the_db(factory, params, encoder, tmp_path):
    vectors, labels = collection()
    db = SiameseDB.create(tmp_path / "i", encoder=encoder, factory=factory)
    ids = db.add_vectors(vectors, labels)
    assert db.index.is_trained and db.index.ntotal == len(vectors) and db.info()["factory"] == factory
    queries = vectors[:30]
    got = found_ids(db, queries, 5, **params)
    agree = np.mean([len(set(a) & set(b)) / 5 for a, b in zip(got, exact_ids(db, queries, 5))])
    assert agree >= (0.25 if "PQ" in factory else 0.95)  # 2-byte PQ codes: lossy by design (chance 0.0125)
    prediction = db.classify_vectors(queries[:3], method="knn", k=5, **params)
    assert len(prediction) == 3 and all(p.label.startswith("class") for p in prediction)
    gone = [int(i) for i in ids[:10]]
    assert db.remove(ids=gone) == 10
    assert db.remove(label="class03") == labels.count("class03") - sum(lab == "class03" for lab in labels[:10])
    assert len(db) == db.index.ntotal
    after = found_ids(db, queries, 5, **params)
    assert not np.isin(after, gone).any()
    assert "class03" not in {hit.label for hits in db.search_vectors(queries, 5, **params) for hit in hits}
    db.close()
    with SiameseDB.open(tmp_path / "i") as again:
        assert again.index.factory == factory and again.index.ntotal == len(again)
        assert np.array_equal(found_ids(again, queries, 5, **params), after)


def test_training_waits_for_enough_vectors_and_search_stays_exact(encoder, tmp_path):
    vectors, labels = collection(600)
    db = SiameseDB.create(tmp_path / "i", encoder=encoder, factory="IVF32,Flat")
    db.add_vectors(vectors[:10], labels[:10])  # 10 vectors cannot train 32 lists
    assert not db.index.is_trained and len(db) == 10
    assert np.array_equal(found_ids(db, vectors[:5], 3), exact_ids(db, vectors[:5], 3))  # exact over the store
    assert db.classify_vectors(vectors[:2], method="knn", k=3)[0].label == labels[0]
    db.add_vectors(vectors[10:], labels[10:])
    assert db.index.is_trained and db.index.ntotal == 600  # trained on everything stored, then filled
    assert np.array_equal(found_ids(db, vectors[:5], 3, nprobe=32), exact_ids(db, vectors[:5], 3))
    db.close()


def test_hnsw_tombstones_survive_a_reopen_until_reindex(encoder, tmp_path, monkeypatch):
    monkeypatch.setattr(tombstones_module, "COMPACT_BELOW", 0)  # act like a large graph: keep tombstones
    monkeypatch.setattr(tombstones_module, "COMPACT_FRACTION", 1.0)
    vectors, labels = collection()
    db = SiameseDB.create(tmp_path / "i", encoder=encoder, factory="HNSW8")
    ids = db.add_vectors(vectors, labels)
    db.remove(ids=ids[:5].tolist())
    assert db.index.removed_pending == 5 and db.info()["removed_pending"] == 5
    assert (tmp_path / "i" / (VECTORS_FILE + ".removed.npy")).exists()
    db.close()
    with SiameseDB.open(tmp_path / "i") as again:
        assert again.index.removed_pending == 5 and again.index.ntotal == len(again) == 395
        assert not np.isin(found_ids(again, vectors[:5], 3, ef_search=64), ids[:5]).any()
        assert again.reindex() == "HNSW8"
        assert again.index.removed_pending == 0
        assert not (tmp_path / "i" / (VECTORS_FILE + ".removed.npy")).exists()
    monkeypatch.setattr(tombstones_module, "COMPACT_BELOW", 10_000)
    with SiameseDB.open(tmp_path / "i") as small:
        small.remove(ids=[int(ids[5])])  # a small graph is rebuilt from the store at once
        assert small.index.removed_pending == 0 and small.index.ntotal == 394


def test_auto_factory_and_reindex(encoder, tmp_path):
    vectors, labels = collection()
    small = SiameseDB.create(tmp_path / "a", encoder=encoder, factory="auto", expected_items=len(vectors))
    assert small.manifest["factory"] == "Flat" and small.manifest["factory_requested"] == "auto"
    big = SiameseDB.create(tmp_path / "b", encoder=encoder, factory="auto", expected_items=50_000)
    assert big.manifest["factory"] == "HNSW32" and big.index.search_defaults == {"ef_search": 64}
    big.add_vectors(vectors, labels)
    big.close()
    (tmp_path / "b" / VECTORS_FILE).unlink()  # derived: rebuilt from the store, search defaults from the manifest
    with SiameseDB.open(tmp_path / "b") as again:
        assert again.index.factory == "HNSW32" and again.index.search_defaults == {"ef_search": 64}
        assert again.set_search_defaults(ef_search=100) == {"ef_search": 100}
    with SiameseDB.open(tmp_path / "b") as again:
        assert again.index.search_defaults == {"ef_search": 100}
        assert again.reindex("auto") == "Flat"  # 400 items today: exact search
        assert again.info()["factory"] == "Flat" and again.index.ntotal == 400
        with pytest.raises(InvalidInputError, match="factory"):
            again.reindex("NotAFactory")
        assert again.info()["factory"] == "Flat"  # a bad type changed nothing


def test_torch_search_backend_gives_the_faiss_answers(encoder, tmp_path):
    vectors, labels = collection()
    with SiameseDB.create(tmp_path / "i", encoder=encoder) as db:
        db.add_vectors(vectors, labels)
        expected = db.search_vectors(vectors[:20], 5)
    with SiameseDB.open(tmp_path / "i", search_backend="torch") as db:
        assert db.index.backend == "torch"
        got = db.search_vectors(vectors[:20], 5)
    for a, b in zip(got, expected):
        assert [h.id for h in a] == [h.id for h in b]
        assert np.allclose([h.score for h in a], [h.score for h in b], atol=1e-5)


def test_cli_factory_auto_nprobe_ef_search_and_reindex(encoder_dir, tmp_path):
    root = tmp_path / "shapes"
    for kind in range(3):
        (root / f"c{kind}").mkdir(parents=True)
        for v in range(4):
            image = Image.new("L", (28, 28), 255)
            ImageDraw.Draw(image).ellipse((2 + v, 2 + kind * 3, 20 + v, 24), outline=0, width=2 + kind)
            image.save(root / f"c{kind}" / f"{v}.png")
    runner = CliRunner()

    def run(*args):
        return runner.invoke(cli, [str(a) for a in args])

    result = run("build", root, "--index", tmp_path / "auto", "--encoder", encoder_dir, "--factory", "auto", "--json")
    assert result.exit_code == 0, result.output
    info = json.loads(run("info", "--index", tmp_path / "auto", "--json").output)
    assert info["factory"] == "Flat" and info["items"] == 12
    bad = run("query", root / "c0" / "0.png", "--index", tmp_path / "auto", "--nprobe", "4")
    assert bad.exit_code == 1 and "nprobe applies to IVF" in bad.output and "Traceback" not in bad.output
    assert run("build", root, "--index", tmp_path / "ivf", "--encoder", encoder_dir, "--factory", "IVF4,Flat").exit_code == 0
    result = run("query", root / "c1" / "2.png", "--index", tmp_path / "ivf", "--nprobe", "4", "-k", "3", "--json")
    assert result.exit_code == 0, result.output
    assert json.loads(result.output)[0]["hits"][0]["path"] == str(root / "c1" / "2.png")
    result = run("classify", root / "c1" / "2.png", "--index", tmp_path / "ivf", "--method", "knn", "--nprobe", "2")
    assert result.exit_code == 0, result.output
    result = run("reindex", "--index", tmp_path / "ivf", "--factory", "HNSW8", "--json")
    assert result.exit_code == 0 and json.loads(result.output)["factory"] == "HNSW8"
    result = run("query", root / "c2" / "1.png", "--index", tmp_path / "ivf", "--ef-search", "32", "--json")
    assert result.exit_code == 0 and json.loads(result.output)[0]["hits"][0]["path"] == str(root / "c2" / "1.png")
    assert run("query", root / "c2" / "1.png", "--index", tmp_path / "ivf", "--nprobe", "0").exit_code == 2  # click
