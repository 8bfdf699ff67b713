"""`siamesedb datasets fetch NAME --to DIR [--from PATH_OR_URL]`: real archives from ../shared/data (skipped when
absent), damaged archives refused before anything is unpacked, a mirror URL, and the SHA256SUMS record."""

from __future__ import annotations

import hashlib
import io
import json
import zipfile
from pathlib import Path

import pytest
from PIL import Image

from siamesedb import datasets
from siamesedb.errors import FolderError

from helpers import SHARED_DATA, SVC2004_PNG, needs, png_bytes  # tests/helpers.py
from helpers import run_cli as run


def png() -> bytes:
    return png_bytes(Image.new("L", (8, 8), 0))


def omniglot_zip(split: str) -> bytes:
    """A stand-in for images_<split>.zip with the official layout: images_<split>/<Alphabet>/characterNN/*.png."""
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", compression=zipfile.ZIP_STORED) as zf:
        for character in ("character01", "character02"):
            for drawer in (1, 2):
                zf.writestr(f"images_{split}/Alpha/{character}/0001_{drawer:02d}.png", png())
    return buffer.getvalue()


@needs(SVC2004_PNG)
def test_fetch_the_real_svc2004_archive(tmp_path):
    result = run("datasets", "fetch", "svc2004", "--to", tmp_path, "--from", SHARED_DATA, "--json")
    assert result.exit_code == 0, result.output
    root = Path(json.loads(result.stdout)["roots"]["all"])
    assert root.parent.parent == tmp_path / "svc2004"
    assert len(list((root / "U01" / "genuine").glob("*.png"))) == 20
    assert len(list((root / "U40" / "forged").glob("*.png"))) == 20
    expected = hashlib.sha256(SVC2004_PNG.read_bytes()).hexdigest()
    assert (tmp_path / "svc2004" / "SHA256SUMS").read_text() == f"{expected}  svc2004_png.zip\n"


def test_a_damaged_zip_is_refused_before_unpacking(tmp_path):
    source = tmp_path / "src"
    source.mkdir()
    data = bytearray(omniglot_zip("background"))
    marker = data.index(b"IDAT")  # inside the first stored PNG: the zip's structure stays readable, its CRC breaks
    data[marker + 6] ^= 0xFF
    (source / "images_background.zip").write_bytes(bytes(data))
    (source / "images_evaluation.zip").write_bytes(omniglot_zip("evaluation"))
    result = run("datasets", "fetch", "omniglot", "--to", tmp_path / "out", "--from", source)
    assert result.exit_code == 1
    assert "images_background.zip" in result.output and "CRC-32" in result.output
    assert not (tmp_path / "out" / "omniglot" / "images_background.d").exists()


def test_fetch_from_a_mirror_url(tmp_path, monkeypatch):
    requested = []

    def fake_urlopen(url, timeout=None):
        requested.append(url)
        return io.BytesIO(omniglot_zip(url.rsplit("images_", 1)[1].removesuffix(".zip")))

    monkeypatch.setattr(datasets.urllib.request, "urlopen", fake_urlopen)
    roots = datasets.fetch("omniglot", tmp_path, source="https://mirror.example/omniglot/")
    assert requested == ["https://mirror.example/omniglot/images_background.zip",
                         "https://mirror.example/omniglot/images_evaluation.zip"]
    assert roots["evaluation"] == tmp_path / "omniglot" / "images_evaluation.d" / "images_evaluation"
    assert len(list(roots["background"].rglob("*.png"))) == 4
    sums = (tmp_path / "omniglot" / "SHA256SUMS").read_text().splitlines()
    assert [line.split()[1] for line in sums] == ["images_background.zip", "images_evaluation.zip"]
    # A second fetch reuses the downloads and the unpacked folders.
    assert datasets.fetch("omniglot", tmp_path, source="https://mirror.example/omniglot") == roots
    assert len(requested) == 2


def test_fashion_files_that_are_not_the_official_ones_are_refused(tmp_path):
    for name in datasets.FASHION_MNIST_MD5:
        (tmp_path / name).write_bytes(b"not the official file")
    with pytest.raises(FolderError, match="MD5"):
        datasets.fetch("fashion-mnist", tmp_path / "out", source=tmp_path)
    assert not (tmp_path / "out" / "fashion-mnist" / "png").exists()


def test_unknown_dataset_and_no_copy_anywhere(tmp_path, monkeypatch):
    assert run("datasets", "fetch", "cifar10", "--to", tmp_path).exit_code == 2  # click's choice check
    with pytest.raises(FolderError, match="unknown dataset"):
        datasets.fetch("cifar10", tmp_path)
    with pytest.raises(FolderError, match="svc2004_png.zip not found"):
        datasets.fetch("svc2004", tmp_path / "out", source=tmp_path / "nothing")
