"""Hostile index files, recovery from crashed writers, honest answers at the edges, and no unpickling anywhere.

A damaged index gives a clear named error or a safe rebuild, never a traceback and never silently wrong answers.
Crash recovery under kill -9 is exercised at scale by tools/torture.py; here each recovery path is checked once.
"""

from __future__ import annotations

import json
import os
import pickle
import shutil
import sqlite3
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from PIL import Image, ImageDraw

from siamesedb.cli import cli
from siamesedb.db import MANIFEST_FILE, STORE_FILE, VECTORS_FILE, SiameseDB
from siamesedb.encoder import Encoder
from siamesedb.errors import (
    CorruptIndexError,
    DimensionMismatchError,
    EmptyIndexError,
    EncoderMismatchError,
    IndexExistsError,
    IndexNotFoundError,
    InvalidInputError,
    SiameseDBError,
    StorageError,
    UnknownLabelError,
)
from siamesedb.locking import IndexWriteLock

from helpers import OMNIGLOT_EVALUATION, SHARED_DATA, require  # tests/helpers.py

ROOT = Path(__file__).resolve().parents[1]


def drawing(kind: int, variant: int) -> Image.Image:
    image = Image.new("L", (32, 32), 255)
    pen = ImageDraw.Draw(image)
    box = (3 + variant, 3 + variant, 26 - variant, 27)
    if kind == 0:
        pen.ellipse(box, outline=0, width=2)
    elif kind == 1:
        pen.rectangle(box, outline=0, width=2)
    else:
        pen.chord(box, 0, 200, outline=0, width=2)
    return image


@pytest.fixture(scope="module")
def folder(tmp_path_factory) -> Path:
    """3 classes x 5 drawings."""
    root = tmp_path_factory.mktemp("shapes")
    for kind, label in enumerate(["circle", "square", "chord"]):
        (root / label).mkdir()
        for v in range(5):
            drawing(kind, v).save(root / label / f"{v}.png")
    return root


@pytest.fixture(scope="module")
def pristine(folder, encoder_dir, tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("pristine") / "index"
    SiameseDB.build(folder, path=path, encoder=encoder_dir).close()
    return path


@pytest.fixture()
def index(pristine, tmp_path) -> Path:
    """A fresh copy of a 15-item index, free to damage."""
    target = tmp_path / "index"
    shutil.copytree(pristine, target)
    return target


def answers(path: Path, query: Path) -> list[tuple[int, float]]:
    with SiameseDB.open(path) as db:
        return [(h.id, round(h.score, 5)) for h in db.search(query, k=15)]


# ---------------------------------------------------------------------------------------------- the store


@pytest.mark.parametrize("damage", ["truncated", "header", "zeroed-middle", "emptied"])
def test_a_damaged_store_is_a_named_error_and_left_as_it_was(index, damage):
    store = index / STORE_FILE
    data = store.read_bytes()
    damaged = {
        "truncated": data[: len(data) // 3],
        "header": b"not sqlite at all" + data[17:],
        "zeroed-middle": data[:4096] + b"\x00" * (len(data) - 8192) + data[-4096:],
        "emptied": b"",
    }[damage]
    store.write_bytes(damaged)
    with pytest.raises(CorruptIndexError, match=STORE_FILE):
        with SiameseDB.open(index) as db:
            db.search_vectors(db.store.vectors()[1][:1], k=3)
    assert store.read_bytes() == damaged  # never "repaired" into an empty store


def test_random_page_damage_only_ever_gives_named_errors(pristine, folder, tmp_path):
    data = (pristine / STORE_FILE).read_bytes()
    rng = np.random.default_rng(3)
    outcomes = {"answered": 0, "named error": 0}
    for trial in range(24):
        target = tmp_path / f"copy{trial}"
        shutil.copytree(pristine, target)
        damaged = bytearray(data)
        page = trial % (len(data) // 4096)
        for at in page * 4096 + rng.integers(0, 4096, size=48):
            damaged[at] = int(rng.integers(0, 256))
        (target / STORE_FILE).write_bytes(bytes(damaged))
        try:
            with SiameseDB.open(target) as db:
                db.search(folder / "circle" / "0.png", k=15)
                db.classify(folder / "circle" / "0.png")
                db.info()
            outcomes["answered"] += 1
        except SiameseDBError as exc:
            assert "\n" not in str(exc)
            outcomes["named error"] += 1
    assert outcomes["named error"] > 0  # the damage was real, and was named every time it mattered


def test_store_dimension_or_format_disagreeing_with_the_manifest(index):
    with sqlite3.connect(index / STORE_FILE) as conn:
        conn.execute("UPDATE meta SET value = '8' WHERE key = 'dim'")
    with pytest.raises(DimensionMismatchError, match="8-d"):
        SiameseDB.open(index)
    with sqlite3.connect(index / STORE_FILE) as conn:
        conn.execute("UPDATE meta SET value = '16' WHERE key = 'dim'")
        conn.execute("UPDATE meta SET value = '7' WHERE key = 'schema_version'")
    with pytest.raises(CorruptIndexError, match="newer"):
        SiameseDB.open(index)


def test_a_missing_store_is_a_named_error(index):
    (index / STORE_FILE).unlink()
    with pytest.raises(CorruptIndexError, match="missing"):
        SiameseDB.open(index)


# ---------------------------------------------------------------------------------------------- the FAISS file


@pytest.mark.parametrize("damage", ["truncated", "flipped", "empty", "a folder"])
def test_a_damaged_faiss_file_is_rebuilt_from_the_store(index, folder, pristine, damage):
    expected = answers(pristine, folder / "square" / "2.png")
    vectors = index / VECTORS_FILE
    data = vectors.read_bytes()
    if damage == "truncated":
        vectors.write_bytes(data[: len(data) // 2])
    elif damage == "flipped":
        vectors.write_bytes(data[:40] + bytes(b ^ 0xFF for b in data[40:80]) + data[80:])
    elif damage == "empty":
        vectors.write_bytes(b"")
    else:
        vectors.unlink()
        vectors.mkdir()
    assert answers(index, folder / "square" / "2.png") == expected
    if damage == "a folder":  # a reader cannot save over it, and says nothing: it answers from memory
        with SiameseDB.open(index) as db, pytest.raises(StorageError, match="cannot save"):
            db.add_vectors(np.eye(16, dtype=np.float32)[:1], ["x"])  # a writer must, and names the problem
    else:
        assert vectors.read_bytes() != b""  # the rebuilt file was saved


def test_a_faiss_file_from_another_index_is_not_trusted(index, folder, pristine, tmp_path, encoder_dir):
    other = tmp_path / "other"
    SiameseDB.build(folder / "circle", path=other, encoder=encoder_dir).close()  # 5 items, same dimension
    shutil.copy(other / VECTORS_FILE, index / VECTORS_FILE)
    assert answers(index, folder / "chord" / "1.png") == answers(pristine, folder / "chord" / "1.png")


# ---------------------------------------------------------------------------------------------- the manifest


@pytest.mark.parametrize(
    "edit, error, needle",
    [
        (lambda m: [m], CorruptIndexError, "not an object"),
        (lambda m: {**m, "encoder": "conv4"}, CorruptIndexError, "encoder"),
        (lambda m: {**m, "factory": 7}, CorruptIndexError, "factory"),
        (lambda m: {**m, "calibration": [0.5]}, CorruptIndexError, "calibration"),
        (lambda m: {k: v for k, v in m.items() if k != "dimension"}, CorruptIndexError, "dimension"),
        (lambda m: {**m, "dimension": "sixteen"}, CorruptIndexError, "manifest"),
        (lambda m: {**m, "dimension": 32}, DimensionMismatchError, "32"),
        (lambda m: {**m, "encoder": {**m["encoder"], "fingerprint": "f" * 16}}, EncoderMismatchError, "fingerprint"),
        (lambda m: {**m, "format_version": 2}, CorruptIndexError, "newer"),
    ],
)
def test_a_manifest_that_is_malformed_or_disagrees_is_a_named_error(index, edit, error, needle):
    path = index / MANIFEST_FILE
    path.write_text(json.dumps(edit(json.loads(path.read_text()))))
    with pytest.raises(error, match=needle) as info:
        SiameseDB.open(index)
    assert "\n" not in str(info.value)


def test_truncated_manifest_and_the_cli_say_so_in_one_line(index):
    path = index / MANIFEST_FILE
    path.write_text(path.read_text()[:25])
    result = CliRunner().invoke(cli, ["info", "--index", str(index)])
    assert result.exit_code == 1
    assert result.output.count("\n") == 1 and "manifest.json" in result.output and "unreadable" in result.output


# ---------------------------------------------------------------------------------------------- crashed writers


def test_a_creation_cut_short_is_redone_by_the_next_build(folder, encoder_dir, tmp_path):
    path = tmp_path / "index"
    # What a kill between the store's creation and the manifest's write leaves: an empty store and no manifest.
    with SiameseDB.create(path, encoder=encoder_dir):
        pass
    (path / MANIFEST_FILE).unlink()
    (path / "manifest.json.tmp").write_text("{ half")
    with pytest.raises(IndexNotFoundError):
        SiameseDB.open(path)
    db = SiameseDB.build(folder, path=path, encoder=encoder_dir)
    assert len(db) == 15 and not (path / "manifest.json.tmp").exists()
    db.close()


def test_a_store_with_items_but_no_manifest_is_never_overwritten(index, folder, encoder_dir):
    (index / MANIFEST_FILE).unlink()
    before = (index / STORE_FILE).read_bytes()
    with pytest.raises(IndexExistsError, match="holds items"):
        SiameseDB.build(folder, path=index, encoder=encoder_dir)
    assert (index / STORE_FILE).read_bytes() == before


def test_leftover_temporaries_of_a_killed_writer_are_cleared_by_the_next_write(index):
    leftovers = [index / "manifest.json.tmp", index / "vectors.faiss.abc123.tmp", index / "encoder" / "config.json.tmp"]
    for leftover in leftovers:
        leftover.write_bytes(b"half written")
    with SiameseDB.open(index) as db:
        assert all(p.exists() for p in leftovers)  # reading leaves the folder alone
        db.add_vectors(np.eye(16, dtype=np.float32)[:1], ["new"])
    assert not any(p.exists() for p in leftovers)


def test_a_reader_never_writes_while_a_writer_holds_the_lock(index, folder, pristine):
    # The state a writer leaves mid-build: store committed ahead of the FAISS file and manifest.
    with sqlite3.connect(index / STORE_FILE) as conn:
        conn.execute("DELETE FROM items WHERE label = 'chord'")
        conn.execute("UPDATE meta SET value = CAST(value AS INTEGER) + 1 WHERE key = 'version'")
    files = {name: (index / name).read_bytes() for name in (MANIFEST_FILE, VECTORS_FILE)}
    writer = IndexWriteLock(index)
    writer.acquire()
    try:
        with SiameseDB.open(index) as reader:  # rebuilds in memory from the store, saves nothing
            assert len(reader) == 10 and reader.index.ntotal == 10
            assert "chord" not in {h.label for h in reader.search(folder / "chord" / "0.png", k=15)}
        assert {name: (index / name).read_bytes() for name in files} == files
    finally:
        writer.release()
    with SiameseDB.open(index) as reader:  # no writer now: the rebuilt file is saved
        assert reader.index.ntotal == 10
    manifest = json.loads((index / MANIFEST_FILE).read_text())
    with sqlite3.connect(index / STORE_FILE) as conn:
        version = int(conn.execute("SELECT value FROM meta WHERE key = 'version'").fetchone()[0])
    assert manifest["vectors_store_version"] == version


def test_a_write_through_an_old_handle_keeps_what_other_writers_did(index, folder):
    old = SiameseDB.open(index)
    with SiameseDB.open(index) as other:  # another process, in effect: adds an item and calibrates
        new_id = int(other.add_vectors(np.eye(16, dtype=np.float32)[:1], ["other"])[0])
        other.calibrate()
    old.add_vectors(np.eye(16, dtype=np.float32)[1:2], ["mine"])  # must not drop `other`'s item or calibration
    old.close()
    with SiameseDB.open(index) as db:
        assert db.manifest["calibration"] is not None
        assert {"other", "mine"} <= set(db.labels()) and len(db) == 17
        assert new_id in db.index.ids().tolist() and db.index.ntotal == 17
        assert db.manifest["vectors_store_version"] == db.store.version  # opened without a rebuild


# ---------------------------------------------------------------------------------------------- honest answers


def test_empty_and_one_class_support_sets_answer_as_documented(encoder_dir, folder, tmp_path):
    with SiameseDB.create(tmp_path / "empty", encoder=encoder_dir) as db:
        query = folder / "circle" / "0.png"
        assert db.search(query, k=5) == []
        with pytest.raises(EmptyIndexError):
            db.classify(query, method="knn")
        with pytest.raises(UnknownLabelError):
            db.verify(query, "circle", threshold=0.5)
        db.add([folder / "circle" / f"{v}.png" for v in range(3)], label="circle")
        only = db.classify(folder / "square" / "0.png")
        assert only.label == "circle" and len(only.ranking) == 1  # one class: it wins, with its real score
        support = db.support("circle")
        prototype = support.sum(axis=0) / np.linalg.norm(support.sum(axis=0))
        assert only.score == pytest.approx(float(db.encoder.encode(folder / "square" / "0.png") @ prototype), abs=1e-5)
        with pytest.raises(InvalidInputError, match="two|classes"):
            db.calibrate()  # no impostor pairs: no threshold can be chosen
        with pytest.raises(InvalidInputError):
            db.classify(query, classes=[])


def test_k_beyond_the_collection_and_an_identical_query(pristine, folder):
    with SiameseDB.open(pristine) as db:
        hits = db.search(folder / "chord" / "3.png", k=1000)
        assert len(hits) == 15 and len({h.id for h in hits}) == 15
        knn = db.classify(folder / "chord" / "3.png", method="knn", k=1000)
        assert {label for label, _ in knn.ranking} == {"circle", "square", "chord"}
        # A query identical to a support image: score 1 against it, first hit, accepted by the max rule.
        assert hits[0].path.endswith("chord/3.png") and hits[0].score == pytest.approx(1.0, abs=1e-4)
        verdict = db.verify(folder / "chord" / "3.png", "chord", threshold=0.999, rule="max")
        assert verdict.accepted and verdict.score == pytest.approx(1.0, abs=1e-4)


def test_nan_inf_and_zero_vectors_are_refused_and_store_nothing(index):
    with SiameseDB.open(index) as db:
        bad = np.eye(16, dtype=np.float32)[:2]
        for value in (np.nan, np.inf, -np.inf):
            bad[1, 3] = value
            with pytest.raises(InvalidInputError, match="NaN or infinity"):
                db.add_vectors(bad, ["a", "b"])
        with pytest.raises(InvalidInputError, match="all zeros"):
            db.add_vectors(np.zeros((1, 16), dtype=np.float32), ["z"])
        assert len(db) == 15
        nan_query = np.full((1, 16), np.nan, dtype=np.float32)
        with pytest.raises(InvalidInputError):
            db.search_vectors(nan_query)
        with pytest.raises(InvalidInputError):
            db.classify_vectors(nan_query)
        with pytest.raises(InvalidInputError):
            db.verify_vector(nan_query[0], "circle", threshold=0.5)


# ---------------------------------------------------------------------------------------------- no pickles


def test_nothing_unpickles_while_building_opening_and_querying(folder, encoder_dir, tmp_path, monkeypatch):
    import torch

    def refuse(*args, **kwargs):
        raise AssertionError("something tried to unpickle")

    for name in ("load", "loads", "Unpickler"):
        monkeypatch.setattr(pickle, name, refuse)
    monkeypatch.setattr(torch, "load", refuse)
    db = SiameseDB.build(folder, path=tmp_path / "index", encoder=encoder_dir)
    db.close()
    (tmp_path / "index" / VECTORS_FILE).unlink()  # force the rebuild path too
    with SiameseDB.open(tmp_path / "index") as again:
        again.search(folder / "circle" / "1.png", k=3)
        again.classify(folder / "circle" / "1.png")
    Encoder.load("default")


def test_the_cli_names_a_damaged_store_in_one_line(index):
    (index / STORE_FILE).write_bytes(b"garbage" * 1000)
    for command in (["info"], ["calibrate"], ["remove", "--label", "circle"]):
        result = CliRunner().invoke(cli, [*command, "--index", str(index)])
        assert result.exit_code == 1 and result.output.count("\n") == 1 and STORE_FILE in result.output, command
        assert isinstance(result.exception, SystemExit)  # a clean exit, not an exception escaping click


# ---------------------------------------------------------------------------------------------- the torture tool

def test_the_kill_9_torture_tool_runs_clean_on_a_few_trials(tmp_path):
    require(OMNIGLOT_EVALUATION)
    result = subprocess.run(
        [sys.executable, "tools/torture.py", "--trials", "8", "--classes", "3", "--per-class", "4",
         "--data", str(SHARED_DATA), "--work", str(tmp_path / "work")],
        capture_output=True, text=True, cwd=ROOT, timeout=300, env={**os.environ, "PYTHONPATH": str(ROOT)},
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "8 trials, 0 lost, 0 duplicated, 0 unopenable" in result.stdout
    assert "half batches 0, stray items 0, FAISS/store mismatches 0, unresumable builds 0" in result.stdout
