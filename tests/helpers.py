"""Plain helpers the test files call with arguments: where the real data lies, a CLI runner, tiny encoders, images.

Fixtures built on these live in conftest.py. Importing this module stays cheap (no torch, no faiss): the torch
imports sit inside the functions that need them, so test files that never build an encoder start quickly.
"""

from __future__ import annotations

import io
import os
import socket
import zipfile
from collections.abc import Callable
from pathlib import Path
from typing import NoReturn

import numpy as np
import pytest
from click.testing import CliRunner, Result
from PIL import Image, ImageDraw

# The real archives sit in ../shared/data beside the checkout, or wherever SIAMESEDB_DATA points (the package's own
# default_data_root() honours the same variable). Without them the tests that need them skip, or fail under CI=true.
CHECKOUT_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
SHARED_DATA = Path(os.environ.get("SIAMESEDB_DATA") or CHECKOUT_DATA).resolve()
OMNIGLOT_EVALUATION = SHARED_DATA / "omniglot" / "images_evaluation.zip"
OMNIGLOT_BACKGROUND = SHARED_DATA / "omniglot" / "images_background.zip"
SVC2004_PNG = SHARED_DATA / "signatures_svc2004" / "svc2004_png.zip"
SVC2004_RAW = SHARED_DATA / "signatures_svc2004" / "svc2004_task2_raw.zip"  # the pen trajectories
PROVIDE_DATA = ("put the official archives in ../shared/data beside the checkout (layout: that folder's README) or "
                "set SIAMESEDB_DATA to a folder holding them")

TINY_DIM = 16  # vector length of the tiny encoders
SHAPE_NAMES = ["round/circle", "round/square", "line", "triangle"]  # the classes of `drawn_shapes`, nested labels


def in_ci() -> bool:
    """True when the environment says this is CI (CI=true, as CI services set it; also 1 / yes): there a missing
    resource the suite needs (the real data, the browser) fails its tests instead of skipping them."""
    return os.environ.get("CI", "").strip().lower() in {"true", "1", "yes"}


def missing(what: str, how: str) -> NoReturn:
    """A resource the calling test or fixture needs is absent: fail under CI=true, skip otherwise. `what` names it,
    `how` says how to provide it."""
    if in_ci():
        pytest.fail(f"{what}, and CI=true requires it: {how}", pytrace=False)
    pytest.skip(f"{what} (fails under CI=true): {how}")


def needs(path: Path) -> pytest.MarkDecorator:
    """Mark a test as needing `path` of the real data: when that file or folder is absent, conftest.py skips the
    test naming it (outside CI) or fails it (CI=true), before any of its fixtures run."""
    return pytest.mark.real_data(Path(path))


def require(path: Path) -> Path:
    """`path`, or (when that real data is absent) skip the calling test or fixture naming it; fail under CI=true."""
    if not Path(path).exists():
        missing(f"{path} not present (real data absent)", PROVIDE_DATA)
    return path


def run_cli(*args: object) -> Result:
    """`siamesedb ARGS...` in-process; arguments may be paths or numbers. Exceptions propagate, to show tracebacks."""
    from siamesedb.cli import cli

    return CliRunner().invoke(cli, [str(a) for a in args], catch_exceptions=False)


def tiny_encoder(seed: int = 0, size: int = 28):
    """A randomly initialised conv4 Encoder (TINY_DIM-d cosine vectors, width 8, size x size grey input, dark ink
    inverted), seeded by `seed`: fast, deterministic, and meaningless as a recogniser. For index mechanics only."""
    import torch

    from siamesedb.data import Preprocessing
    from siamesedb.encoder import Encoder, EncoderConfig

    torch.manual_seed(seed)
    preprocessing = Preprocessing(size=(size, size))
    return Encoder(EncoderConfig(backbone="conv4", embedding_dim=TINY_DIM, width=8, preprocessing=preprocessing))


def save_tiny_encoder(folder: Path, seed: int = 0) -> Path:
    """Save `tiny_encoder(seed)` to `folder` (config.json + weights) and return the folder."""
    tiny_encoder(seed).save(folder)
    return folder


def unit_rows(n: int, seed: int, dim: int = TINY_DIM) -> np.ndarray:
    """(n, dim) float32 random Gaussian rows, each L2-normalised: vectors as a cosine encoder would give them."""
    x = np.random.default_rng(seed).normal(size=(n, dim)).astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def draw_shape(kind: int, variant: int, size: int = 48) -> Image.Image:
    """A dark shape on white: `kind` picks the shape (0 ellipse, 1 rectangle, 2 line, 3 triangle), `variant` jitters
    it (variants 0..4 give distinct images, then they repeat)."""
    image = Image.new("L", (size, size), 255)
    pen = ImageDraw.Draw(image)
    o = variant % 5
    box = (6 + o, 6 + o, 38 + o, 38 - o)
    if kind == 0:
        pen.ellipse(box, outline=0, width=4)
    elif kind == 1:
        pen.rectangle(box, outline=0, width=4)
    elif kind == 2:
        pen.line((6 + o, 6, 40, 40 - o), fill=0, width=4)
    else:
        pen.polygon([(24, 4 + o), (6, 42), (42 - o, 42)], outline=0, width=4)
    return image


def png_bytes(image: Image.Image) -> bytes:
    """`image` encoded as a PNG file's bytes."""
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def unpack(target: Callable[[str, str, str, int], Path | None], alphabets: int = 2, characters: int = 10,
           drawers: int = 4) -> None:
    """Write the drawings 1..`drawers` of the first `characters` characters of the first `alphabets` alphabets
    (zip order) of the official Omniglot evaluation zip to `target(alphabet, character, filename, drawer)`, or skip
    one where it returns None. When the zip is absent: `require` (skip, or fail under CI=true)."""
    chosen: dict[str, list[str]] = {}
    with zipfile.ZipFile(require(OMNIGLOT_EVALUATION)) as archive:
        for name in sorted(archive.namelist()):
            parts = name.split("/")
            if len(parts) != 4 or not parts[3].endswith(".png"):
                continue
            _, alphabet, character, filename = parts
            if alphabet not in chosen and len(chosen) == alphabets:
                continue
            held = chosen.setdefault(alphabet, [])
            if character not in held:
                if len(held) == characters:
                    continue
                held.append(character)
            drawer = int(filename[-6:-4])
            where = target(alphabet, character, filename, drawer) if drawer <= drawers else None
            if where is not None:
                where.parent.mkdir(parents=True, exist_ok=True)
                where.write_bytes(archive.read(name))


def exported_items(db) -> dict[str, tuple[str, np.ndarray]]:
    """{path: (label, vector)} of every item of an open SiameseDB, through the public export (no path twice)."""
    import pyarrow.parquet as pq

    target = db.path.parent / f"{db.path.name}-export.parquet"
    db.export_vectors(target)
    table = pq.read_table(target).to_pydict()
    target.unlink()
    paths = table["path"]
    assert len(set(paths)) == len(paths), "a path stored twice"
    return {p: (label, np.asarray(v, dtype=np.float32)) for p, label, v in zip(paths, table["label"], table["vector"])}
