"""Issue 29, odd input round two: NaN thresholds, one label rule for every path (API, folder build, CLI, HTTP), and
the HTTP answers that disagreed with the CLI (`POST /items` paths, re-posts, `distance` on a Euclidean index, huge k).
"""

from __future__ import annotations

import math
import shutil
from pathlib import Path

import numpy as np
import pytest

from siamesedb import checks
from siamesedb.db import SiameseDB
from siamesedb.errors import InvalidInputError

from helpers import draw_shape, png_bytes, run_cli, unit_rows

BAD_LABELS = {
    "a\nb": "control character",
    "tab\there": "control character",
    "nul\x00": "control character",
    "del\x7f": "control character",
    "c1\x85": "control character",
    "line\u2028break": "line break",
    "": "empty",
    "   ": "empty",
    "..": "'.' or '..'",
    ".": "'.' or '..'",
    "a/../b": "'.' or '..'",
    "a/./b": "'.' or '..'",
    "/abs": "'/'",
    "trail/": "'/'",
    "a//b": "'/'",
    "win\\path": "backslash",
}
GOOD_LABELS = ["Latin/character07", "U31/genuine", "Ελληνικά/χαρακτήρας", "Syriac_(Serto)/character18", "a..b",
               ".hidden-ish", "with space", "日本語"]


# ---------------------------------------------------------------------------------------- thresholds


@pytest.mark.parametrize("value", [math.nan, math.inf, -math.inf, np.float32("nan"), "0.5", None, True])
def test_a_threshold_that_is_no_finite_number_is_refused_in_one_line(value):
    with pytest.raises(InvalidInputError, match="threshold") as info:
        checks.as_threshold(value)
    assert "\n" not in str(info.value)


def test_finite_thresholds_pass_as_floats():
    assert checks.as_threshold(0.7) == 0.7
    assert checks.as_threshold(-3) == -3.0  # Euclidean scores are minus a distance
    assert isinstance(checks.as_threshold(np.float32(0.5)), float)


@pytest.mark.parametrize("value", [math.nan, math.inf, -0.1, 1.5, "0.05", None, True])
def test_a_target_far_outside_zero_to_one_or_no_number_is_refused(value):
    with pytest.raises(InvalidInputError, match="target FAR"):
        checks.as_target_far(value)


def test_target_far_keeps_its_value():
    assert checks.as_target_far(0.05) == 0.05 and checks.as_target_far(0.0) == 0.0 and checks.as_target_far(1) == 1


@pytest.mark.parametrize("value", [math.nan, math.inf])
def test_verify_refuses_a_threshold_that_is_no_finite_number_on_every_path(encoder_dir, tmp_path, value):
    from siamesedb.reading import verify_pair

    index = tmp_path / "index"
    with SiameseDB.create(index, encoder=encoder_dir, device="cpu") as db:
        db.add([draw_shape(0, 0), draw_shape(0, 1)], "round")
        with pytest.raises(InvalidInputError, match="threshold"):  # was REJECTED "from given"
            db.verify_vector(unit_rows(1, seed=3)[0], "round", threshold=value)
        with pytest.raises(InvalidInputError, match="threshold"):
            db.verify(draw_shape(0, 2), "round", threshold=value)
    with pytest.raises(InvalidInputError, match="threshold"):
        verify_pair(draw_shape(0, 0), draw_shape(0, 1), encoder=encoder_dir, threshold=value, device="cpu")
    image = tmp_path / "q.png"
    draw_shape(0, 2).save(image)
    result = run_cli("verify", image, "--index", index, "--label", "round", "--threshold", str(value),
                     "--device", "cpu")
    assert result.exit_code == 1 and "threshold" in result.output, result.output
    assert "REJECTED" not in result.output and len(result.output.strip().splitlines()) == 1, result.output


# ---------------------------------------------------------------------------------------- the label rule


@pytest.mark.parametrize("label", list(BAD_LABELS))
def test_the_label_rule_refuses_control_characters_and_path_tricks(label):
    with pytest.raises(InvalidInputError, match=BAD_LABELS[label]) as info:
        checks.as_label(label)
    message = str(info.value)
    assert "\n" not in message and message.startswith("label ")
    with pytest.raises(InvalidInputError):
        checks.as_labels(["fine", label])


@pytest.mark.parametrize("label", [None, 3, b"bytes", {"a"}])
def test_a_label_that_is_not_text_is_an_invalid_input_not_a_type_error(label):
    with pytest.raises(InvalidInputError, match="text"):
        checks.as_label(label)
    with pytest.raises(InvalidInputError, match="text"):
        checks.labels_for(label, 1)


def test_the_label_rule_keeps_folder_paths_and_any_script():
    assert checks.as_labels(GOOD_LABELS) == GOOD_LABELS
    assert checks.labels_for("Latin/character07", 3) == ["Latin/character07"] * 3
    assert checks.labels_for(("a", "b"), 2) == ["a", "b"]
    with pytest.raises(InvalidInputError, match="2 images but 3 labels"):
        checks.labels_for(["a", "b", "c"], 2)


@pytest.fixture()
def vector_index(encoder_dir, tmp_path):
    db = SiameseDB.create(tmp_path / "index", encoder=encoder_dir, device="cpu")
    db.add_vectors(unit_rows(2, seed=1), ["kept", "kept"])
    yield db
    db.close()


@pytest.mark.parametrize("label", ["a\nb", "a/../b", "..", "/abs"])
def test_add_vectors_refuses_a_bad_label_before_storing_anything(vector_index, label):
    with pytest.raises(InvalidInputError, match="label"):
        vector_index.add_vectors(unit_rows(3, seed=2), ["ok", label, "ok"])
    assert len(vector_index) == 2 and vector_index.label_counts() == {"kept": 2}


def test_add_refuses_a_bad_label_and_a_missing_one_with_named_errors(vector_index):
    image = draw_shape(0, 1)
    with pytest.raises(InvalidInputError, match="control character"):
        vector_index.add([image], label="x\ny")
    with pytest.raises(InvalidInputError, match="'.' or '..'"):
        vector_index.add(image, label="../up")
    with pytest.raises(InvalidInputError, match="text"):  # was a bare TypeError (issue 29 item 11)
        vector_index.add([image], label=None)
    assert len(vector_index) == 2


def test_a_folder_build_skips_files_whose_label_breaks_the_rule_naming_each(encoder_dir, tmp_path):
    root = tmp_path / "folder"
    (root / "good").mkdir(parents=True)
    draw_shape(0, 0).save(root / "good" / "0.png")
    draw_shape(1, 0).save(root / "line\nbreak.png")  # a root file: its stem is its label
    (root / "tab\tfolder").mkdir()
    draw_shape(2, 0).save(root / "tab\tfolder" / "0.png")
    draw_shape(3, 0).save(root / "back\\slash.png")
    db = SiameseDB.build(root, path=tmp_path / "index", encoder=encoder_dir, device="cpu")
    try:
        report = db.last_report
        assert db.label_counts() == {"good": 1}
        skipped = {Path(path).relative_to(root).as_posix(): reason for path, reason in report.skipped}
        # Printed on one line each: the control characters of a path are escaped.
        assert set(skipped) == {"line\\nbreak.png", "tab\\tfolder/0.png", "back\\slash.png"}, skipped
        assert all(reason.startswith("label ") and "\n" not in reason for reason in skipped.values()), skipped
        assert report.scanned == 4 and report.added == 1
    finally:
        db.close()


def test_the_cli_add_refuses_a_bad_label_in_one_line(encoder_dir, tmp_path):
    index = tmp_path / "index"
    SiameseDB.create(index, encoder=encoder_dir, device="cpu").close()
    image = tmp_path / "q.png"
    draw_shape(0, 2).save(image)
    for label in ("a/../b", "two\nlines"):
        result = run_cli("add", image, "--index", index, "--label", label, "--device", "cpu")
        assert result.exit_code == 1, result.output
        assert "label" in result.output and len(result.output.strip().splitlines()) == 1, result.output
    with SiameseDB.open(index, device="cpu") as db:
        assert len(db) == 0


# ---------------------------------------------------------------------------------------- HTTP

pytest.importorskip("fastapi", reason="the serve extra (fastapi, uvicorn, python-multipart) is not installed")
pytest.importorskip("httpx", reason="httpx (FastAPI's TestClient) is not installed")

from fastapi.testclient import TestClient  # noqa: E402

from siamesedb.serve import create_app  # noqa: E402

PNG = {"Content-Type": "image/png"}


@pytest.fixture(scope="module")
def shapes_index(drawn_shapes, encoder_dir, tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("http") / "shapes"
    SiameseDB.build(drawn_shapes, path=path, encoder=encoder_dir, device="cpu").close()
    return path


@pytest.fixture()
def client(shapes_index, tmp_path, monkeypatch):
    copy = tmp_path / "index"
    shutil.copytree(shapes_index, copy)
    monkeypatch.chdir(tmp_path)
    with TestClient(create_app(Path("index"), device="cpu")) as test_client:  # a relative index path
        yield test_client


def test_post_items_answers_the_path_get_items_gives_and_says_when_nothing_was_added(client):
    body = png_bytes(draw_shape(2, 4))  # variants 0-3 are indexed already
    first = client.post("/items?label=line", content=body, headers=PNG)
    assert first.status_code == 200, first.text
    answer = first.json()
    [item_id], [path] = answer["ids"], answer["paths"]
    assert answer["added"] == 1 and answer["already_stored"] == 0  # counts, as `siamesedb add --json` gives them
    assert Path(path).is_absolute()
    assert client.get(f"/items/{item_id}").json()["path"] == path
    items = client.get("/info").json()["items"]
    again = client.post("/items?label=line", content=body, headers=PNG)
    assert again.status_code == 200, again.text
    assert again.json()["ids"] == [item_id] and again.json()["paths"] == [path]
    assert again.json()["added"] == 0 and again.json()["already_stored"] == 1
    assert client.get("/info").json()["items"] == items


@pytest.mark.parametrize("label", ["a/../b", "..", "two\nlines", "/etc", "a//b", "nul\x00"])
def test_post_items_refuses_a_bad_label_with_422_and_writes_nothing(client, label):
    before = client.get("/info").json()["items"]
    response = client.post("/items", params={"label": label}, content=png_bytes(draw_shape(0, 4)), headers=PNG)
    assert response.status_code == 422, response.text
    assert "label" in response.json()["detail"]
    assert client.get("/info").json()["items"] == before
    assert not list((Path("index") / "uploads").glob("*.png"))  # no orphan upload either


@pytest.mark.parametrize("value", ["nan", "inf", "-inf"])
def test_http_verify_refuses_a_threshold_that_is_no_finite_number(client, value):
    response = client.post(f"/verify?label=line&threshold={value}", content=png_bytes(draw_shape(2, 1)), headers=PNG)
    assert response.status_code == 422, response.text
    assert "threshold" in response.json()["detail"]


@pytest.mark.parametrize("k", ["1001", str(10**12), str(10**30)])
def test_http_k_over_the_cap_is_a_clean_422(client, k):
    for endpoint in ("/search", "/classify?method=knn&"):
        url = f"{endpoint}{'&' if '?' in endpoint else '?'}k={k}".replace("&&", "&")
        response = client.post(url, content=png_bytes(draw_shape(1, 1)), headers=PNG)
        assert response.status_code == 422, (url, response.text)
        assert "k" in response.json()["detail"]


def test_http_search_on_a_euclidean_index_gives_the_distance_as_the_cli_does(tmp_path):
    import torch

    from siamesedb.encoder import Encoder, EncoderConfig

    torch.manual_seed(0)
    encoder = Encoder(EncoderConfig(backbone="mlp", embedding_dim=16, metric="euclidean"))
    images = [draw_shape(kind, v) for kind in range(3) for v in range(2)]
    with SiameseDB.create(tmp_path / "l2", encoder=encoder, device="cpu") as db:
        db.add(images, [f"c{i // 2}" for i in range(len(images))])
        expected = [h.to_dict() for h in db.search(draw_shape(0, 3), k=3)]
    assert all("distance" in hit for hit in expected)
    with TestClient(create_app(tmp_path / "l2", device="cpu")) as client:
        response = client.post("/search?k=3", content=png_bytes(draw_shape(0, 3)), headers=PNG)
    assert response.status_code == 200, response.text
    hits = response.json()["hits"]
    assert [h["id"] for h in hits] == [h["id"] for h in expected]
    for got, want in zip(hits, expected):
        assert got["distance"] == pytest.approx(want["distance"], rel=1e-5)
        assert got["score"] == pytest.approx(-got["distance"], rel=1e-5)


def test_http_search_on_a_cosine_index_has_no_distance_field(client):
    response = client.post("/search?k=2", content=png_bytes(draw_shape(1, 2)), headers=PNG)
    assert response.status_code == 200, response.text
    assert all(set(hit) == {"id", "label", "path", "score"} for hit in response.json()["hits"])
