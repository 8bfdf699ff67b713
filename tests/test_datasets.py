"""Unpacking the real archives in ../shared/data into labelled folders (skipped when the data is absent)."""

from __future__ import annotations

import gzip
import hashlib
import io
import struct
import urllib.error
import zipfile
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from siamesedb import datasets
from siamesedb.data import scan_folder
from siamesedb.datasets import cache_root, default_data_root, fashion_mnist, omniglot, svc2004
from siamesedb.errors import FolderError

from helpers import CHECKOUT_DATA  # tests/helpers.py
from helpers import SHARED_DATA as DATA
from helpers import needs

needs_data = needs(DATA / "omniglot")


@needs_data
def test_omniglot_evaluation_unpacks_to_alphabet_character_labels(tmp_path):
    root = omniglot("evaluation", source=DATA, cache_dir=tmp_path)
    images = scan_folder(root)
    labels = {im.label for im in images}
    assert len(images) == 13180 and len(labels) == 659
    assert set(Counter(im.label for im in images).values()) == {20}  # 20 drawers per character
    assert len({label.split("/")[0] for label in labels}) == 20
    assert all(label.count("/") == 1 and label.split("/")[1].startswith("character") for label in labels)
    # Unpacked once: a second call reuses the folder.
    assert omniglot("evaluation", source=DATA, cache_dir=tmp_path) == root
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".unpack-")]


@needs_data
def test_svc2004_unpacks_genuine_and_forged_folders(tmp_path):
    root = svc2004(source=DATA, cache_dir=tmp_path)
    counts = Counter(im.label for im in scan_folder(root))
    assert len(counts) == 80 and set(counts.values()) == {20}  # 40 writers x (20 genuine + 20 skilled forgeries)
    assert {label.split("/")[0] for label in counts} == {f"U{i:02d}" for i in range(1, 41)}
    assert {label.split("/")[1] for label in counts} == {"genuine", "forged"}


@needs(DATA / "fashion_mnist")
def test_the_local_fashion_mnist_files_are_the_official_ones():
    # Converting all 70,000 images takes tens of seconds: here only the checksum the conversion relies on.
    for name, md5 in datasets.FASHION_MNIST_MD5.items():
        assert hashlib.md5((DATA / "fashion_mnist" / name).read_bytes()).hexdigest() == md5


def test_a_local_zip_is_found_as_file_folder_or_dataset_subfolder(tmp_path):
    archive_dir = tmp_path / "data" / "omniglot"
    archive_dir.mkdir(parents=True)
    with zipfile.ZipFile(archive_dir / "images_background.zip", "w") as zf:
        zf.writestr("images_background/Latin/character01/0001_01.png", b"png bytes")
    for source in (tmp_path / "data", archive_dir, archive_dir / "images_background.zip"):
        cache = tmp_path / f"cache-{abs(hash(str(source)))}"
        root = omniglot("background", source=source, cache_dir=cache)
        assert (root / "Latin" / "character01" / "0001_01.png").read_bytes() == b"png bytes"


def test_a_broken_archive_leaves_no_half_unpacked_folder(tmp_path):
    (tmp_path / "images_evaluation.zip").write_bytes(b"not a zip")
    with pytest.raises(FolderError, match="cannot unpack"):
        omniglot("evaluation", source=tmp_path, cache_dir=tmp_path / "cache")
    assert not (tmp_path / "cache" / "images_evaluation.d").exists()


def test_an_interrupted_unpack_is_never_taken_for_a_complete_one(tmp_path, monkeypatch):
    with zipfile.ZipFile(tmp_path / "images_evaluation.zip", "w") as zf:
        zf.writestr("images_evaluation/A/character01/1.png", b"x")
    real_extractall = zipfile.ZipFile.extractall

    def dies_half_way(self, path, *args, **kwargs):
        (Path(path) / "images_evaluation").mkdir()  # some files are out...
        raise OSError("No space left on device")  # ...when the disk fills up

    monkeypatch.setattr(zipfile.ZipFile, "extractall", dies_half_way)
    with pytest.raises(FolderError, match="No space left"):
        omniglot("evaluation", source=tmp_path, cache_dir=tmp_path / "cache")
    assert not (tmp_path / "cache" / "images_evaluation.d").exists()
    monkeypatch.setattr(zipfile.ZipFile, "extractall", real_extractall)
    root = omniglot("evaluation", source=tmp_path, cache_dir=tmp_path / "cache")
    assert (root / "A" / "character01" / "1.png").read_bytes() == b"x"
    assert not [p for p in (tmp_path / "cache").iterdir() if p.name.startswith(".unpack-")]


def test_losing_an_unpack_race_uses_the_winners_folder(tmp_path):
    target = tmp_path / "dataset.d"

    def slow_fill(staging):
        (staging / "mine").write_text("loser")
        target.mkdir()  # meanwhile another process finished first
        (target / "theirs").write_text("winner")

    assert datasets._publish(slow_fill, target) == target
    assert [p.name for p in target.iterdir()] == ["theirs"]
    assert [p.name for p in tmp_path.iterdir()] == ["dataset.d"]  # staging cleaned up


def test_unknown_split_and_missing_signatures(tmp_path):
    with pytest.raises(FolderError, match="split"):
        omniglot("test", source=tmp_path)
    with pytest.raises(FolderError, match="split"):
        fashion_mnist("validation", source=tmp_path)
    with pytest.raises(FolderError, match="svc2004_png.zip") as info:
        svc2004(source=tmp_path, cache_dir=tmp_path / "cache")
    message = str(info.value)
    assert "\n" not in message and str(tmp_path / "signatures_svc2004" / "svc2004_png.zip") in message


def test_offline_without_a_local_copy_says_where_it_looked(tmp_path, monkeypatch):
    def offline(url, timeout=None):
        raise urllib.error.URLError("[Errno -3] Temporary failure in name resolution")

    monkeypatch.setattr(datasets.urllib.request, "urlopen", offline)
    with pytest.raises(FolderError) as info:
        omniglot("background", source=tmp_path / "empty", cache_dir=tmp_path / "cache")
    message = str(info.value)
    assert "\n" not in message
    assert str(tmp_path / "empty" / "omniglot" / "images_background.zip") in message
    assert datasets.OMNIGLOT_URL.format(split="background") in message and "name resolution" in message
    assert not list((tmp_path / "cache" / "downloads").glob("*"))  # no partial download left behind


def test_download_when_no_local_copy_then_reuse_it(tmp_path, monkeypatch):
    payload = io.BytesIO()
    with zipfile.ZipFile(payload, "w") as zf:
        zf.writestr("images_background/Latin/character01/0001_01.png", b"png bytes")
    calls = []

    def fake_urlopen(url, timeout=None):
        calls.append(url)
        return io.BytesIO(payload.getvalue())

    monkeypatch.setattr(datasets.urllib.request, "urlopen", fake_urlopen)
    monkeypatch.setenv("SIAMESEDB_CACHE", str(tmp_path / "cache"))
    root = omniglot("background", source=tmp_path / "nothing-here")
    assert root == tmp_path / "cache" / "omniglot" / "images_background.d" / "images_background"
    assert calls == [datasets.OMNIGLOT_URL.format(split="background")]
    assert (tmp_path / "cache" / "omniglot" / "downloads" / "images_background.zip").is_file()
    assert omniglot("background", source=tmp_path / "nothing-here") == root and len(calls) == 1


def write_idx(path, array):
    header = struct.pack(">HBB", 0, 0x08, array.ndim) + struct.pack(">" + "I" * array.ndim, *array.shape)
    with gzip.open(path, "wb") as fh:
        fh.write(header + array.astype(np.uint8).tobytes())


@pytest.fixture()
def tiny_fashion(tmp_path, monkeypatch):
    """Four small IDX files in the official layout, registered as the official checksums."""
    folder = tmp_path / "data" / "fashion_mnist"
    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    sizes = {"train": 12, "t10k": 5}
    for prefix, n in sizes.items():
        write_idx(folder / f"{prefix}-images-idx3-ubyte.gz", rng.integers(0, 256, (n, 28, 28)))
        write_idx(folder / f"{prefix}-labels-idx1-ubyte.gz", np.arange(n) % 10)
    sums = {p.name: hashlib.md5(p.read_bytes()).hexdigest() for p in folder.iterdir()}
    monkeypatch.setattr(datasets, "FASHION_MNIST_MD5", sums)
    return folder


def test_fashion_mnist_becomes_png_folders_by_class(tiny_fashion, tmp_path):
    root = fashion_mnist(source=tmp_path / "data", cache_dir=tmp_path / "cache")
    train = scan_folder(root / "train")
    assert len(train) == 12 and len(scan_folder(root / "test")) == 5
    assert {im.label for im in train} == set(datasets.FASHION_MNIST_CLASSES)
    assert Counter(im.label for im in train)["T-shirt_top"] == 2  # items 0 and 10
    first = gzip.decompress((tiny_fashion / "train-images-idx3-ubyte.gz").read_bytes())[16 : 16 + 784]
    pixels = np.asarray(Image.open(root / "train" / "T-shirt_top" / "train_00000.png"))
    assert pixels.shape == (28, 28) and pixels.tobytes() == first  # lossless
    assert fashion_mnist("test", source=tiny_fashion, cache_dir=tmp_path / "cache") == root / "test"


def test_fashion_mnist_refuses_files_that_are_not_the_official_ones(tiny_fashion, tmp_path, monkeypatch):
    monkeypatch.setitem(datasets.FASHION_MNIST_MD5, "t10k-labels-idx1-ubyte.gz", "0" * 32)
    with pytest.raises(FolderError, match="t10k-labels-idx1-ubyte.gz: MD5"):
        fashion_mnist(source=tiny_fashion, cache_dir=tmp_path / "cache")
    assert not (tmp_path / "cache" / "png").exists()


def test_a_corrupt_idx_file_is_a_folder_error(tiny_fashion, tmp_path, monkeypatch):
    broken = tiny_fashion / "train-labels-idx1-ubyte.gz"
    write_idx(broken, np.arange(11) % 10)  # 11 labels for 12 images
    monkeypatch.setitem(datasets.FASHION_MNIST_MD5, broken.name, hashlib.md5(broken.read_bytes()).hexdigest())
    with pytest.raises(FolderError, match="do not match"):
        fashion_mnist(source=tiny_fashion, cache_dir=tmp_path / "cache")
    assert not (tmp_path / "cache" / "png").exists()


def test_default_data_root_and_cache_honour_the_environment(monkeypatch, tmp_path):
    monkeypatch.setenv("SIAMESEDB_DATA", str(tmp_path))
    assert default_data_root() == tmp_path
    monkeypatch.delenv("SIAMESEDB_DATA")
    if CHECKOUT_DATA.is_dir():
        assert default_data_root() == CHECKOUT_DATA.resolve()  # the shared/data folder beside the checkout
    monkeypatch.setenv("SIAMESEDB_CACHE", str(tmp_path / "c"))
    assert cache_root() == tmp_path / "c"
    monkeypatch.delenv("SIAMESEDB_CACHE")
    assert cache_root() == Path.home() / ".cache" / "siamesedb"


@needs_data
def test_the_default_encoder_never_trained_on_an_evaluation_character(tmp_path):
    """Lake's protocol: train on images_background only; no character (or alphabet) of images_evaluation in it."""
    from siamesedb.encoder import Encoder

    notes = Encoder.load("default").config.notes
    assert Path(notes["trained_on"]).name == "images_background"
    assert notes["train_config"]["groups"] is None  # the whole background split, nothing else
    background = omniglot("background", source=DATA, cache_dir=tmp_path)
    evaluation = omniglot("evaluation", source=DATA, cache_dir=tmp_path)
    alphabets = {split: {p.name for p in root.iterdir() if p.is_dir()} for split, root in
                 (("background", background), ("evaluation", evaluation))}
    assert len(alphabets["background"]) == 30 and len(alphabets["evaluation"]) == 20
    assert not alphabets["background"] & alphabets["evaluation"]
    # and no drawing file is shared either (character ids are global in Omniglot: NNNN_MM.png)
    files = {split: {p.name for p in root.rglob("*.png")} for split, root in
             (("background", background), ("evaluation", evaluation))}
    assert len(files["background"]) == 19_280 and len(files["evaluation"]) == 13_180
    assert not files["background"] & files["evaluation"]
