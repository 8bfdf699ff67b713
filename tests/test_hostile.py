"""Hostile images against whole builds and queries: each bad file is skipped (build) or refused (query) with one
line naming it and the reason; never a traceback, never a hang. Plus a hypothesis fuzz of the loader and encoder.

Loader-level cases (every format and mode, damaged files, bombs, FIFOs, EXIF) live in test_data.py; here the same
kinds of files go through `SiameseDB.build`, `add` and the CLI, where a single bad file must not stop the rest.
"""

from __future__ import annotations

import os
import re
import struct
import subprocess
import sys
import zlib
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image, ImageDraw

from siamesedb.cli import cli
from siamesedb.data import load_image
from siamesedb.db import SiameseDB
from siamesedb.errors import ImageLoadError, InvalidInputError

from helpers import png_bytes  # tests/helpers.py

ROOT = Path(__file__).resolve().parents[1]


def shape(kind: int, size: int = 32) -> Image.Image:
    image = Image.new("L", (size, size), 255)
    pen = ImageDraw.Draw(image)
    if kind % 2:
        pen.ellipse((4, 4, 26, 26 - kind), outline=0, width=3)
    else:
        pen.rectangle((5, 5, 25 - kind, 25), outline=0, width=3)
    return image


def bomb_png(side: int) -> bytes:
    """A PNG header declaring side x side pixels with no pixel data: judged by its declared size alone."""

    def chunk(kind: bytes, payload: bytes) -> bytes:
        return struct.pack(">I", len(payload)) + kind + payload + struct.pack(">I", zlib.crc32(kind + payload))

    ihdr = struct.pack(">IIBBBBB", side, side, 8, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"")) + chunk(b"IEND", b"")


# name -> expected reason in the skip line (None: an odd but valid image that must be indexed)
GOOD_ODDITIES = {
    "odd/animated.png": None,
    "odd/cmyk.tif": None,
    "odd/sixteen.png": None,
    "odd/alpha.png": None,
    "odd/palette.png": None,
    "odd/one_pixel.png": None,
}
BAD = {
    "bad/zero.png": "empty file",
    "bad/truncated.png": "unreadable",
    "bad/corrupt.png": "unreadable|not a recognised",
    "bad/text.png": "not a recognised image format",
    "bad/bomb.png": "too large",
    "bad/broken_link.png": "broken symbolic link",
    "bad/loop.png": "symbolic link loop",
    "bad/fifo.png": "not a regular file",
}


@pytest.fixture()
def hostile_folder(tmp_path) -> Path:
    """Two classes of clean drawings, odd-but-valid images, and one file of every hostile kind."""
    root = tmp_path / "hostile"
    for label in ("a", "b"):
        (root / label).mkdir(parents=True)
        for v in range(3):
            shape(v + (3 if label == "b" else 0)).save(root / label / f"{v}.png")
    (root / "odd").mkdir()
    frames = [shape(k) for k in range(3)]
    frames[0].save(root / "odd/animated.png", save_all=True, append_images=frames[1:], duration=50, loop=0)
    shape(1).convert("CMYK").save(root / "odd/cmyk.tif")
    Image.fromarray((np.asarray(shape(2), dtype=np.uint16) * 257)).save(root / "odd/sixteen.png")
    rgba = shape(3).convert("RGBA")
    rgba.putalpha(Image.new("L", rgba.size, 128))
    rgba.save(root / "odd/alpha.png")
    shape(4).convert("P").save(root / "odd/palette.png")
    Image.new("L", (1, 1), 0).save(root / "odd/one_pixel.png")
    bad = root / "bad"
    bad.mkdir()
    (bad / "zero.png").write_bytes(b"")
    full = png_bytes(Image.fromarray(np.random.default_rng(0).integers(0, 255, (40, 40), dtype=np.uint8)))
    (bad / "truncated.png").write_bytes(full[: len(full) // 2])
    damaged = bytearray(full)
    damaged[60:90] = b"\xff" * 30  # inside the compressed pixel stream: the header reads, decoding fails
    (bad / "corrupt.png").write_bytes(bytes(damaged))
    (bad / "text.png").write_text("hello, I am not an image\n")
    (bad / "bomb.png").write_bytes(bomb_png(30_000))
    os.symlink(bad / "missing-target.png", bad / "broken_link.png")
    os.symlink(bad / "loop.png", bad / "loop.png")
    os.mkfifo(bad / "fifo.png")
    return root


def test_a_build_skips_every_hostile_file_with_its_reason_and_indexes_the_rest(hostile_folder, encoder_dir, tmp_path):
    db = SiameseDB.build(hostile_folder, path=tmp_path / "index", encoder=encoder_dir)
    report = db.last_report
    reasons = {Path(path).relative_to(hostile_folder).as_posix(): reason for path, reason in report.skipped}
    assert set(reasons) == set(BAD), reasons
    for name, expected in BAD.items():
        assert re.search(expected, reasons[name]), (name, reasons[name])
        assert "\n" not in reasons[name]
    assert report.added == 6 + len(GOOD_ODDITIES) == len(db)
    assert report.scanned == report.added + len(BAD)
    stored = {Path(item.path).relative_to(hostile_folder).as_posix() for item in db.store.items(db.store.vectors()[0])}
    assert set(GOOD_ODDITIES) <= stored
    # Every odd image was encoded to a finite unit vector.
    _, vectors = db.store.vectors()
    assert np.allclose(np.linalg.norm(vectors, axis=1), 1.0, atol=1e-4)
    db.close()


def test_the_cli_build_prints_one_warning_line_per_bad_file_and_never_hangs(hostile_folder, encoder_dir, tmp_path):
    result = subprocess.run(
        [sys.executable, "-m", "siamesedb", "build", str(hostile_folder), "--index", str(tmp_path / "i"),
         "--encoder", str(encoder_dir), "-q"],
        capture_output=True, text=True, timeout=300, cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)},
    )
    assert result.returncode == 0, result.stderr
    assert "Traceback" not in result.stderr
    warnings = [line for line in result.stderr.splitlines() if line.startswith("warning: skipped ")]
    assert len(warnings) == len(BAD)
    for name in BAD:
        assert sum(name.split("/")[1] in line for line in warnings) == 1, name
    assert f"{len(BAD)} skipped" in result.stdout


def test_non_utf8_file_and_folder_names_are_skipped_in_builds_and_refused_by_add(encoder_dir, tmp_path):
    root = tmp_path / "names"
    (root / "ok").mkdir(parents=True)
    shape(0).save(root / "ok" / "fine.png")
    shape(1).save(root / "ok" / "fine2.png")
    bad_file = os.path.join(os.fsencode(root / "ok"), b"caf\xe9.png")
    bad_folder = os.path.join(os.fsencode(root), b"\xff\xfe")
    shape(2).save(bad_file.decode("utf-8", "surrogateescape"), format="PNG")
    os.mkdir(bad_folder)
    shape(3).save(os.path.join(bad_folder, b"x.png").decode("utf-8", "surrogateescape"), format="PNG")

    db = SiameseDB.build(root, path=tmp_path / "index", encoder=encoder_dir)
    assert len(db) == 2
    skipped = dict(db.last_report.skipped)
    assert len(skipped) == 2 and all("not valid UTF-8" in reason for reason in skipped.values())
    assert any(path.endswith("caf\\xe9.png") for path in skipped)  # printable: the bad byte shown as \xe9
    with pytest.raises(InvalidInputError, match=r"caf\\xe9\.png: not valid UTF-8"):
        db.add(os.fsdecode(bad_file), label="ok")
    with pytest.raises(InvalidInputError, match="not valid UTF-8"):
        db.add(root / "ok" / "fine.png", label=b"\xff".decode("utf-8", "surrogateescape"))
    assert len(db) == 2
    # A query needs no stored name: a readable image under any name is answered.
    assert len(db.search(os.fsdecode(bad_file), k=1)) == 1
    db.close()


@pytest.mark.parametrize("name", sorted(BAD))
def test_a_query_with_a_hostile_file_is_refused_in_one_line(hostile_folder, encoder_dir, tmp_path, name):
    runner = CliRunner()
    built = runner.invoke(cli, ["build", str(hostile_folder / "a"), "--index", str(tmp_path / "i"),
                                "--encoder", str(encoder_dir), "-q"])
    assert built.exit_code == 0, built.output
    for command in (["query"], ["classify"], ["add", "--label", "a"]):
        result = runner.invoke(cli, [*command, str(hostile_folder / name), "--index", str(tmp_path / "i")])
        assert result.exit_code == 1, (command, result.output)
        lines = result.output.strip().splitlines()
        assert len(lines) == 1 and Path(name).name in lines[0], (command, result.output)
        assert not isinstance(result.exception, Exception) or isinstance(result.exception, SystemExit)
    with SiameseDB.open(tmp_path / "i") as db:
        assert len(db) == 3  # the refused add stored nothing


def test_permission_denied_is_skipped_in_builds(hostile_folder, encoder_dir, tmp_path, monkeypatch):
    locked = hostile_folder / "a" / "locked.png"
    shape(5).save(locked)
    if os.geteuid() != 0:
        locked.chmod(0)
    else:  # root reads any file: stand in for the kernel's refusal at the one place files are opened
        import builtins

        real_open = builtins.open

        def refusing_open(file, *args, **kwargs):
            if os.fspath(file) == str(locked):
                raise PermissionError(13, "Permission denied", str(locked))
            return real_open(file, *args, **kwargs)

        monkeypatch.setattr(builtins, "open", refusing_open)
    db = SiameseDB.build(hostile_folder / "a", path=tmp_path / "index", encoder=encoder_dir)
    reasons = dict(db.last_report.skipped)
    assert "ermission denied" in reasons[str(locked)]
    assert len(db) == 3
    db.close()


# ---------------------------------------------------------------------------------------------- fuzz


@pytest.mark.filterwarnings("ignore::UserWarning")  # PIL warns about some damage (corrupt EXIF) and reads on
@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.binary(min_size=0, max_size=600), prefix=st.sampled_from(
    [b"", b"\x89PNG\r\n\x1a\n", b"GIF89a", b"\xff\xd8\xff", b"BM", b"II*\x00", b"RIFF\x00\x00\x00\x00WEBP", b"P5\n"]))
def test_random_bytes_load_or_fail_as_image_load_error(tmp_path, data, prefix):
    path = tmp_path / "fuzz.img"
    path.write_bytes(prefix + data)
    try:
        image = load_image(path)
    except ImageLoadError as exc:
        assert exc.source == path and exc.reason and "\n" not in exc.reason
    else:
        assert image.mode in ("L", "RGB") and image.width >= 1 and image.height >= 1


MODES = ["1", "L", "P", "RGB", "RGBA", "LA", "CMYK", "I;16", "I", "F", "YCbCr"]
FORMATS = {"PNG": {"1", "L", "P", "RGB", "RGBA", "LA", "I;16"}, "TIFF": {"1", "L", "P", "RGB", "RGBA", "CMYK",
           "I;16", "I", "F", "YCbCr"}, "BMP": {"1", "L", "P", "RGB"}, "GIF": {"1", "L", "P"},
           "WEBP": {"RGB", "RGBA"}, "JPEG": {"L", "RGB", "CMYK"}}


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    width=st.integers(1, 200), height=st.integers(1, 200), mode=st.sampled_from(MODES),
    fmt=st.sampled_from(sorted(FORMATS)), seed=st.integers(0, 2**16),
)
def test_random_valid_images_of_odd_sizes_and_modes_encode_to_unit_vectors(tmp_path, encoder, width, height,
                                                                            mode, fmt, seed):
    if mode not in FORMATS[fmt]:
        fmt = "TIFF"  # TIFF stores every mode drawn here
    rng = np.random.default_rng(seed)
    pixels = Image.fromarray(rng.integers(0, 256, (height, width), dtype=np.uint8))
    image = pixels.convert(mode) if mode not in ("I;16", "I", "F") else Image.fromarray(
        rng.integers(0, 65535, (height, width)).astype({"I;16": np.uint16, "I": np.int32, "F": np.float32}[mode]))
    path = tmp_path / f"odd.{fmt.lower()}"
    image.save(path, format=fmt)
    vector = encoder.encode(path)
    assert vector.shape == (16,) and np.isfinite(vector).all()
    assert np.linalg.norm(vector) == pytest.approx(1.0, abs=1e-4)
