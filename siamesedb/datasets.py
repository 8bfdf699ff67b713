"""Known public datasets (Omniglot, SVC2004 signatures, Fashion-MNIST, MNIST): unpack their official archives into
labelled folders."""

from __future__ import annotations

import gzip
import hashlib
import os
import shutil
import struct
import tempfile
import urllib.request
import zipfile
from collections.abc import Callable
from pathlib import Path

import numpy as np
from PIL import Image

from siamesedb.errors import FolderError

OMNIGLOT_URL = "https://github.com/brendenlake/omniglot/raw/master/python/images_{split}.zip"
FASHION_MNIST_URL = "http://fashion-mnist.s3-website.eu-central-1.amazonaws.com/{name}"
FASHION_MNIST_CLASSES = ("T-shirt_top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag",
                         "Ankle_boot")
# The official files' MD5s (github.com/zalandoresearch/fashion-mnist): checked before converting, whatever the source.
FASHION_MNIST_MD5 = {
    "train-images-idx3-ubyte.gz": "8d4fb7e6c68d591d4c3dfef9ec88bf0d",
    "train-labels-idx1-ubyte.gz": "25c81989df183df01b3e8a0aad5dffbe",
    "t10k-images-idx3-ubyte.gz": "bef4ecab320f06d8554ea6380940ec79",
    "t10k-labels-idx1-ubyte.gz": "bb300cfdad3c16e7a12a480ee83cd310",
}
# MNIST (LeCun, Cortes & Burges): the same IDX layout and file names. yann.lecun.com now refuses plain downloads;
# the files are fetched from the mirror torchvision uses, and checked against the official MD5s whatever the source.
MNIST_URL = "https://ossci-datasets.s3.amazonaws.com/mnist/{name}"
MNIST_CLASSES = tuple(str(digit) for digit in range(10))
MNIST_MD5 = {
    "train-images-idx3-ubyte.gz": "f68b3c2dcbeaaa9fbdd348bbdeb94873",
    "train-labels-idx1-ubyte.gz": "d53e105ee54ea40749a09fcbcd1e9432",
    "t10k-images-idx3-ubyte.gz": "9fb629c4189551a2d022fa330f9573f3",
    "t10k-labels-idx1-ubyte.gz": "ec29112dd5afa0611ce80d1b7f02629c",
}
FASHION_MNIST_SPLITS = {"train": ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz"),
                        "test": ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz")}


def default_data_root() -> Path:
    """SIAMESEDB_DATA, else the shared/data folder beside this checkout, else ~/.cache/siamesedb/data."""
    if os.environ.get("SIAMESEDB_DATA"):
        return Path(os.environ["SIAMESEDB_DATA"])
    shared = Path(__file__).resolve().parents[2] / "shared" / "data"
    if shared.is_dir():
        return shared
    return Path.home() / ".cache" / "siamesedb" / "data"


def cache_root() -> Path:
    """Where unpacked datasets live: SIAMESEDB_CACHE, else ~/.cache/siamesedb (one subfolder per dataset)."""
    return Path(os.environ.get("SIAMESEDB_CACHE") or Path.home() / ".cache" / "siamesedb")


def _candidates(source: str | os.PathLike | None, dataset: str, filename: str) -> list[Path]:
    """Where a local copy may be: the source itself (the file), inside it, or inside its `dataset/` subfolder."""
    base = Path(source) if source is not None else default_data_root()
    return [base, base / filename, base / dataset / filename]


def _download(url: str, target: Path) -> None:
    """Fetch url into target through a .part file, so an interrupted download is never taken for a whole one."""
    target.parent.mkdir(parents=True, exist_ok=True)
    partial = target.with_name(target.name + ".part")
    try:
        with urllib.request.urlopen(url, timeout=60) as response, open(partial, "wb") as fh:
            shutil.copyfileobj(response, fh)
        os.replace(partial, target)
    finally:
        partial.unlink(missing_ok=True)


def _obtain(source: str | os.PathLike | None, dataset: str, filename: str, url: str | None, downloads: Path) -> Path:
    """A local copy of `filename`: found under source (default: default_data_root()), downloaded before, or now."""
    candidates = _candidates(source, dataset, filename)
    for candidate in candidates:
        if candidate.is_file() and candidate.name == filename:
            return candidate
    cached = downloads / filename
    if cached.is_file():
        return cached
    looked = ", ".join(str(c) for c in candidates[1:])
    if url is None:
        raise FolderError(f"{filename} not found (looked in {looked}); pass the folder holding it or set SIAMESEDB_DATA")
    try:
        _download(url, cached)
    except Exception as exc:  # URLError, HTTPError, timeouts, IncompleteRead...: all mean "no copy"
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise FolderError(f"{filename} not found (looked in {looked}) and downloading {url} failed ({reason})") from None
    return cached


def _publish(fill: Callable[[Path], None], target: Path) -> Path:
    """Build `target` via fill(staging) in a hidden sibling folder, then rename it into place in one step.

    A folder at `target` is therefore always complete: an interrupted run leaves only a `.unpack-*` folder behind
    (hidden, so scan_folder ignores it), and two processes racing both succeed, the second one using the first's.
    """
    if target.is_dir():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=".unpack-", dir=target.parent))
    try:
        fill(staging)
        try:
            os.replace(staging, target)
        except OSError:
            if not target.is_dir():  # not a lost race: a real failure
                raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return target


def _unpack_zip_once(archive: Path, target: Path) -> Path:
    """`archive` extracted into `target` (once; later calls return the existing folder)."""

    def extract(staging: Path) -> None:
        try:
            with zipfile.ZipFile(archive) as zf:
                zf.extractall(staging)  # extractall drops absolute and '..' members: nothing lands outside staging
        except (zipfile.BadZipFile, OSError, EOFError) as exc:
            raise FolderError(f"{archive}: cannot unpack ({exc})") from None

    return _publish(extract, target)


def omniglot(split: str = "evaluation", source: str | os.PathLike | None = None,
             cache_dir: str | os.PathLike | None = None) -> Path:
    """The labelled root of Omniglot's `background` or `evaluation` set (children: alphabets; labels Alphabet/characterNN).

    `source`: a folder holding omniglot/images_<split>.zip or images_<split>.zip, or that zip itself (default
    default_data_root()). Without a local copy, the official archive is downloaded. Unpacked once into cache_dir
    (default <cache_root()>/omniglot).
    """
    if split not in ("background", "evaluation"):
        raise FolderError(f"omniglot split must be 'background' or 'evaluation', not {split!r}")
    filename = f"images_{split}.zip"
    cache = Path(cache_dir) if cache_dir is not None else cache_root() / "omniglot"
    archive = _obtain(source, "omniglot", filename, OMNIGLOT_URL.format(split=split), cache / "downloads")
    unpacked = _unpack_zip_once(archive, cache / f"images_{split}.d")
    root = unpacked / f"images_{split}"
    if not root.is_dir():
        raise FolderError(f"{archive}: no images_{split}/ folder inside")
    return root


def svc2004(source: str | os.PathLike | None = None, cache_dir: str | os.PathLike | None = None) -> Path:
    """SVC2004 Task 2 as images: a root holding Uxx/genuine/*.png and Uxx/forged/*.png for 40 writers.

    `source`: a folder holding signatures_svc2004/svc2004_png.zip or svc2004_png.zip, or the zip itself. There is no
    official download of the rendered images, so a missing local copy is a FolderError.
    """
    cache = Path(cache_dir) if cache_dir is not None else cache_root() / "svc2004"
    archive = _obtain(source, "signatures_svc2004", "svc2004_png.zip", None, cache / "downloads")
    unpacked = _unpack_zip_once(archive, cache / "svc2004_png.d")
    root = unpacked / "svc2004"
    return root if root.is_dir() else unpacked


def _md5(path: Path) -> str:
    digest = hashlib.md5()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _read_idx(path: Path) -> np.ndarray:
    """A gzipped IDX file of unsigned bytes -> array of its declared shape ((n, 28, 28) images or (n,) labels)."""
    try:
        with gzip.open(path, "rb") as fh:
            data = fh.read()
    except (OSError, EOFError) as exc:
        raise FolderError(f"{path}: unreadable ({exc})") from None
    if len(data) < 4:
        raise FolderError(f"{path}: not an IDX file")
    zero, dtype_code, ndim = struct.unpack(">HBB", data[:4])
    if zero != 0 or dtype_code != 0x08 or ndim < 1:
        raise FolderError(f"{path}: not an unsigned-byte IDX file")
    header = 4 + 4 * ndim
    shape = struct.unpack(">" + "I" * ndim, data[4:header])
    if len(data) != header + int(np.prod(shape)):
        raise FolderError(f"{path}: size does not match its declared shape {shape}")
    return np.frombuffer(data, dtype=np.uint8, offset=header).reshape(shape)


def _write_fashion_pngs(files: dict[str, Path], staging: Path, progress: bool = False,
                        classes: tuple[str, ...] = FASHION_MNIST_CLASSES, name: str = "fashion-mnist") -> None:
    """IDX pairs -> staging/<split>/<class>/<split>_<index>.png (28x28 grey, as stored: dark background)."""
    from tqdm import tqdm

    for split, (images_name, labels_name) in FASHION_MNIST_SPLITS.items():
        images, labels = _read_idx(files[images_name]), _read_idx(files[labels_name])
        if images.ndim != 3 or labels.ndim != 1 or len(images) != len(labels):
            raise FolderError(f"{files[images_name]}: {images.shape} images do not match {labels.shape} labels")
        if len(labels) and int(labels.max()) >= len(classes):
            raise FolderError(f"{files[labels_name]}: label {int(labels.max())} is not a {name} class")
        folders = [staging / split / label for label in classes]
        for folder in folders:
            folder.mkdir(parents=True)
        for i, (image, label) in enumerate(tqdm(zip(images, labels), total=len(labels), unit="img",
                                                desc=f"{name} {split}", disable=not progress)):
            Image.fromarray(image).save(folders[label] / f"{split}_{i:05d}.png", compress_level=1)


def fashion_mnist(split: str | None = None, source: str | os.PathLike | None = None,
                  cache_dir: str | os.PathLike | None = None, progress: bool = False) -> Path:
    """Fashion-MNIST as PNG folders by class name: <root>/train/<class>/*.png (60,000), <root>/test/<class>/*.png (10,000).

    Returns <root> when split is None, else the labelled root of that split (<root>/train or <root>/test).
    `source`: a folder holding fashion_mnist/*.gz or the four IDX .gz files (default default_data_root()); missing
    files are downloaded from the official host. The files' MD5s are checked against the official ones before the
    one-time conversion into cache_dir (default <cache_root()>/fashion_mnist).
    """
    return _idx_dataset("fashion-mnist", "fashion_mnist", FASHION_MNIST_MD5, FASHION_MNIST_URL, FASHION_MNIST_CLASSES,
                        split, source, cache_dir, progress)


def mnist(split: str | None = None, source: str | os.PathLike | None = None,
          cache_dir: str | os.PathLike | None = None, progress: bool = False) -> Path:
    """MNIST digits as PNG folders <root>/{train,test}/<digit>/*.png, exactly as `fashion_mnist` (same IDX files):
    `source` holds mnist/*.gz or the four .gz files; missing ones are downloaded; the official MD5s are checked."""
    return _idx_dataset("mnist", "mnist", MNIST_MD5, MNIST_URL, MNIST_CLASSES, split, source, cache_dir, progress)


def _idx_dataset(name: str, folder: str, md5s: dict[str, str], url: str, classes: tuple[str, ...], split: str | None,
                 source: str | os.PathLike | None, cache_dir: str | os.PathLike | None, progress: bool) -> Path:
    """The four IDX .gz files of an MNIST-format dataset, MD5-checked, converted once into PNG class folders."""
    if split not in (None, "train", "test"):
        raise FolderError(f"{name} split must be 'train' or 'test', not {split!r}")
    cache = Path(cache_dir) if cache_dir is not None else cache_root() / folder
    root = cache / "png"
    if not root.is_dir():
        files = {file: _obtain(source, folder, file, url.format(name=file), cache / "downloads") for file in md5s}
        for file, path in files.items():
            actual = _md5(path)
            if actual != md5s[file]:
                if path.parent == cache / "downloads":
                    path.unlink()  # a bad download must not block the next attempt
                raise FolderError(f"{path}: MD5 {actual} is not the official {md5s[file]}")
        _publish(lambda staging: _write_fashion_pngs(files, staging, progress, classes, name), root)
    return root if split is None else root / split


# ---------------------------------------------------------------------------------------------- `siamesedb datasets fetch`

DATASETS = ("omniglot", "svc2004", "fashion-mnist", "mnist")
ARCHIVES = {
    "omniglot": ("omniglot", ["images_background.zip", "images_evaluation.zip"]),
    "svc2004": ("signatures_svc2004", ["svc2004_png.zip"]),
    "fashion-mnist": ("fashion_mnist", list(FASHION_MNIST_MD5)),
    "mnist": ("mnist", list(MNIST_MD5)),
}


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _check_zip(archive: Path) -> None:
    """Every member's CRC-32 checked against the archive's own record: a damaged or truncated zip fails here."""
    try:
        with zipfile.ZipFile(archive) as zf:
            bad = zf.testzip()
    except (zipfile.BadZipFile, OSError, EOFError) as exc:
        raise FolderError(f"{archive}: not a readable zip archive ({exc})") from None
    if bad is not None:
        raise FolderError(f"{archive}: member {bad} fails its CRC-32 check (damaged archive)")


def fetch(name: str, to: str | os.PathLike, source: str | os.PathLike | None = None,
          log: Callable[[str], None] | None = None, progress: bool = False) -> dict[str, Path]:
    """Unpack a known dataset's official archives into labelled folders under `to/<name>/`; returns {split: root}.

    `source`: a local folder or file holding the archives (default: default_data_root(), then the official
    download), or an http(s) URL of a folder holding them (each file is fetched as URL/<file name>). Checks before
    unpacking: Fashion-MNIST's files against the official MD5s, zip archives' CRC-32 of every member. The SHA-256 of
    every archive used is written to `to/<name>/SHA256SUMS`.
    """
    if name not in DATASETS:
        raise FolderError(f"unknown dataset {name!r}; choose from {', '.join(DATASETS)}")
    log = log or (lambda line: None)
    target = Path(to) / name
    subfolder, files = ARCHIVES[name]
    if source is not None and str(source).startswith(("http://", "https://")):
        base = str(source).rstrip("/")
        downloads = target / "downloads"
        for filename in files:
            if not (downloads / filename).is_file():
                log(f"downloading {base}/{filename}")
                try:
                    _download(f"{base}/{filename}", downloads / filename)
                except Exception as exc:
                    reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
                    raise FolderError(f"downloading {base}/{filename} failed ({reason})") from None
        source = downloads
    roots: dict[str, Path] = {}
    used: dict[str, Path] = {}
    if name == "omniglot":
        for split in ("background", "evaluation"):
            filename = f"images_{split}.zip"
            archive = _obtain(source, subfolder, filename, OMNIGLOT_URL.format(split=split), target / "downloads")
            _check_zip(archive)
            used[filename] = archive
            log(f"unpacking {archive}")
            roots[split] = omniglot(split, source=archive, cache_dir=target)
    elif name == "svc2004":
        archive = _obtain(source, subfolder, "svc2004_png.zip", None, target / "downloads")
        _check_zip(archive)
        used["svc2004_png.zip"] = archive
        log(f"unpacking {archive}")
        roots["all"] = svc2004(source=archive, cache_dir=target)
    else:
        url, convert = (FASHION_MNIST_URL, fashion_mnist) if name == "fashion-mnist" else (MNIST_URL, mnist)
        for filename in files:  # fashion_mnist() / mnist() check the MD5s themselves, before converting
            used[filename] = _obtain(source, subfolder, filename, url.format(name=filename), target / "downloads")
        log(f"converting {len(files)} IDX files to PNG folders")
        common = {used[f].parent for f in files}
        folder = common.pop() if len(common) == 1 else None
        root = convert(source=folder, cache_dir=target, progress=progress)
        roots = {"train": root / "train", "test": root / "test"}
    sums = "".join(f"{_sha256(path)}  {filename}\n" for filename, path in sorted(used.items()))
    (target / "SHA256SUMS").write_text(sums, encoding="utf-8")
    return roots
