"""Ingestion and scale: resumable builds, bring-your-own vectors, export / import round trips, classification at scale
checked against slow explicit loops."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
from click.testing import CliRunner
from PIL import Image, ImageDraw

import siamesedb.data as data_module
from siamesedb.cli import cli
from siamesedb.db import SiameseDB
from siamesedb.encoder import Encoder
from siamesedb.errors import (
    DimensionMismatchError,
    EncoderMismatchError,
    ExportFormatError,
    InvalidInputError,
    UnknownLabelError,
)
from siamesedb.export import read_export, read_metadata, sidecar_of

from helpers import save_tiny_encoder  # tests/helpers.py

DIM = 16


@pytest.fixture(scope="module")
def other_encoder(tmp_path_factory) -> Encoder:
    """A second tiny encoder, seeded apart from the shared `encoder`: same shapes, other weights."""
    return Encoder.load(save_tiny_encoder(tmp_path_factory.mktemp("enc2"), seed=1))


def shapes(root, classes=3, per_class=5):
    for c in range(classes):
        (root / f"c{c}").mkdir(parents=True, exist_ok=True)
        for v in range(per_class):
            image = Image.new("L", (32, 32), 255)
            ImageDraw.Draw(image).rectangle((2 + v, 3 + c * 3, 20 + v, 28 - c), outline=0, width=2)
            image.save(root / f"c{c}" / f"{v}.png")
    return root


def clustered(n_classes: int, per_class: int, dim: int = DIM, seed: int = 0):
    rng = np.random.default_rng(seed)
    centers = rng.standard_normal((n_classes, dim)).astype(np.float32)
    codes = np.repeat(np.arange(n_classes), per_class)
    rng.shuffle(codes)
    vectors = centers[codes] + 0.5 * rng.standard_normal((len(codes), dim)).astype(np.float32)
    return vectors, [f"class{c:04d}" for c in codes]


# ---------------------------------------------------------------------------------------------- resumable builds


def test_a_second_build_adds_nothing_and_decodes_nothing(tmp_path, encoder, monkeypatch):
    folder = shapes(tmp_path / "shapes")
    first = SiameseDB.build(folder, path=tmp_path / "index", encoder=encoder, workers=0)
    assert first.last_report.added == 15
    # The pipeline's vectors are the encoder's own, file by file.
    ids, stored = first.store.vectors()
    paths = [item.path for item in first.store.items(ids)]
    np.testing.assert_allclose(stored, encoder.encode(paths), rtol=0, atol=1e-6)
    first.close()

    decoded = []
    real = data_module.load_image
    monkeypatch.setattr(data_module, "load_image", lambda source, *rest: decoded.append(source) or real(source, *rest))
    again = SiameseDB.build(folder, path=tmp_path / "index", encoder=encoder, workers=0)
    assert (again.last_report.added, again.last_report.already_indexed, len(again)) == (0, 15, 15)
    assert decoded == []  # held files are read and hashed, never decoded again
    again.close()

    # A copy of a held file under the same label is the same content: not stored twice. A changed file is new.
    shutil.copyfile(folder / "c0" / "0.png", folder / "c0" / "copy.png")
    Image.new("L", (32, 32), 0).save(folder / "c1" / "0.png")
    third = SiameseDB.build(folder, path=tmp_path / "index", encoder=encoder, workers=0)
    assert (third.last_report.added, third.last_report.already_indexed, len(third)) == (1, 15, 16)
    assert len(decoded) == 2  # the copy (then recognised by its hash) and the changed file
    third.close()


def test_build_with_a_decoding_worker_matches_the_in_process_build(tmp_path, encoder):
    folder = shapes(tmp_path / "shapes", classes=4, per_class=6)
    (folder / "c0" / "broken.png").write_bytes(b"not a png")
    serial = SiameseDB.build(folder, path=tmp_path / "serial", encoder=encoder, workers=0, batch_size=5)
    pooled = SiameseDB.build(folder, path=tmp_path / "pooled", encoder=encoder, workers=1, batch_size=5)
    for db in (serial, pooled):
        assert db.last_report.added == 24 and [p for p, _ in db.last_report.skipped] == [str(folder / "c0" / "broken.png")]
    a, b = serial.store.vectors(), pooled.store.vectors()
    np.testing.assert_array_equal(a[0], b[0])
    np.testing.assert_allclose(a[1], b[1], rtol=0, atol=1e-6)
    assert serial.store.all_labels()[1] == pooled.store.all_labels()[1]
    again = SiameseDB.build(folder, path=tmp_path / "pooled", encoder=encoder, workers=1, batch_size=5)
    assert again.last_report.added == 0 and again.last_report.already_indexed == 24
    for db in (serial, pooled, again):
        db.close()


# ---------------------------------------------------------------------------------------------- bring your own vectors


def test_add_vectors_takes_optional_paths_hashes_and_ids_and_refuses_bad_rows(tmp_path, encoder):
    db = SiameseDB.create(tmp_path / "index", encoder=encoder)
    vectors, labels = clustered(4, 3)
    bad = vectors.copy()
    bad[5] = np.inf
    with pytest.raises(InvalidInputError, match="vector 5 contains NaN or infinity"):
        db.add_vectors(bad, labels)
    bad[5] = 0.0
    with pytest.raises(InvalidInputError, match="vector 5 is all zeros"):
        db.add_vectors(bad, labels)
    with pytest.raises(InvalidInputError, match="12 vectors but 2 paths"):
        db.add_vectors(vectors, labels, paths=["a", "b"])
    with pytest.raises(DimensionMismatchError):
        db.add_vectors(vectors[:, :8], labels)
    assert len(db) == 0  # every refusal came before anything was stored
    ids = db.add_vectors(vectors, labels, paths=[f"p{i}" for i in range(12)], hashes=[f"h{i}" for i in range(12)],
                         ids=np.arange(100, 112))
    assert ids.tolist() == list(range(100, 112))
    items = db.store.items([100, 111])
    assert (items[0].path, items[0].sha256, items[1].label) == ("p0", "h0", labels[11])
    np.testing.assert_allclose(db.store.vectors()[1], vectors / np.linalg.norm(vectors, axis=1, keepdims=True),
                               atol=1e-6)
    with pytest.raises(InvalidInputError, match="already in use"):
        db.add_vectors(vectors[:1], labels[:1], ids=[105])
    more = db.add_vectors(vectors[:2], labels[:2])  # fresh ids continue above every id in use
    assert more.min() > 111
    db.close()
    with SiameseDB.open(tmp_path / "index") as reopened:
        assert len(reopened) == 14 and reopened.index.ntotal == 14


# ---------------------------------------------------------------------------------------------- export / import


@pytest.fixture()
def filled(tmp_path, encoder):
    db = SiameseDB.build(shapes(tmp_path / "shapes"), path=tmp_path / "index", encoder=encoder, workers=0)
    db.remove(ids=[3])  # ids need not be contiguous: the export keeps them as they are
    yield db
    db.close()


@pytest.mark.parametrize("suffix", [".parquet", ".npy"])
def test_export_import_round_trip_keeps_ids_labels_vectors_and_fingerprint(filled, encoder, tmp_path, suffix):
    target = tmp_path / f"out{suffix}"
    metadata = filled.export_vectors(target)
    assert metadata["count"] == 14 and metadata["encoder"]["fingerprint"] == encoder.fingerprint
    if suffix == ".npy":
        assert sidecar_of(target).is_file() and np.load(target).shape == (14, DIM)
    exported = read_export(target)
    assert read_metadata(target) == exported.metadata
    ids, vectors = filled.store.vectors()
    items = filled.store.items(ids)
    np.testing.assert_array_equal(exported.ids, ids)
    np.testing.assert_array_equal(exported.vectors, vectors)
    assert exported.labels == [i.label for i in items] and exported.paths == [i.path for i in items]
    assert exported.hashes == [i.sha256 for i in items]
    assert exported.metadata["encoder"]["fingerprint"] == encoder.fingerprint

    copy = SiameseDB.create(tmp_path / "copy", encoder=encoder)
    result = copy.import_vectors(target)
    assert (result["added"], result["already_indexed"]) == (14, 0)
    copy_ids, copy_vectors = copy.store.vectors()
    np.testing.assert_array_equal(copy_ids, ids)
    np.testing.assert_array_equal(copy_vectors, vectors)
    assert [i.sha256 for i in copy.store.items(copy_ids)] == [i.sha256 for i in items]
    assert copy.import_vectors(target)["added"] == 0  # importing twice adds nothing
    probe = vectors[:3]
    assert [h.id for h in copy.search_vectors(probe, 3)[0]] == [h.id for h in filled.search_vectors(probe, 3)[0]]
    copy.close()


def test_import_refuses_another_encoder_and_taken_ids(filled, other_encoder, encoder, tmp_path):
    target = tmp_path / "out.parquet"
    filled.export_vectors(target)
    foreign = SiameseDB.create(tmp_path / "foreign", encoder=other_encoder)
    with pytest.raises(EncoderMismatchError, match="force"):
        foreign.import_vectors(target)
    assert len(foreign) == 0
    assert foreign.import_vectors(target, force=True)["forced"] is True
    assert len(foreign) == 14
    foreign.close()

    busy = SiameseDB.create(tmp_path / "busy", encoder=encoder)
    busy.add_vectors(np.eye(DIM, dtype=np.float32)[:3], ["x", "y", "z"])  # ids 1..3, the export holds 1, 2
    with pytest.raises(InvalidInputError, match="renumber"):
        busy.import_vectors(target)
    assert len(busy) == 3
    assert busy.import_vectors(target, renumber=True)["added"] == 14 and len(busy) == 17
    busy.close()


def test_unreadable_exports_are_named(tmp_path, filled):
    with pytest.raises(InvalidInputError, match="parquet or .npy"):
        filled.export_vectors(tmp_path / "out.csv")
    (tmp_path / "junk.parquet").write_bytes(b"PAR1 nope")
    with pytest.raises(ExportFormatError, match="junk.parquet"):
        read_export(tmp_path / "junk.parquet")
    np.save(tmp_path / "alone.npy", np.zeros((2, DIM), np.float32))
    with pytest.raises(ExportFormatError, match="alone.json: missing"):
        read_export(tmp_path / "alone.npy")
    filled.export_vectors(tmp_path / "cut.npy")
    sidecar = json.loads(sidecar_of(tmp_path / "cut.npy").read_text())
    sidecar["items"]["label"].pop()
    sidecar_of(tmp_path / "cut.npy").write_text(json.dumps(sidecar))
    with pytest.raises(ExportFormatError, match="cut.npy: columns disagree"):
        read_export(tmp_path / "cut.npy")


def test_cli_export_and_import(filled, tmp_path, encoder):
    runner = CliRunner()
    target = tmp_path / "out.npy"
    result = runner.invoke(cli, ["export", "--index", str(filled.path), "--to", str(target), "--json"])
    assert result.exit_code == 0, result.output
    assert json.loads(result.output)["count"] == 14
    enc_dir = tmp_path / "encoder-copy"
    encoder.save(enc_dir)
    result = runner.invoke(cli, ["import", str(target), "--index", str(tmp_path / "new"), "--encoder", str(enc_dir),
                                 "--json"])
    assert result.exit_code == 0, result.output
    assert json.loads(result.output)["added"] == 14
    # A new index with another encoder is refused before anything is created.
    result = runner.invoke(cli, ["import", str(target), "--index", str(tmp_path / "other")])
    assert result.exit_code == 1 and "pass the right --encoder" in result.output
    assert not (tmp_path / "other").exists()


# ---------------------------------------------------------------------------------------------- classification at scale


def slow_prototype_ranking(vectors, labels, queries):
    classes = sorted(set(labels))
    means = []
    for c in classes:
        members = [v for v, label in zip(vectors, labels) if label == c]
        mean = np.sum(np.asarray(members, dtype=np.float64), axis=0)
        means.append(mean / np.linalg.norm(mean))
    out = []
    for q in queries:
        scores = [(c, float(np.dot(m, q))) for c, m in zip(classes, means)]
        out.append(sorted(scores, key=lambda cs: -cs[1]))
    return out


def slow_knn_ranking(vectors, labels, queries, k):
    out = []
    for q in queries:
        sims = sorted(((float(np.dot(v, q)), i) for i, v in enumerate(vectors)), reverse=True)[:k]
        votes: dict[str, float] = {}
        members: dict[str, list[float]] = {}
        for s, i in sims:
            votes[labels[i]] = votes.get(labels[i], 0.0) + s
            members.setdefault(labels[i], []).append(s)
        # Ranked by the vote; each class reports the mean similarity of its neighbours (classify --method knn).
        out.append([(c, sum(members[c]) / len(members[c])) for c, _ in sorted(votes.items(), key=lambda cs: -cs[1])])
    return out


def test_classification_at_scale_matches_explicit_loops(tmp_path, encoder):
    db = SiameseDB.create(tmp_path / "index", encoder=encoder)
    vectors, labels = clustered(120, 8)
    db.add_vectors(vectors, labels)
    db.remove(ids=[1, 2, 500])  # gaps in the ids: codes must still line up with items
    kept = [i for i in range(len(labels)) if i + 1 not in (1, 2, 500)]
    stored = db.store.vectors()[1]
    kept_labels = [labels[i] for i in kept]
    queries = np.random.default_rng(1).standard_normal((40, DIM)).astype(np.float32)
    queries /= np.linalg.norm(queries, axis=1, keepdims=True)

    expected = slow_prototype_ranking(stored, kept_labels, queries)
    fast_top = db.classify_vectors(queries, "prototype", top=5)
    full = db.classify_vectors(queries, "prototype")
    for want, got_top, got_full in zip(expected, fast_top, full):
        assert [c for c, _ in got_top.ranking] == [c for c, _ in want[:5]]
        np.testing.assert_allclose([s for _, s in got_top.ranking], [s for _, s in want[:5]], atol=1e-5)
        assert len(got_full.ranking) == 120 and got_full.label == want[0][0]

    for k in (1, 7):
        expected = slow_knn_ranking(stored, kept_labels, queries, k)
        for want, got in zip(expected, db.classify_vectors(queries, "knn", k=k)):
            assert got.label == want[0][0]
            assert dict(got.ranking) == pytest.approx(dict(want), abs=1e-5)

    episode = db.classify_vectors(queries[:3], "prototype", classes=["class0003", "class0007"])
    assert all({c for c, _ in p.ranking} == {"class0003", "class0007"} for p in episode)
    with pytest.raises(UnknownLabelError):
        db.classify_vectors(queries[:1], "prototype", classes=["nope"])
    with pytest.raises(InvalidInputError, match="top"):
        db.classify_vectors(queries[:1], "prototype", top=0)
    # The cached class table follows the store: a new class is visible at once.
    db.add_vectors(queries[:1], ["brand-new"])
    assert db.classify_vectors(queries[:1], "prototype", top=1)[0].label == "brand-new"
    db.close()


def test_add_vectors_trains_an_untrained_index_on_the_whole_input(tmp_path, encoder):
    db = SiameseDB.create(tmp_path / "index", encoder=encoder, factory="IVF4,Flat")
    vectors, labels = clustered(8, 40)
    db.add_vectors(vectors, labels)
    assert db.index.is_trained and len(db) == 320 and db.index.ntotal == 320
    hits = db.search_vectors(vectors[:1], 1)[0]
    assert hits[0].label == labels[0]
    db.close()
