"""SiameseDB end to end on small generated images: build, reopen, search, classify, verify, add, remove, recover.

The encoder here is a small randomly initialised one: these tests check the index's mechanics (what is stored,
what is found, what survives a reopen), not recognition quality, which `siamesedb eval` measures on real data.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image, ImageDraw

from siamesedb.db import MANIFEST_FILE, VECTORS_FILE, SiameseDB
from siamesedb.errors import (
    CorruptIndexError,
    EmptyIndexError,
    EncoderMismatchError,
    FolderError,
    ImageLoadError,
    IndexExistsError,
    IndexNotFoundError,
    InvalidInputError,
    NotCalibratedError,
    UnknownLabelError,
)


def draw(kind: int, variant: int, size: int = 32) -> Image.Image:
    """A dark shape on white: `kind` picks the shape, `variant` jitters its position and size."""
    image = Image.new("L", (size, size), 255)
    pen = ImageDraw.Draw(image)
    o = variant % 5  # 0..4: distinct files for variants 0..4
    box = (4 + o, 4 + o, 24 + o, 24 - o)
    if kind == 0:
        pen.ellipse(box, outline=0, width=3)
    elif kind == 1:
        pen.rectangle(box, outline=0, width=3)
    elif kind == 2:
        pen.line((4 + o, 4, 26, 26 - o), fill=0, width=3)
    else:
        pen.polygon([(16, 3 + o), (4, 27), (28 - o, 27)], outline=0)
    return image


@pytest.fixture()
def folder(tmp_path):
    """4 classes x 4 images, nested labels, plus one unreadable file."""
    root = tmp_path / "shapes"
    names = ["round/circle", "round/square", "line", "triangle"]
    for kind, name in enumerate(names):
        (root / name).mkdir(parents=True)
        for v in range(4):
            draw(kind, v).save(root / name / f"{v:02d}.png")
    (root / "line" / "broken.png").write_bytes(b"not a png at all")
    return root


@pytest.fixture()
def db(folder, encoder, tmp_path):
    database = SiameseDB.build(folder, path=tmp_path / "index", encoder=encoder)
    yield database
    database.close()


def test_build_indexes_every_readable_image_and_reports_the_bad_one(db, folder):
    report = db.last_report
    assert report.added == 16 and report.scanned == 17
    assert len(report.skipped) == 1 and report.skipped[0][0].endswith("broken.png")
    assert len(db) == 16
    assert db.labels() == ["line", "round/circle", "round/square", "triangle"]
    for name in ("items.sqlite", "vectors.faiss", "manifest.json", "encoder/config.json", "encoder/model.safetensors"):
        assert (db.path / name).exists(), name


def test_an_indexed_image_finds_itself_first(db, folder):
    path = folder / "triangle" / "02.png"
    hits = db.search(path, k=3)
    assert len(hits) == 3
    assert hits[0].path == str(path) and hits[0].label == "triangle"
    assert hits[0].score == pytest.approx(1.0, abs=1e-4)
    assert hits[0].score >= hits[1].score >= hits[2].score


def test_one_in_one_out_list_in_list_out(db, folder):
    one = folder / "line" / "00.png"
    assert isinstance(db.search(one, k=2), list) and hasattr(db.search(one, k=2)[0], "score")
    many = db.search([one, one], k=2)
    assert len(many) == 2 and all(len(hits) == 2 for hits in many)
    assert hasattr(db.classify(one), "ranking")
    assert len(db.classify([one])) == 1


def test_k_larger_than_the_collection_returns_what_there_is(db, folder):
    hits = db.search(folder / "line" / "00.png", k=100)
    assert len(hits) == 16
    assert len({h.id for h in hits}) == 16


def test_search_matches_brute_force_over_the_store(db, folder):
    queries = [folder / "round" / "square" / "01.png", folder / "line" / "03.png"]
    vectors = db.encoder.encode(queries)
    ids, corpus = db.store.vectors()
    expected = np.argsort(-(vectors @ corpus.T), axis=1)[:, :5]
    for hits, order in zip(db.search(queries, k=5), expected):
        assert [h.id for h in hits] == ids[order].tolist()


def test_reopening_gives_identical_results(db, folder, tmp_path):
    queries = [folder / "round" / "circle" / "01.png", folder / "triangle" / "03.png"]
    before = [[(h.id, h.score) for h in hits] for hits in db.search(queries, k=5)]
    db.close()
    with SiameseDB.open(tmp_path / "index") as again:
        after = [[(h.id, h.score) for h in hits] for hits in again.search(queries, k=5)]
    assert before == after


def test_classify_by_prototype_and_knn_rank_every_class(db, folder):
    path = folder / "round" / "square" / "00.png"
    for method in ("prototype", "knn"):
        prediction = db.classify(path, method=method, k=3)
        scores = [score for _, score in prediction.ranking]
        assert scores == sorted(scores, reverse=True)
        assert prediction.label == prediction.ranking[0][0] and prediction.score == scores[0]
    assert {label for label, _ in db.classify(path).ranking} == set(db.labels())


def test_classify_restricted_to_an_episode(db, folder):
    path = folder / "line" / "01.png"
    for method in ("prototype", "knn"):
        prediction = db.classify(path, method=method, classes=["line", "triangle"])
        assert {label for label, _ in prediction.ranking} <= {"line", "triangle"}
    with pytest.raises(UnknownLabelError, match="nope"):
        db.classify(path, classes=["line", "nope"])


def test_prototype_ranking_matches_an_explicit_mean(db, folder):
    path = folder / "triangle" / "01.png"
    vector = db.encoder.encode(path)
    expected = {}
    for label in db.labels():
        mean = db.support(label).mean(axis=0)
        expected[label] = float(vector @ (mean / np.linalg.norm(mean)))
    ranking = dict(db.classify(path).ranking)
    assert ranking.keys() == expected.keys()
    for label, score in expected.items():
        assert ranking[label] == pytest.approx(score, abs=1e-5)


def test_verify_needs_calibration_then_uses_the_stored_threshold(db, folder):
    path = folder / "round" / "circle" / "03.png"
    with pytest.raises(NotCalibratedError, match="calibrate"):
        db.verify(path, "round/circle")
    calibration = db.calibrate()
    assert calibration["method"] == "eer" and calibration["genuine_pairs"] > 0
    stored = json.loads((db.path / MANIFEST_FILE).read_text())["calibration"]
    assert stored["threshold"] == calibration["threshold"]
    result = db.verify(path, "round/circle")
    assert result.threshold == calibration["threshold"]
    assert result.accepted == (result.score >= result.threshold)
    with pytest.raises(UnknownLabelError):
        db.verify(path, "hexagon")


def test_calibrate_at_a_target_far(db):
    strict = db.calibrate(target_far=0.0)
    assert strict["far"] == 0.0 and strict["method"] == "far"
    loose = db.calibrate(target_far=1.0)
    assert loose["threshold"] <= strict["threshold"]
    with pytest.raises(InvalidInputError):
        db.calibrate(target_far=1.5)


def test_add_and_remove_without_a_rebuild(db, folder, tmp_path):
    new = draw(3, 4)
    path = tmp_path / "new.png"
    new.save(path)
    new_id = db.add(path, label="triangle")
    assert isinstance(new_id, int) and len(db) == 17
    assert db.search(path, k=1)[0].id == new_id
    assert db.remove(ids=[new_id]) == 1 and len(db) == 16
    assert all(h.id != new_id for h in db.search(path, k=16))
    assert db.remove(label="line") == 4
    assert "line" not in db.labels()
    assert all(h.label != "line" for h in db.search(folder / "line" / "00.png", k=12))
    with pytest.raises(UnknownLabelError):
        db.remove(label="line")
    with pytest.raises(InvalidInputError):
        db.remove(ids=[999999])
    db.close()
    with SiameseDB.open(tmp_path / "index") as again:
        assert len(again) == 12 and "line" not in again.labels()


def test_a_bad_image_in_add_stores_nothing(db, folder, tmp_path):
    bad = tmp_path / "bad.png"
    bad.write_bytes(b"")
    with pytest.raises(ImageLoadError, match="bad.png"):
        db.add([folder / "line" / "00.png", bad], label="line")
    assert len(db) == 16


def test_add_vectors_refuses_wrong_shapes_and_nan(db):
    with pytest.raises(Exception, match="16"):
        db.add_vectors(np.ones((2, 5), dtype=np.float32), ["a", "b"])
    with pytest.raises(InvalidInputError):
        db.add_vectors(np.full((1, 16), np.nan, dtype=np.float32), ["a"])
    ids = db.add_vectors(np.eye(16, dtype=np.float32)[:2], ["x", "y"])
    assert len(ids) == 2 and len(db) == 18


def test_rebuilding_the_same_folder_resumes_instead_of_duplicating(db, folder, encoder, tmp_path):
    db.close()
    again = SiameseDB.build(folder, path=tmp_path / "index", encoder=encoder)
    assert again.last_report.added == 0 and again.last_report.already_indexed == 16
    assert len(again) == 16
    draw(0, 4).save(folder / "round" / "circle" / "new.png")
    third = SiameseDB.build(folder, path=tmp_path / "index", encoder=encoder)
    assert third.last_report.added == 1 and len(third) == 17
    again.close()
    third.close()


@pytest.mark.parametrize("damage", ["delete", "garbage", "stale"])
def test_the_faiss_file_is_rebuilt_from_the_store(db, folder, tmp_path, damage):
    query = folder / "triangle" / "00.png"
    before = [(h.id, round(h.score, 5)) for h in db.search(query, k=16)]
    vectors = tmp_path / "index" / VECTORS_FILE
    if damage == "delete":
        vectors.unlink()
    elif damage == "garbage":
        vectors.write_bytes(b"\x00" * 100)
    else:  # the manifest names an older store version: a crash between the store commit and the FAISS save
        manifest = json.loads((tmp_path / "index" / MANIFEST_FILE).read_text())
        manifest["vectors_store_version"] -= 1
        (tmp_path / "index" / MANIFEST_FILE).write_text(json.dumps(manifest))
    db.close()
    with SiameseDB.open(tmp_path / "index") as again:
        assert [(h.id, round(h.score, 5)) for h in again.search(query, k=16)] == before
    assert vectors.exists()


def test_user_errors_are_named(folder, encoder, tmp_path, db):
    with pytest.raises(IndexNotFoundError, match="nowhere"):
        SiameseDB.open(tmp_path / "nowhere")
    with pytest.raises(IndexExistsError):
        SiameseDB.create(tmp_path / "index", encoder=encoder)
    with pytest.raises(FolderError):
        SiameseDB.build(tmp_path / "missing", path=tmp_path / "x", encoder=encoder)
    (tmp_path / "empty").mkdir()
    with pytest.raises(FolderError):
        SiameseDB.build(tmp_path / "empty", path=tmp_path / "y", encoder=encoder)
    assert not (tmp_path / "y").exists()


def test_empty_index_answers_honestly(encoder, tmp_path, folder):
    with SiameseDB.create(tmp_path / "empty-index", encoder=encoder) as empty:
        assert empty.search(folder / "line" / "00.png", k=3) == []
        with pytest.raises(EmptyIndexError):
            empty.classify(folder / "line" / "00.png")
        with pytest.raises(EmptyIndexError):
            empty.calibrate()


def test_manifest_that_disagrees_with_the_encoder_or_is_newer(db, tmp_path):
    db.close()
    manifest_path = tmp_path / "index" / MANIFEST_FILE
    manifest = json.loads(manifest_path.read_text())
    manifest["encoder"]["fingerprint"] = "0" * 16
    manifest_path.write_text(json.dumps(manifest))
    with pytest.raises(EncoderMismatchError):
        SiameseDB.open(tmp_path / "index")
    manifest["format_version"] = 99
    manifest_path.write_text(json.dumps(manifest))
    with pytest.raises(CorruptIndexError, match="newer"):
        SiameseDB.open(tmp_path / "index")
    manifest_path.write_text("{ not json")
    with pytest.raises(CorruptIndexError, match="manifest"):
        SiameseDB.open(tmp_path / "index")


def test_removing_the_same_id_twice_in_one_call_counts_it_once(db):
    ids, _ = db.store.vectors()
    assert db.remove(ids=[int(ids[0]), int(ids[0])]) == 1
    assert len(db) == 15


def test_search_results_outlive_the_handle_and_its_own_writes(folder, encoder, tmp_path):
    """Hits read lazily still describe the index as searched: after this handle removes an item, and after close."""
    db = SiameseDB.build(folder, tmp_path / "lazy", encoder=encoder)
    query_image = folder / "line" / "00.png"
    before = db.search(query_image, k=3)
    unread = db.search([query_image], k=3)  # a list in: Hits are built when read, not yet
    kept_after_close = db.search([query_image], k=3)
    db.remove(before[0].id)
    assert [h.id for h in unread[0]] == [h.id for h in before]  # the removed item is still among what was found
    db.close()
    assert [h.path for h in kept_after_close[0]] == [h.path for h in before]
    assert kept_after_close.ids[0].tolist() == [h.id for h in before]
