"""SVC2004 pen trajectories: parse the raw `UxSy.TXT` files, draw them as the offline images of `svc2004_png.zip`, and
draw varied copies of them (pen width, pressure-driven width, small shape and timing perturbations) to synthesise
more training images.

Only the *training* writers' trajectories may be used this way (the dataset's protocol: U01-U30 train, U31-U40 are
the unseen test writers, who stay images only): `check_training_writer` refuses a writer id >= TEST_WRITERS_FROM and
`read_zip` calls it, so a test writer's trajectory cannot be read through this module.

The plain render (`render(traj)`) reproduces the provided PNGs: the bounding box of every recorded point (pen up
included) fitted into 256x128 with an 8-px margin, centred, y flipped (the tablet's y grows upwards), pen-down runs
drawn as 2-px black polylines on white: 1,117 of the training writers' 1,200 signatures match their PNG pixel for
pixel and 1,189 overlap it by more than 95% (intersection over union; a few PNGs lack a trailing stroke). Numpy and
Pillow only.

Measured on SVC2004 (BENCHMARKS.md, "Signatures: re-rendered pen trajectories"): training on PNGs plus four renders
per signature did not beat training on the PNGs alone, so no recipe uses these renders.
"""

from __future__ import annotations

import os
import re
import zipfile
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

WIDTH, HEIGHT, MARGIN, PEN_WIDTH = 256, 128, 8, 2  # the geometry of svc2004_png.zip's images
TEST_WRITERS_FROM = 31  # U31-U40 are the protocol's unseen test writers: never read their trajectories
GENUINE_MAX = 20  # S1-S20 genuine, S21-S40 skilled forgeries


class TestWriterError(ValueError):
    """A trajectory of a test writer (U31 or later) was asked for: only training writers may be re-rendered."""

    __test__ = False  # not a pytest class


@dataclass(frozen=True)
class Trajectory:
    """One signature as recorded: per point x, y (tablet units, y up), time (ms), pen down, azimuth, altitude,
    pressure; all float64 arrays of the same length."""

    x: np.ndarray
    y: np.ndarray
    t: np.ndarray
    pen: np.ndarray  # bool
    azimuth: np.ndarray
    altitude: np.ndarray
    pressure: np.ndarray

    def __len__(self) -> int:
        return len(self.x)


def parse_txt(text: str | bytes) -> Trajectory:
    """The content of a `UxSy.TXT` file: first line the point count, then `x y time pen azimuth altitude pressure`."""
    if isinstance(text, bytes):
        text = text.decode("ascii", errors="replace")
    lines = [ln for ln in text.strip().splitlines() if ln.strip()]
    if not lines:
        raise ValueError("empty trajectory file")
    try:
        count = int(lines[0].split()[0])
        rows = np.asarray([[float(v) for v in ln.split()[:7]] for ln in lines[1:]], dtype=np.float64)
    except (ValueError, IndexError) as exc:
        raise ValueError(f"not an SVC2004 trajectory file ({exc})") from None
    if rows.ndim != 2 or rows.shape[1] != 7 or len(rows) == 0:
        raise ValueError("not an SVC2004 trajectory file: expected 7 numbers per point")
    if count != len(rows):
        raise ValueError(f"header says {count} points, the file holds {len(rows)}")
    return Trajectory(x=rows[:, 0], y=rows[:, 1], t=rows[:, 2], pen=rows[:, 3] > 0, azimuth=rows[:, 4],
                      altitude=rows[:, 5], pressure=rows[:, 6])


def writer_number(writer: str | int) -> int:
    """`U07`, `7` or 7 -> 7."""
    match = re.fullmatch(r"[Uu]?0*(\d+)", str(writer).strip())
    if not match:
        raise ValueError(f"not a writer id: {writer!r}")
    return int(match.group(1))


def check_training_writer(writer: str | int) -> int:
    """The writer's number if it is a training writer (U01-U30); TestWriterError for U31 and later."""
    n = writer_number(writer)
    if n >= TEST_WRITERS_FROM:
        raise TestWriterError(f"U{n:02d} is a test writer (U{TEST_WRITERS_FROM}-U40): its pen trajectories must not "
                              "be used; only training writers U01-U30 may be re-rendered")
    if n < 1:
        raise ValueError(f"not a writer id: {writer!r}")
    return n


def read_zip(archive: str | os.PathLike | zipfile.ZipFile, writer: str | int, signature: int) -> Trajectory:
    """Signature `signature` (1-40) of a *training* writer from svc2004_task2_raw.zip (members `Task2/UxSy.TXT`)."""
    n = check_training_writer(writer)
    name = f"U{n}S{int(signature)}.TXT"
    zf = archive if isinstance(archive, zipfile.ZipFile) else zipfile.ZipFile(archive)
    try:
        members = [m for m in zf.namelist() if m.rsplit("/", 1)[-1].upper() == name.upper()]
        if not members:
            raise KeyError(f"{name} not in the archive")
        return parse_txt(zf.read(members[0]))
    finally:
        if zf is not archive:
            zf.close()


def _fit(traj: Trajectory, width: int, height: int, margin: float) -> tuple[np.ndarray, np.ndarray]:
    """Image coordinates of every point: the bounding box of all points fitted into the frame, centred, y flipped."""
    x0, x1, y0, y1 = traj.x.min(), traj.x.max(), traj.y.min(), traj.y.max()
    scale = min((width - 2 * margin) / max(x1 - x0, 1e-9), (height - 2 * margin) / max(y1 - y0, 1e-9))
    px = (traj.x - (x0 + x1) / 2) * scale + width / 2
    py = height - ((traj.y - (y0 + y1) / 2) * scale + height / 2)
    return px, py


def _runs(pen: np.ndarray) -> list[tuple[int, int]]:
    """[start, end) of each run of pen-down points."""
    edges = np.diff(np.concatenate([[0], pen.astype(np.int8), [0]]))
    return list(zip(np.flatnonzero(edges == 1).tolist(), np.flatnonzero(edges == -1).tolist()))


def render(traj: Trajectory, width: int = WIDTH, height: int = HEIGHT, margin: float = MARGIN,
           pen_width: float = PEN_WIDTH, pressure_width: float = 0.0, supersample: int = 4) -> np.ndarray:
    """(height, width) uint8, black (0) pen-down strokes on white (255), binary like the PNG set.

    The defaults draw exactly as svc2004_png.zip was drawn. `pen_width` (px, may be fractional) and
    `pressure_width` (0: constant width; 1: width from 0.5x to 1.5x `pen_width` with the point's pressure relative
    to the signature's own pressure range) vary the stroke; fractional or varying widths are drawn `supersample` times
    larger and reduced, then thresholded back to black and white.
    """
    px, py = _fit(traj, width, height, margin)
    plain = pressure_width == 0.0 and float(pen_width).is_integer()
    if plain:
        image = Image.new("L", (width, height), 255)
        draw = ImageDraw.Draw(image)
        for a, b in _runs(traj.pen):
            points = list(zip(px[a:b].tolist(), py[a:b].tolist()))
            draw.line(points * 2 if len(points) == 1 else points, fill=0, width=int(pen_width))
        return np.asarray(image, dtype=np.uint8)
    ss = int(supersample)
    image = Image.new("L", (width * ss, height * ss), 255)
    draw = ImageDraw.Draw(image)
    p = traj.pressure[traj.pen] if traj.pen.any() else traj.pressure
    lo, hi = float(p.min()), float(p.max())
    rel = np.clip((traj.pressure - lo) / (hi - lo), 0.0, 1.0) if hi > lo else np.full(len(traj), 0.5)
    widths = np.maximum(pen_width * (1.0 + pressure_width * (rel - 0.5)), 0.5) * ss
    X, Y = px * ss, py * ss
    for a, b in _runs(traj.pen):
        for i in range(a, b):
            r = widths[i] / 2
            draw.ellipse([X[i] - r, Y[i] - r, X[i] + r, Y[i] + r], fill=0)  # round joints and caps
            if i + 1 < b:
                w = max(1, int(round((widths[i] + widths[i + 1]) / 2)))
                draw.line([(X[i], Y[i]), (X[i + 1], Y[i + 1])], fill=0, width=w)
    small = image.resize((width, height), Image.BOX)
    return np.where(np.asarray(small) < 128, 0, 255).astype(np.uint8)


def _smooth_noise(rng: np.random.Generator, n: int, scale: float, correlation: float) -> np.ndarray:
    """A smooth random curve of n values (a random walk low-passed over about `correlation` points), std ~ scale."""
    if n < 2 or scale == 0:
        return np.zeros(n)
    k = max(1, int(correlation))
    raw = rng.normal(size=n + 2 * k)
    kernel = np.hanning(2 * k + 1)
    smooth = np.convolve(raw, kernel / kernel.sum(), mode="same")[k:k + n]
    return smooth / (smooth.std() + 1e-12) * scale


def perturb(traj: Trajectory, rng: np.random.Generator, strength: float = 1.0) -> Trajectory:
    """A varied copy: small affine change (rotation up to 4 deg, shear up to 0.1, x/y stretch up to 8%), a smooth
    displacement along the pen path (about 1% of the signature's height), and a timing perturbation (the points
    re-sampled at a randomly warped time, slightly more or fewer of them, then a light smoothing), all scaled by
    `strength` (0 returns the trajectory unchanged)."""
    if strength == 0 or len(traj) < 3:
        return traj
    s = float(strength)
    x, y, t = traj.x.astype(np.float64), traj.y.astype(np.float64), traj.t.astype(np.float64)
    # Timing: each pen-down run re-sampled at a monotone random warp of its own time axis, with slightly more or
    # fewer points; pen-up points are kept, so strokes never join across a pen lift.
    n = len(traj)
    idx = np.arange(n, dtype=np.float64)
    factor = 1 + rng.uniform(-0.15, 0.15) * s
    smooth = rng.random() < 0.5
    pieces: list[np.ndarray] = []  # fractional source positions, in order
    down: list[np.ndarray] = []
    cursor = 0
    for a, b in _runs(traj.pen) + [(n, n)]:
        if a > cursor:  # pen-up points before this run, unchanged
            pieces.append(idx[cursor:a])
            down.append(np.zeros(a - cursor, dtype=bool))
        if b > a:
            k = b - a
            if k >= 3:
                warp = np.cumsum(np.exp(_smooth_noise(rng, k, 0.25 * s, k / 6)))
                warp = (warp - warp[0]) / max(warp[-1] - warp[0], 1e-12) * (k - 1)
                mk = max(2, int(round(k * factor)))
                at = a + np.interp(np.linspace(0, k - 1, mk), np.arange(k, dtype=np.float64), warp)
            else:
                at = idx[a:b]
            pieces.append(at)
            down.append(np.ones(len(at), dtype=bool))
        cursor = b
    at = np.concatenate(pieces)
    pen = np.concatenate(down)
    m = len(at)
    xi, yi = np.interp(at, idx, x), np.interp(at, idx, y)  # inside a run: between its own points only
    if smooth:  # light smoothing within pen-down runs
        for a, b in _runs(pen):
            if b - a >= 3:
                for arr in (xi, yi):
                    seg = arr[a:b].copy()
                    arr[a + 1:b - 1] = 0.25 * seg[:-2] + 0.5 * seg[1:-1] + 0.25 * seg[2:]
    nearest = np.clip(np.rint(at).astype(int), 0, n - 1)
    # Shape: smooth displacement along the path, about 1% of the signature's height
    height = max(np.ptp(yi), 1e-9)
    xi = xi + _smooth_noise(rng, m, 0.01 * height * s, m / 10)
    yi = yi + _smooth_noise(rng, m, 0.01 * height * s, m / 10)
    # Affine: rotation, shear, stretch about the centre
    angle = np.radians(rng.uniform(-4, 4) * s)
    shear = rng.uniform(-0.1, 0.1) * s
    sx, sy = 1 + rng.uniform(-0.08, 0.08) * s, 1 + rng.uniform(-0.08, 0.08) * s
    cx, cy = xi.mean(), yi.mean()
    u, v = xi - cx, yi - cy
    u, v = u + shear * v, v
    c, si = np.cos(angle), np.sin(angle)
    u, v = c * u - si * v, si * u + c * v
    return replace(traj, x=u * sx + cx, y=v * sy + cy, t=np.interp(at, idx, t), pen=pen,
                   azimuth=traj.azimuth[nearest], altitude=traj.altitude[nearest],
                   pressure=np.interp(at, idx, traj.pressure))


def render_augmented(traj: Trajectory, rng: np.random.Generator, strength: float = 1.0) -> np.ndarray:
    """`perturb` the trajectory, then draw it with a random pen (1.2-3.2 px wide at 256x128; half the time the width
    follows the pressure). Same frame and polarity as `render`."""
    varied = perturb(traj, rng, strength)
    pen_width = float(np.clip(PEN_WIDTH + rng.uniform(-0.8, 1.2) * strength, 1.0, 4.0))
    pressure_width = float(rng.uniform(0.5, 1.2)) if rng.random() < 0.5 else 0.0
    return render(varied, pen_width=pen_width, pressure_width=pressure_width)


def save_png(array: np.ndarray, path: str | os.PathLike) -> None:
    Image.fromarray(array, mode="L").save(Path(path))
