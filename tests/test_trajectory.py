"""siamesedb/trajectory.py and tools/render_signatures.py: SVC2004 pen trajectories parsed, drawn like the PNG set,
varied for training, and the test writers (U31-U40) refused."""

from __future__ import annotations

import importlib.util
import zipfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from siamesedb import trajectory as T

from helpers import SVC2004_PNG as PNG_ZIP  # tests/helpers.py
from helpers import SVC2004_RAW as RAW
from helpers import needs, require

REPO = Path(__file__).resolve().parent.parent
needs_raw = needs(RAW)


def _tool():
    spec = importlib.util.spec_from_file_location("render_signatures", REPO / "tools" / "render_signatures.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _synthetic() -> T.Trajectory:
    """Two pen-down strokes (a wave and a bar) with a pen lift between, recorded every 10 ms, y up."""
    u = np.linspace(0, 1, 60)
    x = np.concatenate([1000 + 3000 * u, [4200], 4500 + 1500 * u[:20]])
    y = np.concatenate([3000 + 800 * np.sin(u * 6 * np.pi), [3500], np.full(20, 2600.0)])
    pen = np.concatenate([np.ones(60), [0], np.ones(20)]).astype(bool)
    n = len(x)
    return T.Trajectory(x=x, y=y, t=np.arange(n) * 10.0, pen=pen, azimuth=np.full(n, 1200.0),
                        altitude=np.full(n, 600.0), pressure=200 + 300 * np.abs(np.sin(np.arange(n) / 7)))


def _ink_box(image: np.ndarray) -> tuple[int, int, int, int]:
    ys, xs = np.nonzero(image < 128)
    return int(xs.min()), int(xs.max()), int(ys.min()), int(ys.max())


def test_parse_txt_reads_points_and_checks_the_count():
    text = "3\n10 20 100 0 1000 500 0\n11 22 110 1 1010 510 300\n12 25 120 1 1020 520 310\n"
    traj = T.parse_txt(text)
    assert len(traj) == 3
    assert traj.x.tolist() == [10, 11, 12] and traj.y.tolist() == [20, 22, 25]
    assert traj.pen.tolist() == [False, True, True] and traj.pressure[2] == 310
    with pytest.raises(ValueError, match="header says 4"):
        T.parse_txt(text.replace("3\n", "4\n", 1))
    with pytest.raises(ValueError):
        T.parse_txt("2\n1 2 3\n4 5 6\n")


@needs_raw
def test_parse_a_real_file_from_the_zip():
    with zipfile.ZipFile(RAW) as zf:
        name = next(m for m in zf.namelist() if m.endswith("/U1S1.TXT"))
        text = zf.read(name).decode()
        traj = T.read_zip(zf, "U01", 1)
    assert len(traj) == int(text.split()[0]) > 10
    assert traj.pen.any() and not traj.pen.all()  # pen lifts are recorded
    assert np.all(np.diff(traj.t) >= 0)  # time runs forward
    assert traj.pressure[traj.pen].max() > 0


def test_render_shape_dtype_polarity():
    image = T.render(_synthetic())
    assert image.shape == (128, 256) and image.dtype == np.uint8
    assert set(np.unique(image).tolist()) <= {0, 255}
    ink = (image == 0).mean()
    assert 0.003 < ink < 0.2  # black strokes on a mostly white page
    assert image[0].min() == 255 and image[:, 0].min() == 255  # the 8-px margin stays white
    x0, x1, y0, y1 = _ink_box(image)
    assert x0 <= 10 and x1 >= 245  # the wide signature fills the width
    # y grows upwards on the tablet: the bar (low y) is drawn in the lower half of the image
    assert _ink_box(image[:, 200:])[3] > 64
    # no ink between the strokes' ends where the pen was lifted: the lift point itself is not drawn
    assert T.render(_synthetic(), pen_width=3).shape == (128, 256)


@needs_raw
def test_plain_render_matches_the_png_set(tmp_path):
    with zipfile.ZipFile(require(PNG_ZIP)) as zf:
        name = next(m for m in zf.namelist() if m.endswith("U05/genuine/U05S03.png"))
        (tmp_path / "p.png").write_bytes(zf.read(name))
    png = np.asarray(Image.open(tmp_path / "p.png").convert("L"))
    mine = T.render(T.read_zip(RAW, 5, 3))
    assert mine.shape == png.shape
    a, b = mine < 128, png < 128
    assert (a & b).sum() / (a | b).sum() > 0.95


def test_augmentation_changes_pixels_but_keeps_a_plausible_ink_box():
    traj = _synthetic()
    plain = T.render(traj)
    rng = np.random.default_rng(0)
    px0, px1, py0, py1 = _ink_box(plain)
    variants = [T.render_augmented(traj, rng) for _ in range(6)]
    for v in variants:
        assert v.shape == plain.shape and v.dtype == np.uint8
        assert set(np.unique(v).tolist()) <= {0, 255}
        assert (v != plain).mean() > 0.002  # really different
        x0, x1, y0, y1 = _ink_box(v)
        assert x0 >= 1 and x1 <= 254 and y0 >= 1 and y1 <= 126  # inside the frame
        assert (x1 - x0) > 0.75 * (px1 - px0) and (y1 - y0) > 0.6 * (py1 - py0)  # same signature's extent
        ink, plain_ink = (v == 0).sum(), (plain == 0).sum()
        assert 0.3 * plain_ink < ink < 3 * plain_ink
    assert len({v.tobytes() for v in variants}) == len(variants)
    # strength 0 is the identity on the trajectory
    assert T.perturb(traj, rng, 0.0) is traj
    # the pen lift survives: perturbed copies keep two pen-down strokes
    assert len(T._runs(T.perturb(traj, rng).pen)) == 2


def test_pressure_driven_width_thickens_strokes():
    traj = _synthetic()
    thin = T.render(traj, pen_width=1.5)
    thick = T.render(traj, pen_width=3.5)
    pressured = T.render(traj, pen_width=2.5, pressure_width=1.0)
    assert (thick == 0).sum() > 1.5 * (thin == 0).sum()
    assert not np.array_equal(pressured, T.render(traj, pen_width=2.5))


def test_test_writers_are_refused(tmp_path):
    assert T.check_training_writer("U30") == 30 and T.check_training_writer(1) == 1
    for writer in ("U31", "U40", 35, "u33"):
        with pytest.raises(T.TestWriterError):
            T.check_training_writer(writer)
    with pytest.raises(T.TestWriterError):
        T.read_zip(tmp_path / "never-opened.zip", "U31", 1)  # refused before any file is read
    tool = _tool()
    assert tool.parse_writers("U01-U03,U05") == [1, 2, 3, 5]
    for spec in ("U25-U31", "U31", "U01,U40"):
        with pytest.raises(T.TestWriterError):
            tool.parse_writers(spec)
    with pytest.raises(T.TestWriterError):
        tool.render_folder(tmp_path / "x.zip", tmp_path / "out", [31], 1)
    with pytest.raises(SystemExit):
        tool.main(["--out", str(tmp_path / "out"), "--writers", "U29-U32"])
    assert not (tmp_path / "out").exists()


@needs_raw
def test_tool_writes_the_png_layout(tmp_path):
    tool = _tool()
    assert tool.main(["--raw", str(RAW), "--out", str(tmp_path / "r"), "--writers", "U02", "--renders", "1"]) == 0
    genuine = sorted((tmp_path / "r" / "U02" / "genuine").glob("*.png"))
    forged = sorted((tmp_path / "r" / "U02" / "forged").glob("*.png"))
    assert len(genuine) == 20 and len(forged) == 20
    assert genuine[0].name == "U02S01_r1.png" and forged[0].name == "U02S21_r1.png"
    image = Image.open(genuine[0])
    assert image.mode == "L" and image.size == (256, 128)
    with pytest.raises(SystemExit):  # generated data stays outside the repository
        tool.main(["--raw", str(RAW), "--out", str(REPO / "runs" / "rendered-test"), "--writers", "U02"])
