"""Issue 16: one reference per class must just work -- verification, calibration, and the first hour's rough edges.

Real Omniglot drawings with the shipped default encoder where the finding was about real behaviour (thresholds,
one-shot verification); small generated images where it was about mechanics (paths, duplicates, API shapes).
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import warnings
import zipfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageDraw

import siamesedb
from siamesedb.data import DomainWarning
from siamesedb.db import SiameseDB
from siamesedb.encoder import Encoder
from siamesedb.errors import ImageLoadError, InvalidInputError, NotCalibratedError

from helpers import OMNIGLOT_EVALUATION, png_bytes, require  # tests/helpers.py
from helpers import run_cli as run

ROOT = Path(__file__).resolve().parents[1]


def run_process(*args: object, cwd: Path | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "siamesedb", *map(str, args)], capture_output=True, text=True,
                          cwd=cwd)


# ---------------------------------------------------------------------------------------------- real data


@pytest.fixture(scope="module")
def alphabet(tmp_path_factory) -> Path:
    """The 20 first characters of Kannada (an evaluation alphabet of close look-alikes), drawers 1-5, unpacked
    from the official zip."""
    root = tmp_path_factory.mktemp("alphabet")
    with zipfile.ZipFile(require(OMNIGLOT_EVALUATION)) as archive:
        for name in sorted(archive.namelist()):
            parts = name.split("/")
            if len(parts) != 4 or parts[1] != "Kannada" or not parts[3].endswith(".png"):
                continue
            if int(parts[2].removeprefix("character")) > 20 or int(parts[3][-6:-4]) > 5:
                continue
            target = root / parts[2] / parts[3]
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_bytes(archive.read(name))
    return root


@pytest.fixture(scope="module")
def one_shot(alphabet, tmp_path_factory) -> tuple[Path, Path]:
    """(support folder: drawer 1 only, one drawing per character; index built from it with the default encoder)."""
    support = tmp_path_factory.mktemp("support")
    for png in sorted(alphabet.rglob("*_01.png")):
        (support / png.parent.name).mkdir(exist_ok=True)
        shutil.copy(png, support / png.parent.name / png.name)
    index = tmp_path_factory.mktemp("indexes") / "one-shot"
    SiameseDB.build(support, path=index).close()
    return support, index


def drawings(alphabet: Path, drawer: int) -> list[Path]:
    return sorted(alphabet.rglob(f"*_{drawer:02d}.png"))


def test_a_one_shot_index_verifies_out_of_the_box_with_the_encoders_threshold(alphabet, one_shot, tmp_path):
    support, index = one_shot
    with SiameseDB.open(index) as db:
        assert len(db) == 20 and all(count == 1 for count in db.store.label_counts().values())
        default = Encoder.load("default")
        queries = drawings(alphabet, 2)
        results = db.verify(queries, "character01")  # list in -> list out
        assert isinstance(results, list) and len(results) == 20
        reference = default.encode(next((support / "character01").iterdir()))
        for path, result in zip(queries, results):
            assert result.threshold_source == "encoder" and result.threshold == default.config.pair_threshold
            assert result.query == str(path)
            # One reference: the prototype is the reference itself, so the score is the pair cosine.
            assert result.score == pytest.approx(float(default.encode(path) @ reference), abs=1e-5)
            assert result.accepted == (result.score >= result.threshold)
        assert results[0].accepted  # the same character by another drawer

    result = run("verify", queries[0], "--index", index, "--label", "character01", "--json")
    assert result.exit_code == 0, result.output
    answer = json.loads(result.stdout)
    assert answer["threshold_source"] == "encoder" and answer["query"] == str(queries[0]) and answer["accepted"]
    result = run("verify", queries[0], "--index", index, "--label", "character01")
    assert "from encoder" in result.stdout


def test_the_encoders_threshold_holds_look_alike_impostors_off(alphabet, one_shot):
    """At the shipped threshold, few wrong characters of the same alphabet pass and most right ones do (issue 16
    saw 30% false accepts at the old 0.634: 27% on this subset). BENCHMARKS.md has the full table."""
    _, index = one_shot
    with SiameseDB.open(index) as db:
        labels = sorted(db.store.label_counts())
        vectors = db.encoder.encode(drawings(alphabet, 3))  # one per character, in label order
        accepted = np.array([[db.verify_vector(v, label).accepted for label in labels] for v in vectors])
    genuine_accept = np.mean(np.diag(accepted))
    false_accept = accepted[~np.eye(len(labels), dtype=bool)].mean()
    assert genuine_accept >= 0.8 and false_accept <= 0.12, (genuine_accept, false_accept)


def test_calibrating_a_one_shot_index(one_shot, tmp_path):
    _, built = one_shot
    index = tmp_path / "copy"
    shutil.copytree(built, index)
    with SiameseDB.open(index) as db:
        with pytest.raises(InvalidInputError, match="--target-far"):
            db.calibrate()  # no genuine pairs: no equal-error point, and the error says what works
        calibration = db.calibrate(target_far=0.05)
        assert calibration["genuine_pairs"] == 0 and calibration["impostor_pairs"] == 20 * 19
        assert calibration["frr"] is None and calibration["far"] <= 0.05
        assert "warning" not in calibration  # 380 impostor pairs are enough for a FAR target
        # The lowest threshold meeting the target: just above the highest impostor score that must be refused.
        ids, vectors = db.store.vectors()
        scores = vectors @ vectors.T
        impostor = np.sort(scores[~np.eye(len(ids), dtype=bool)])
        allowed = int(np.floor(0.05 * len(impostor)))
        assert impostor[-allowed - 1] < calibration["threshold"] <= impostor[-allowed - 1] + 1e-6
    result = run("calibrate", "--index", index, "--target-far", "0.05")
    assert result.exit_code == 0 and "FRR unknown" in result.output
    result = run("verify", sorted(one_shot[0].rglob("*.png"))[0], "--index", index, "--label", "character01", "--json")
    assert json.loads(result.stdout)["threshold_source"] == "index:prototype:0/380 pairs"


def test_eval_oneshot_verify_on_real_characters(alphabet):
    result = run("eval", "oneshot-verify", alphabet, "--target-far", "0.05")  # flat folder: one group per class
    assert result.exit_code != 0 and "--impostors any" in result.output
    result = run("eval", "oneshot-verify", alphabet, "--impostors", "any", "--target-far", "0.05", "--json")
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert report["classes"] == 20 and report["genuine_trials"] == 20 * 4 and report["impostor_trials"] == 20 * 19 * 5
    assert report["auc"] > 0.9 and report["threshold_source"] == "encoder"
    assert report["far_threshold"]["far"] <= 0.05


# ---------------------------------------------------------------------------------------------- generated images


def shape(kind: int, variant: int, size: int = 40, wide: bool = False) -> Image.Image:
    image = Image.new("L", (size * 2 if wide else size, size), 255)
    pen = ImageDraw.Draw(image)
    o = variant
    if kind == 0:
        pen.ellipse((6 + o, 6 + o, 30 + o, 30), outline=0, width=3)
    elif kind == 1:
        pen.rectangle((6 + o, 6, 30, 30 - o), outline=0, width=3)
    else:
        pen.line((6 + o, 6, 32, 32 - o), fill=0, width=3)
    return image


@pytest.fixture()
def shapes(tmp_path) -> Path:
    root = tmp_path / "shapes"
    for kind, name in enumerate(("circle", "square", "line")):
        (root / name).mkdir(parents=True)
        for variant in range(4):
            shape(kind, variant).save(root / name / f"{variant}.png")
    return root


def test_calibrations_are_kept_per_rule_and_thin_ones_warn(shapes, tmp_path):
    with SiameseDB.build(shapes, path=tmp_path / "idx") as db:
        first = db.calibrate()
        assert "warning" in first and "genuine pairs" in first["warning"]  # 12 genuine, 24 impostor pairs
        db.calibrate(rule="relative")
        query = shapes / "circle" / "0.png"
        assert db.verify(query, "circle", rule="prototype").threshold_source == "index:prototype:12/24 pairs"
        assert db.verify(query, "circle").threshold_source.startswith("index:relative:")  # the latest by default
        for rule in ("max", "mean_top3"):  # not calibrated: the encoder's threshold, scored by that rule
            answer = db.verify(query, "circle", rule=rule)
            assert answer.threshold_source == "encoder" and answer.threshold == db.encoder.config.pair_threshold
            support = db.support("circle")
            cosines = np.sort(support @ db.encoder.encode(query))[::-1]
            expected = cosines[0] if rule == "max" else cosines[:3].mean()
            assert answer.score == pytest.approx(float(expected), abs=1e-5)
    with SiameseDB.open(tmp_path / "idx") as db:
        assert set(db.info()["calibrations"]) == {"prototype", "relative"}
    result = run("calibrate", "--index", tmp_path / "idx", "--rule", "max")
    assert result.exit_code == 0 and "warning: threshold rests on only" in result.stderr
    result = run("verify", shapes / "line" / "1.png", "--index", tmp_path / "idx", "--label", "line", "--rule", "max",
                 "--json")
    assert json.loads(result.stdout)["threshold_source"].startswith("index:max:")


def test_without_any_threshold_the_error_names_both_ways_out(shapes, tmp_path):
    import dataclasses

    enc = Encoder.load("default")
    bare = Encoder(dataclasses.replace(enc.config, pair_calibration={}, notes={}), net=enc.net)
    with SiameseDB.build(shapes, path=tmp_path / "idx", encoder=bare) as db:
        with pytest.raises(NotCalibratedError, match="calibrate.*--threshold"):
            db.verify(shapes / "circle" / "0.png", "circle")
        assert db.verify(shapes / "circle" / "0.png", "circle", threshold=0.5).threshold_source == "given"


def test_add_does_not_store_an_image_twice_under_one_label(shapes, tmp_path):
    with SiameseDB.build(shapes, path=tmp_path / "idx") as db:
        before = len(db)
        circle = shapes / "circle" / "0.png"
        existing = db.add(circle, "circle")
        assert len(db) == before and db.last_add_duplicates == 1
        ids = db.add([circle, shapes / "circle" / "1.png", circle], "circle")
        assert len(db) == before and ids[0] == ids[2] == existing
        new_id = db.add(circle, "other-class")  # the same image under another label is a new item
        assert len(db) == before + 1 and new_id != existing
    result = run("add", shapes / "square" / "2.png", "--index", tmp_path / "idx", "--label", "square")
    assert result.exit_code == 0 and "1 already stored" in result.output


def test_paths_are_absolute_and_can_be_rerooted(shapes, tmp_path, monkeypatch):
    monkeypatch.chdir(shapes.parent)
    with SiameseDB.build(Path("shapes"), path=tmp_path / "idx") as db:
        added = db.add(Path("shapes") / "line" / "0.png", "line-again")
        paths = [item.path for item in db.store.items(np.arange(1, len(db) + 1))]
    assert all(Path(p).is_absolute() and Path(p).exists() for p in paths), paths
    moved = tmp_path / "moved"
    shutil.move(str(shapes), moved)
    monkeypatch.chdir(tmp_path)
    result = run("reindex", "--index", "idx", "--reroot", shapes, moved)
    assert result.exit_code == 0, result.output
    with SiameseDB.open(tmp_path / "idx") as db:
        item = db.store.items([added])[0]
        assert item.path == str(moved / "line" / "0.png") and Path(item.path).exists()
        assert all(Path(i.path).exists() for i in db.store.items(np.arange(1, len(db) + 1)))


def test_api_takes_what_users_pass(shapes, tmp_path):
    with SiameseDB.build(shapes, path=tmp_path / "idx") as db:
        circle = shapes / "circle" / "1.png"
        # A bare string is one class, not a sequence of one-letter classes.
        assert db.classify(circle, classes="circle").label == "circle"
        with pytest.raises(InvalidInputError, match="ids .* or a label"):
            db.remove()
        # Images as encoded bytes and as binary file objects; an undecodable blob is named by its size, not dumped.
        data = circle.read_bytes()
        assert db.search(data, k=1)[0].id == db.search(circle, k=1)[0].id
        with open(circle, "rb") as handle:
            assert db.search(handle, k=1)[0].id == db.search(circle, k=1)[0].id
        with pytest.raises(ImageLoadError) as caught:
            db.search(b"not an image at all" * 40, k=1)
        assert "<760 bytes>" in str(caught.value) and "not an image" not in str(caught.value)
        # Results serialise; the handle and its answers have useful reprs.
        hits = db.search([circle, data], k=2)
        text = json.dumps({"hits": hits, "verdict": db.verify(circle, "circle"), "pred": db.classify(circle)},
                          default=siamesedb.json_default)
        assert json.loads(text)["hits"][0][0]["label"] == "circle"
        assert "3 classes" in repr(db) and str(tmp_path / "idx") in repr(db)
        assert siamesedb.verify_pair(circle, shapes / "circle" / "2.png").threshold_source == "encoder"


def test_array_level_calls_score_cosines_whatever_the_vector_length(shapes, tmp_path):
    with SiameseDB.build(shapes, path=tmp_path / "idx") as db:
        v = db.encoder.encode(shapes / "square" / "1.png")
        assert db.verify_vector(3.7 * v, "square").score == pytest.approx(db.verify_vector(v, "square").score, abs=1e-6)
        assert db.verify_vector(3.7 * v, "square").score <= 1.0 + 1e-6
        raw, unit = db.search_vectors(np.stack([5 * v]), k=3), db.search_vectors(np.stack([v]), k=3)
        assert np.allclose(raw.scores, unit.scores, atol=1e-6) and (raw.ids == unit.ids).all()
        assert db.classify_vectors(np.stack([0.1 * v]))[0].score == pytest.approx(
            db.classify_vectors(np.stack([v]))[0].score, abs=1e-6)


def test_domain_warning_for_images_unlike_the_training_data(tmp_path):
    wide = tmp_path / "wide"
    for kind, name in enumerate(("a", "b")):
        (wide / name).mkdir(parents=True)
        for variant in range(2):
            shape(kind, variant, wide=True).save(wide / name / f"{variant}.png")
    with pytest.warns(DomainWarning, match="aspect 2.00"):
        db = SiameseDB.build(wide, path=tmp_path / "idx")
    with pytest.warns(DomainWarning):
        SiameseDB.open(tmp_path / "idx").verify(wide / "a" / "0.png", "a")
    db.close()
    result = run_process("verify", wide / "a" / "1.png", "--index", tmp_path / "idx", "--label", "a")
    assert result.returncode == 0 and result.stderr.startswith("warning: ") and "aspect" in result.stderr


def test_glyph_like_images_raise_no_domain_warning(shapes, tmp_path):
    with warnings.catch_warnings():
        warnings.simplefilter("error", DomainWarning)
        with SiameseDB.build(shapes, path=tmp_path / "idx") as db:
            db.verify(shapes / "circle" / "0.png", "circle")


def test_usage_errors_are_one_line(shapes, tmp_path):
    SiameseDB.build(shapes, path=tmp_path / "idx").close()
    for args in (["verify", shapes / "circle" / "0.png", "--index", tmp_path / "idx"],
                 ["remove", "--index", tmp_path / "idx"],
                 ["query", "--index", tmp_path / "idx"],
                 ["no-such-command"]):
        result = run_process(*args)
        lines = [line for line in result.stderr.splitlines() if line.strip()]
        assert result.returncode == 2 and len(lines) == 1 and lines[0].startswith("Error: "), result.stderr
        assert "--help" in lines[0]


def test_a_bad_image_in_a_batch_costs_only_its_own_answer(shapes, tmp_path):
    SiameseDB.build(shapes, path=tmp_path / "idx").close()
    bad = tmp_path / "broken.png"
    bad.write_bytes(b"\x89PNG\r\n\x1a\n broken")
    good = shapes / "square" / "0.png"
    for command in (["query", "-k", "1"], ["classify"], ["verify", "--label", "square"]):
        result = run_process(command[0], good, bad, "--index", tmp_path / "idx", *command[1:], "--json")
        assert result.returncode == 1, (command, result.stderr)
        answers = json.loads(result.stdout)
        answers = answers if isinstance(answers, list) else [answers]
        assert [a["query"] for a in answers] == [str(good)]
        errors = [line for line in result.stderr.splitlines() if line.strip()]
        assert len(errors) == 1 and str(bad) in errors[0]


def test_info_lists_every_class(shapes, tmp_path):
    SiameseDB.build(shapes, path=tmp_path / "idx").close()
    result = run("info", "--index", tmp_path / "idx", "--labels")
    assert result.exit_code == 0 and [line.split()[-1] for line in result.stdout.splitlines()] == [
        "circle", "line", "square"]
    summary = json.loads(run("info", "--index", tmp_path / "idx", "--json").stdout)
    assert summary["labels"] == {"circle": 4, "line": 4, "square": 4}
    assert summary["encoder"]["pair_threshold"] == Encoder.load("default").config.pair_threshold


def test_http_errors_all_have_the_documented_shape(shapes, tmp_path):
    pytest.importorskip("fastapi")
    from fastapi.testclient import TestClient

    from siamesedb.serve import create_app

    with SiameseDB.build(shapes, path=tmp_path / "idx") as db:
        client = TestClient(create_app(db))
        body = png_bytes(shape(0, 1))
        zero = client.post("/search?k=0", content=body, headers={"Content-Type": "image/png"})
        assert zero.status_code == 422 and isinstance(zero.json()["detail"], str) and "k" in zero.json()["detail"]
        answer = client.post("/verify?label=circle", content=body, headers={"Content-Type": "image/png"}).json()
        assert answer["threshold_source"] == "encoder" and answer["query"] == "upload"


def test_the_default_encoders_fingerprint_ignores_its_measured_threshold():
    import dataclasses

    enc = Encoder.load("default")
    moved = Encoder(dataclasses.replace(enc.config, pair_calibration={"threshold": 0.1}), net=enc.net)
    assert moved.fingerprint == enc.fingerprint == "8bbd3064e906683e" and moved.config.pair_threshold == 0.1
    assert enc.config.pair_calibration["target_far"] == 0.05 and enc.config.data_profile["aspect"] == 1.0


def test_pair_threshold_tool_writes_a_threshold_without_changing_the_fingerprint(tmp_path, monkeypatch):
    import runpy

    root = tmp_path / "background"
    for group in ("alpha", "beta"):
        for kind, name in enumerate(("circle", "square", "line")):
            (root / group / name).mkdir(parents=True)
            for variant in range(4):
                shape(kind, variant + (group == "beta")).save(root / group / name / f"{variant}.png")
    out = tmp_path / "encoder"
    monkeypatch.setattr(sys, "argv", ["pair_threshold.py", "default", str(root), "--val-fraction", "0.5",
                                      "--trial-seeds", "2", "--write", str(out)])
    runpy.run_path(str(ROOT / "tools" / "pair_threshold.py"), run_name="__main__")
    written = Encoder.load(out)
    calibration = written.config.pair_calibration
    assert written.fingerprint == Encoder.load("default").fingerprint
    assert calibration["far"] <= 0.05 and written.config.pair_threshold == calibration["threshold"]
    assert "3 background classes" in calibration["measured_on"]  # half of the 6 classes, held out by the seed
