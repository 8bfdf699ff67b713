"""Known public datasets (Omniglot, SVC2004 signatures, Fashion-MNIST): unpack their official archives into labelled folders."""

from __future__ import annotations

import gzip
import hashlib
import os
import shutil
import struct
import tempfile
import urllib.request
import zipfile
from pathlib import Path

import numpy as np
from PIL import Image

from siamesedb.errors import FolderError

OMNIGLOT_URL = "https://github.com/brendenlake/omniglot/raw/master/python/images_{split}.zip"
FASHION_MNIST_URL = "http://fashion-mnist.s3-website.eu-central-1.amazonaws.com/{name}"
FASHION_MNIST_CLASSES = ("T-shirt_top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag",
                         "Ankle_boot")


def default_data_root() -> Path:
    """SIAMESEDB_DATA, else the shared/data folder beside this checkout, else ~/.cache/siamesedb/data."""
    if os.environ.get("SIAMESEDB_DATA"):
        return Path(os.environ["SIAMESEDB_DATA"])
    shared = Path(__file__).resolve().parents[2] / "shared" / "data"
    if shared.is_dir():
        return shared
    return Path.home() / ".cache" / "siamesedb" / "data"


def cache_root() -> Path:
    return Path(os.environ.get("SIAMESEDB_CACHE", Path.home() / ".cache" / "siamesedb"))


def _find_archive(source: str | os.PathLike | None, dataset: str, filename: str) -> Path | None:
    """Look for `filename` as the source itself, inside it, or inside its `dataset/` subfolder."""
    base = Path(source) if source is not None else default_data_root()
    for candidate in (base, base / filename, base / dataset / filename):
        if candidate.is_file() and candidate.name == filename:
            return candidate
    return None


def _download(url: str, target: Path) -> Path:
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_name(target.name + ".part")
    try:
        with urllib.request.urlopen(url, timeout=60) as response, open(tmp, "wb") as fh:
            shutil.copyfileobj(response, fh)
    except OSError as exc:
        tmp.unlink(missing_ok=True)
        raise FolderError(f"{url}: download failed ({exc}); pass --data with a local copy") from None
    os.replace(tmp, target)
    return target


def _archive(source, dataset: str, filename: str, url: str | None) -> Path:
    found = _find_archive(source, dataset, filename)
    if found is not None:
        return found
    cached = cache_root() / "downloads" / filename
    if cached.is_file():
        return cached
    where = Path(source) if source is not None else default_data_root()
    if url is None:
        raise FolderError(f"{where}: {dataset}/{filename} not found")
    return _download(url, cached)


def _unpack_zip_once(archive: Path, target: Path) -> Path:
    """Extract into a temporary sibling folder, then rename: a half-finished unpack is never mistaken for a whole one."""
    if target.is_dir():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=".unpack-", dir=target.parent))
    try:
        try:
            with zipfile.ZipFile(archive) as zf:
                zf.extractall(staging)
        except (zipfile.BadZipFile, OSError) as exc:
            raise FolderError(f"{archive}: cannot unpack ({exc})") from None
        os.replace(staging, target)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return target


def omniglot(split: str = "evaluation", source: str | os.PathLike | None = None,
             cache_dir: str | os.PathLike | None = None) -> Path:
    """The labelled root of Omniglot's `background` or `evaluation` set (children: alphabets; labels Alphabet/characterNN)."""
    if split not in ("background", "evaluation"):
        raise FolderError(f"omniglot split must be 'background' or 'evaluation', not {split!r}")
    filename = f"images_{split}.zip"
    archive = _archive(source, "omniglot", filename, OMNIGLOT_URL.format(split=split))
    target = Path(cache_dir) if cache_dir is not None else cache_root() / "omniglot"
    unpacked = _unpack_zip_once(archive, target / f"images_{split}.d")
    root = unpacked / f"images_{split}"
    if not root.is_dir():
        raise FolderError(f"{archive}: no images_{split}/ folder inside")
    return root


def svc2004(source: str | os.PathLike | None = None, cache_dir: str | os.PathLike | None = None) -> Path:
    """SVC2004 Task 2 as images: a root holding Uxx/genuine/*.png and Uxx/forged/*.png for 40 writers."""
    archive = _archive(source, "signatures_svc2004", "svc2004_png.zip", None)
    target = Path(cache_dir) if cache_dir is not None else cache_root() / "svc2004"
    unpacked = _unpack_zip_once(archive, target / "svc2004_png.d")
    root = unpacked / "svc2004"
    return root if root.is_dir() else unpacked


def _read_idx(path: Path) -> np.ndarray:
    with gzip.open(path, "rb") as fh:
        data = fh.read()
    zero, dtype_code, ndim = struct.unpack(">HBB", data[:4])
    if zero != 0 or dtype_code != 0x08:
        raise FolderError(f"{path}: not an unsigned-byte IDX file")
    shape = struct.unpack(">" + "I" * ndim, data[4 : 4 + 4 * ndim])
    return np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * ndim).reshape(shape)


def fashion_mnist(source: str | os.PathLike | None = None, cache_dir: str | os.PathLike | None = None) -> Path:
    """Fashion-MNIST as PNG folders: <root>/train/<class>/*.png (60,000) and <root>/test/<class>/*.png (10,000)."""
    base = Path(source) if source is not None else default_data_root()
    folder = base / "fashion_mnist" if (base / "fashion_mnist").is_dir() else base
    names = {"train": ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz"),
             "test": ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz")}
    files = {}
    for pair in names.values():
        for name in pair:
            local = folder / name
            files[name] = local if local.is_file() else _archive(None, "fashion_mnist", name, FASHION_MNIST_URL.format(name=name))
    sums_file = folder / "MD5SUMS"
    if sums_file.is_file():
        for line in sums_file.read_text().splitlines():
            parts = line.split()
            if len(parts) == 2 and parts[1] in files:
                actual = hashlib.md5(files[parts[1]].read_bytes()).hexdigest()
                if actual != parts[0]:
                    raise FolderError(f"{files[parts[1]]}: MD5 {actual} does not match MD5SUMS ({parts[0]})")
    target = Path(cache_dir) if cache_dir is not None else cache_root() / "fashion_mnist"
    root = target / "png"
    if root.is_dir():
        return root
    target.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=".unpack-", dir=target))
    try:
        for split, (images_name, labels_name) in names.items():
            images, labels = _read_idx(files[images_name]), _read_idx(files[labels_name])
            for i, (image, label) in enumerate(zip(images, labels)):
                out = staging / split / FASHION_MNIST_CLASSES[label] / f"{split}_{i:05d}.png"
                out.parent.mkdir(parents=True, exist_ok=True)
                Image.fromarray(image, mode="L").save(out)
        os.replace(staging, root)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return root
