"""Pictures: the PCA behind the embedding map, which classes a map draws, the PNGs written by plots.py, and the CLI
options that write them (`query/classify --sheet`, `plot-map`, `eval oneshot --plots`) without disturbing --json.
Also: progress bars appear on stderr for long commands, never with --quiet or in --json output."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from siamesedb.errors import InvalidInputError, UnknownLabelError
from siamesedb.plots import Tile, choose_classes, contact_sheet, embedding_map, oneshot_accuracy, pca_2d

from helpers import draw_shape as draw  # tests/helpers.py
from helpers import run_cli as run


@pytest.fixture(scope="module")
def index_dir(drawn_shapes, tmp_path_factory) -> Path:
    from siamesedb.db import SiameseDB

    path = tmp_path_factory.mktemp("index") / "shapes"
    SiameseDB.build(drawn_shapes, path=path, device="cpu").close()
    return path


def png_pixels(path: Path) -> np.ndarray:
    with Image.open(path) as image:
        assert image.format == "PNG"
        return np.asarray(image.convert("L"))


# ---------------------------------------------------------------------------------------------- the maths


def test_pca_of_a_plane_in_16_d_keeps_every_distance():
    rng = np.random.default_rng(0)
    plane = rng.normal(size=(50, 2)) * [3.0, 1.0]
    basis, _ = np.linalg.qr(rng.normal(size=(16, 2)))  # (16, 2) orthonormal columns
    vectors = plane @ basis.T + 5.0  # shifted: PCA must centre
    points, explained = pca_2d(vectors)
    assert points.shape == (50, 2)
    assert explained.sum() == pytest.approx(1.0, abs=1e-9) and explained[0] > explained[1] > 0.05

    def distances(x):
        return np.linalg.norm(x[:, None, :] - x[None, :, :], axis=-1)

    np.testing.assert_allclose(distances(points), distances(plane), atol=1e-9)
    assert np.abs(points.mean(axis=0)).max() < 1e-9


def test_pca_of_one_or_identical_vectors_is_zero_not_nan():
    assert np.array_equal(pca_2d(np.ones((1, 8)))[0], np.zeros((1, 2)))
    points, explained = pca_2d(np.ones((5, 8)))
    assert np.isfinite(points).all() and np.isfinite(explained).all()


def test_a_map_draws_the_largest_classes_or_the_ones_named():
    labels = ["a"] * 5 + ["b"] * 2 + ["c"] * 7 + ["d"] * 2 + ["e"] * 1
    assert choose_classes(labels, max_classes=3) == ["a", "b", "c"]  # b beats d on the name tie
    assert choose_classes(labels, max_classes=99) == ["a", "b", "c", "d", "e"]
    assert choose_classes(labels, classes=["e", "d", "e"]) == ["e", "d"]
    with pytest.raises(UnknownLabelError, match="'z'"):
        choose_classes(labels, classes=["a", "z"])
    with pytest.raises(InvalidInputError):
        choose_classes(labels, max_classes=0)


# ---------------------------------------------------------------------------------------------- the pictures


def test_embedding_map_png(tmp_path):
    rng = np.random.default_rng(1)
    centres = rng.normal(size=(6, 16))
    vectors = np.concatenate([c + 0.1 * rng.normal(size=(10, 16)) for c in centres]).astype(np.float32)
    labels = [f"class{i}" for i in range(6) for _ in range(10)]
    out = embedding_map(vectors, labels, tmp_path / "sub" / "map.png", max_classes=4)
    pixels = png_pixels(out)
    assert pixels.shape == (650, 900) and pixels.std() > 10
    with pytest.raises(InvalidInputError):
        embedding_map(np.empty((0, 16)), [], tmp_path / "empty.png")


def test_contact_sheet_lays_out_one_row_per_query_and_survives_missing_images(tmp_path):
    query = tmp_path / "q.png"
    draw(1, 7).save(query)
    hit_files = []
    for v in range(3):
        hit_files.append(tmp_path / f"h{v}.png")
        draw(1, v).save(hit_files[-1])
    hits = [Tile(str(p), f"round/square\n{0.9 - i / 10:.3f}") for i, p in enumerate(hit_files)]
    rows = [(Tile(query, "query", colour="tab:blue"), hits),
            (Tile(query, "query"), [Tile(str(tmp_path / "gone.png"), "missing"), Tile(None, "no file")])]
    pixels = png_pixels(contact_sheet(rows, tmp_path / "sheet.png", title="t"))
    assert pixels.shape == (440, 680)  # 4 columns x 170 px, 2 rows x 200 px + 40 px of title
    query_tile = pixels[40:200, :170]
    assert (query_tile < 64).mean() > 0.01  # the drawn square is there, dark on white
    with pytest.raises(InvalidInputError):
        contact_sheet([], tmp_path / "none.png")


def test_oneshot_accuracy_png(tmp_path):
    accuracies = np.random.default_rng(2).choice([0.8, 0.9, 1.0], size=100)
    assert png_pixels(oneshot_accuracy(accuracies, 20, 1, tmp_path / "a.png")).shape == (380, 1000)
    with pytest.raises(InvalidInputError):
        oneshot_accuracy(np.empty(0), 20, 1, tmp_path / "b.png")


# ---------------------------------------------------------------------------------------------- the CLI


def test_query_and_classify_sheets_keep_json_clean(index_dir, drawn_shapes, tmp_path):
    query = tmp_path / "new-square.png"
    draw(1, 7).save(query)
    result = run("query", query, "--index", index_dir, "-k", "3", "--json", "--sheet", tmp_path / "q.png")
    assert result.exit_code == 0
    hits = json.loads(result.stdout)[0]["hits"]  # stdout is the JSON document alone
    assert len(hits) == 3 and "wrote" in result.stderr
    assert png_pixels(tmp_path / "q.png").shape == (240, 680)  # one query: 1 + 3 columns of 170 px, 200 px + title
    result = run("classify", query, query, "--index", index_dir, "--json", "--sheet", tmp_path / "c.png", "--top", "2")
    assert result.exit_code == 0 and len(json.loads(result.stdout)) == 2
    assert png_pixels(tmp_path / "c.png").shape == (440, 510)  # 2 queries, 1 + 2 columns


def test_plot_map_and_eval_plots(index_dir, drawn_shapes, tmp_path):
    result = run("plot-map", "--index", index_dir, "--out", tmp_path / "map.png", "--max-classes", "3")
    assert result.exit_code == 0 and png_pixels(tmp_path / "map.png").shape == (650, 900)
    bad = run("plot-map", "--index", index_dir, "--out", tmp_path / "x.png", "--class", "hexagon")
    assert bad.exit_code == 1 and "hexagon" in bad.output
    result = run("eval", "oneshot", drawn_shapes, "--way", "3", "--episodes", "20", "--plots", tmp_path / "plots",
                 "--json", "--device", "cpu")
    assert result.exit_code == 0
    document = json.loads(result.stdout)
    assert document["plots"] == {"oneshot": str(tmp_path / "plots" / "oneshot.png")}
    assert png_pixels(tmp_path / "plots" / "oneshot.png").shape == (380, 1000)


def test_progress_bars_on_stderr_never_with_quiet_or_json(drawn_shapes, tmp_path):
    def build(*flags):
        return run("build", drawn_shapes, "--index", tmp_path / f"i{len(flags)}{'-'.join(flags)}", "--device", "cpu", *flags)

    plain, quiet, as_json = build(), build("--quiet"), build("--json")
    assert plain.exit_code == quiet.exit_code == as_json.exit_code == 0
    assert "build: 100%" in plain.stderr and "16/16" in plain.stderr
    assert "build:" not in quiet.stderr and "%" not in quiet.stderr
    assert "build:" not in as_json.stderr and json.loads(as_json.stdout)["added"] == 16
