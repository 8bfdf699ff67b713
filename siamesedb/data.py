"""Labelled folders in, tensors out: scan a folder, load images robustly, preprocess them, sample pairs and episodes."""

from __future__ import annotations

import hashlib
import io
import os
import re
import stat
import warnings
from collections import deque
from collections.abc import Iterator, Sequence
from concurrent.futures import Future, ProcessPoolExecutor
from dataclasses import dataclass
from itertools import islice
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image, ImageFile, ImageOps

from siamesedb.errors import FolderError, ImageLoadError, InvalidInputError

IMAGE_EXTENSIONS = frozenset({".png", ".jpg", ".jpeg", ".pgm", ".ppm", ".pbm", ".bmp", ".webp", ".tif", ".tiff"})
MAX_PIXELS = 64_000_000  # refuse larger declared sizes: a decompression bomb must fail fast, not fill memory


FORGED = "forged"  # a class `X/forged` holds skilled forgeries of class `X/genuine`
GENUINE = "genuine"


@dataclass(frozen=True)
class LabelledImage:
    path: Path
    label: str


def label_for(path: str | os.PathLike, root: str | os.PathLike) -> str:
    """Parent folder relative to root with '/' separators (`Latin/character07`); a root-level file -> its stem."""
    try:
        relative = Path(path).relative_to(root)
    except ValueError:
        raise InvalidInputError(f"{path} is not inside {root}") from None
    parent = relative.parent.as_posix()
    return relative.stem if parent in ("", ".") else parent


def group_of(label: str) -> str:
    """The first component of a label: the alphabet of `Latin/character07`, the writer of `U31/genuine`."""
    return label.split("/", 1)[0]


def forgery_target(label: str, labels: set[str] | frozenset[str]) -> str | None:
    """The genuine class that `label` forges (`U01/forged` -> `U01/genuine` when that class exists), else None."""
    head, _, tail = label.rpartition("/")
    if tail != FORGED or not head:
        return None
    target = f"{head}/{GENUINE}"
    return target if target in labels else None


def _expand_group_range(spec: str) -> set[str] | None:
    """`U01-U30` -> {U01, ..., U30} (same prefix, zero-padded numbers); None if `spec` is not such a range."""
    match = re.fullmatch(r"([^\d,]*)(\d+)-\1(\d+)", spec.strip())
    if not match:
        return None
    prefix, start, end = match.group(1), match.group(2), match.group(3)
    width = len(start)
    return {f"{prefix}{n:0{width}d}" for n in range(int(start), int(end) + 1)}


def parse_groups(spec: str | None) -> set[str] | None:
    """A group selection: comma-separated names and ranges (`U01-U30`, `Latin,Greek`); None/empty selects all."""
    if not spec:
        return None
    selected: set[str] = set()
    for part in spec.split(","):
        part = part.strip()
        if not part:
            continue
        expanded = _expand_group_range(part)
        selected |= expanded if expanded is not None else {part}
    return selected


def select_groups(images: Sequence[LabelledImage], spec: str | None) -> list[LabelledImage]:
    """The images whose group (first label component) is in the selection; every image when `spec` is empty."""
    groups = parse_groups(spec)
    if groups is None:
        return list(images)
    chosen = [im for im in images if group_of(im.label) in groups]
    if not chosen:
        raise FolderError(f"no images in the groups {spec!r}")
    return chosen



def scan_folder(root: str | os.PathLike) -> list[LabelledImage]:
    """Every image under `root` (recursively, hidden entries skipped), sorted by (label, path)."""
    root = Path(root)
    if not root.exists():
        raise FolderError(f"{root}: folder not found")
    if not root.is_dir():
        raise FolderError(f"{root}: not a folder")
    found: list[LabelledImage] = []
    seen_dirs: set[tuple[int, int]] = set()
    # os.walk with followlinks=True plus a (device, inode) set: follows folder symlinks once, never loops.
    for dirpath, dirnames, filenames in os.walk(root, followlinks=True):
        try:
            st = os.stat(dirpath)
        except OSError:
            dirnames[:] = []
            continue
        if (st.st_dev, st.st_ino) in seen_dirs:
            dirnames[:] = []
            continue
        seen_dirs.add((st.st_dev, st.st_ino))
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        # The label of every file in this folder, worked out once per folder with string operations (pathlib per
        # file was most of the scan's time); the same answer as label_for.
        folder_label = Path(os.path.relpath(dirpath, root)).as_posix()
        for name in filenames:
            stem, suffix = os.path.splitext(name)
            if name.startswith(".") or suffix.lower() not in IMAGE_EXTENSIONS:
                continue
            label = stem if folder_label in ("", ".") else folder_label
            found.append(LabelledImage(path=Path(os.path.join(dirpath, name)), label=label))
    if not found:
        raise FolderError(f"{root}: no images (looked for {', '.join(sorted(IMAGE_EXTENSIONS))})")
    found.sort(key=lambda im: (im.label, str(im.path)))
    return found


def file_sha256(path: str | os.PathLike) -> str:
    """Hex SHA-256 of a file's bytes, read in 1 MiB blocks (constant memory for any size)."""
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


# ------------------------------------------------------------------------------------------------ loading

_HIGH_BIT_MODES = frozenset({"I;16", "I;16B", "I;16L", "I;16N", "I", "F"})


def _white_level(mode: str, array: np.ndarray) -> float:
    """The value that means white: 65535 for 16-bit modes; 32-bit 'I' and float 'F' are judged by their range."""
    if mode.startswith("I;16"):
        return 65535.0
    peak = float(array.max(initial=0.0))
    if mode == "F" and peak <= 1.0:
        return 1.0
    if peak <= 255.0:
        return 255.0
    return 65535.0 if peak <= 65535.0 else peak


def _to_l_or_rgb(image: Image.Image) -> Image.Image:
    """Any PIL mode -> 'L' or 'RGB'; alpha is composited on white (a transparent background reads as paper)."""
    mode = image.mode
    if mode in ("L", "RGB"):
        return image
    if mode == "1":
        return image.convert("L")
    if mode in _HIGH_BIT_MODES:
        # PIL's own convert('L') clips 16-bit values at 255 (a white page of 65535 would stay white, but a mid-grey
        # 30000 would too); scaling keeps the tones.
        array = np.nan_to_num(np.asarray(image, dtype=np.float64))
        scaled = np.clip(array / _white_level(mode, array) * 255.0 + 0.5, 0, 255).astype(np.uint8)
        return Image.fromarray(scaled)
    if mode == "P":
        image = image.convert("RGBA") if "transparency" in image.info else image.convert("RGB")
        mode = image.mode
    if mode in ("LA", "La", "PA", "RGBA", "RGBa"):
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        out = Image.alpha_composite(background, rgba).convert("RGB")
        return out.convert("L") if mode in ("LA", "La") else out
    return image.convert("RGB")  # CMYK, YCbCr, HSV...


def _decode_opened(opened: Image.Image, source: Any, draft: tuple[int, int] | None = None) -> Image.Image:
    """An image fresh from Image.open -> its decoded first frame, upright, detached from the file; a JPEG at the
    smallest DCT scale covering `draft` (width, height) when given."""
    width, height = opened.size
    # The declared size is known before any pixel is decoded: a bomb is refused here, at no cost.
    if width * height > MAX_PIXELS:
        raise ImageLoadError(source, f"image too large ({width}x{height} pixels, limit {MAX_PIXELS:,})")
    if draft is not None and opened.format == "JPEG":
        # Square request (the longer side both ways): EXIF orientation may still swap width and height below.
        side = max(draft)
        opened.draft(opened.mode, (side, side))  # 4000x3000 -> 500x375 for a 28 px input: ~1/8 of the decoding
    opened.load()  # Image.open leaves an animation on its first frame, so this decodes frame 0
    try:
        return ImageOps.exif_transpose(opened)  # a new, upright image (a plain copy when there is no orientation)
    except Exception:  # a malformed EXIF block says nothing about the pixels, which did decode: keep them as stored
        return opened.copy()


def _open_path(source: str | os.PathLike, draft: tuple[int, int] | None = None) -> Image.Image:
    path = Path(source)
    if not path.exists():
        raise ImageLoadError(source, "no such file")
    if path.is_dir():
        raise ImageLoadError(source, "is a folder, not an image")
    if not path.is_file():
        raise ImageLoadError(source, "not a regular file")  # a FIFO or device would block the reader forever
    if path.stat().st_size == 0:
        raise ImageLoadError(source, "empty file")
    with warnings.catch_warnings():
        # PIL only warns between its own limit and twice that; make it an error so nothing that large is decoded.
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        with Image.open(path) as opened:
            return _decode_opened(opened, source, draft)


@dataclass(frozen=True)
class EncodedFile:
    """A file's bytes already read into memory (e.g. to hash and decode them from one read), and where they came from."""

    data: bytes
    name: str

    def __str__(self) -> str:  # error messages name the file, not its bytes
        return self.name


def _open_bytes(source: EncodedFile, draft: tuple[int, int] | None = None) -> Image.Image:
    if not source.data:
        raise ImageLoadError(source, "empty file")
    with warnings.catch_warnings():
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        with Image.open(io.BytesIO(source.data)) as opened:
            return _decode_opened(opened, source, draft)


def _read_file_like(source: Any) -> bytes:
    name = str(getattr(source, "name", "<file object>"))
    data = source.read()
    if isinstance(data, str):
        raise ImageLoadError(name, "file object is open in text mode; open it with 'rb'")
    return bytes(data)


def load_image(source: Any, draft: tuple[int, int] | None = None) -> Image.Image:
    """A path, PIL image, numpy array, the bytes of an encoded image file, or a binary file object -> a PIL image in
    mode 'L' or 'RGB'. Every failure is an ImageLoadError.

    `draft` (width, height): a JPEG file may be decoded at 1/2, 1/4 or 1/8 scale (Pillow's draft mode, the DCT
    scaled in libjpeg), the smallest that still covers this size in both directions; other formats ignore it.
    `Preprocessing.draft_size` is the size that keeps the encoder's input the same within rounding.

    Files: first frame of an animation, EXIF orientation applied, 16-bit scaled to 8-bit, alpha composited on white,
    images declaring more than MAX_PIXELS pixels refused before decoding. A PIL image straight from Image.open is
    treated like its file; any other PIL image is taken as it is.
    """
    try:
        if isinstance(source, (str, os.PathLike)):
            image = _open_path(source, draft)
        elif isinstance(source, EncodedFile):
            image = _open_bytes(source, draft)
        elif isinstance(source, ImageFile.ImageFile):
            image = _decode_opened(source, getattr(source, "filename", None) or "<image>", draft)
        elif isinstance(source, Image.Image):
            image = source
        elif isinstance(source, np.ndarray):
            image = _array_to_image(source)
        elif isinstance(source, (bytes, bytearray, memoryview)):  # an encoded file's bytes (an upload, a blob)
            image = _open_bytes(EncodedFile(bytes(source), f"<{len(source)} bytes>"))
        elif callable(getattr(source, "read", None)):  # a file-like object opened in binary mode
            image = _open_bytes(EncodedFile(_read_file_like(source), str(getattr(source, "name", "<file object>"))))
        else:
            raise ImageLoadError(f"<{type(source).__name__}>", f"unsupported image type {type(source).__name__} "
                                 "(give a path, PIL image, numpy array, bytes or binary file object)")
        if image.width < 1 or image.height < 1:
            raise ImageLoadError(source, "image has no pixels")
        return _to_l_or_rgb(image)
    except ImageLoadError:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning):
        raise ImageLoadError(source, "image too large (decompression bomb guard)") from None
    except PermissionError:
        raise ImageLoadError(source, "permission denied") from None
    except Image.UnidentifiedImageError:
        raise ImageLoadError(source, "not a recognised image format") from None
    except Exception as exc:  # decoders raise OSError, SyntaxError, struct.error, zlib.error...: one kind for callers
        text = str(exc).strip()
        reason = text.splitlines()[0] if text else type(exc).__name__
        raise ImageLoadError(source, f"unreadable image ({reason})") from None


def _array_to_image(array: np.ndarray) -> Image.Image:
    """HxW or HxWx{1,3,4} array -> PIL image. uint8 as is; uint16 scaled from 0..65535; float taken in [0, 1]."""
    if array.ndim == 3 and array.shape[2] == 1:
        array = array[:, :, 0]
    if array.ndim not in (2, 3) or (array.ndim == 3 and array.shape[2] not in (3, 4)):
        raise ImageLoadError("<array>", f"array of shape {array.shape} is not an HxW or HxWx3/4 image")
    if array.dtype == np.uint8:
        pass
    elif array.dtype == np.bool_:
        array = array.astype(np.uint8) * 255
    elif array.dtype == np.uint16:
        array = (array.astype(np.float64) / 65535.0 * 255.0 + 0.5).astype(np.uint8)
    elif np.issubdtype(array.dtype, np.integer):
        # Other integer arrays (np.array([[0, 255]]) is int64): 8-bit values if they fit, else 16-bit ones.
        low, high = int(array.min(initial=0)), int(array.max(initial=0))
        if low < 0 or high > 65535:
            raise ImageLoadError("<array>", f"integer values {low}..{high} outside 0..65535")
        top = 255.0 if high <= 255 else 65535.0
        array = (array.astype(np.float64) / top * 255.0 + 0.5).astype(np.uint8)
    elif np.issubdtype(array.dtype, np.floating):
        if not np.isfinite(array).all():
            raise ImageLoadError("<array>", "array contains NaN or infinity")
        array = (np.clip(array, 0.0, 1.0) * 255.0 + 0.5).astype(np.uint8)
    else:
        raise ImageLoadError("<array>", f"unsupported array dtype {array.dtype}")
    return Image.fromarray(np.ascontiguousarray(array))


# ------------------------------------------------------------------------------------------------ preprocessing


DRAFT_MARGIN = 2  # a JPEG is decoded at a DCT scale covering this many times the input size (see draft_size)


@dataclass
class Preprocessing:
    """How an image becomes the encoder's input tensor; saved in the encoder's config.json."""

    size: tuple[int, int] = (28, 28)  # (H, W)
    channels: int = 1
    invert: bool = True  # dark strokes on white -> bright strokes on black (characters, signatures)
    mean: float = 0.0
    std: float = 1.0
    keep_aspect: bool = False  # fit inside size and pad with background (signatures are wide)

    def __post_init__(self) -> None:
        try:
            size = (int(self.size), int(self.size)) if np.ndim(self.size) == 0 else tuple(int(s) for s in self.size)
        except (TypeError, ValueError):
            size = ()
        if len(size) != 2 or min(size) < 1:
            raise InvalidInputError(f"size must be (height, width) of positive integers, got {self.size!r}")
        self.size = size
        if self.channels not in (1, 3):
            raise InvalidInputError(f"channels must be 1 or 3, got {self.channels}")
        # Plain Python scalars, so to_dict() is JSON-safe even when numpy values were passed in.
        self.mean, self.std = float(self.mean), float(self.std)
        self.invert, self.keep_aspect = bool(self.invert), bool(self.keep_aspect)
        if not self.std > 0:
            raise InvalidInputError(f"std must be positive, got {self.std}")

    def to_array(self, image: Image.Image) -> np.ndarray:
        """PIL image -> (C, H, W) float32 numpy array (what to_tensor wraps; numpy only, so safe in worker processes)."""
        if image.mode not in ("L", "RGB"):
            image = _to_l_or_rgb(image)
        wanted = "L" if self.channels == 1 else "RGB"
        if image.mode != wanted:
            image = image.convert(wanted)
        height, width = self.size
        if self.keep_aspect:
            scale = min(width / image.width, height / image.height)
            inner = (max(1, round(image.width * scale)), max(1, round(image.height * scale)))
            resized = image.resize(inner, Image.Resampling.BILINEAR, reducing_gap=3.0)
            # Background is white paper before inversion, so padding matches the page, not the ink.
            canvas = Image.new(image.mode, (width, height), 255 if image.mode == "L" else (255, 255, 255))
            canvas.paste(resized, ((width - inner[0]) // 2, (height - inner[1]) // 2))
            image = canvas
        elif image.size != (width, height):
            # BILINEAR in PIL widens its filter when shrinking, so this is antialiased.
            image = image.resize((width, height), Image.Resampling.BILINEAR, reducing_gap=3.0)
        array = np.asarray(image, dtype=np.float32) / 255.0  # (H, W) or (H, W, 3) in [0, 1]
        if self.invert:
            array = 1.0 - array
        array = (array - self.mean) / self.std
        array = array[None] if array.ndim == 2 else array.transpose(2, 0, 1)
        return np.ascontiguousarray(array, dtype=np.float32)

    @property
    def draft_size(self) -> tuple[int, int]:
        """(width, height) a JPEG may be decoded down to (`load_image(..., draft=)`) without changing the input
        beyond rounding: DRAFT_MARGIN x the input size, so the resize below still averages several decoded pixels
        into each input pixel, as it does from the full decode (tests/test_data.py bounds the difference)."""
        height, width = self.size
        return (DRAFT_MARGIN * width, DRAFT_MARGIN * height)

    def to_tensor(self, image: Image.Image) -> torch.Tensor:
        """PIL image -> (C, H, W) float32 tensor."""
        return torch.from_numpy(self.to_array(image))

    def to_dict(self) -> dict[str, Any]:
        return {
            "size": list(self.size),
            "channels": self.channels,
            "invert": self.invert,
            "mean": self.mean,
            "std": self.std,
            "keep_aspect": self.keep_aspect,
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Preprocessing:
        """Inverse of to_dict; unknown keys are ignored so older readers accept newer configs."""
        known = {k: d[k] for k in ("size", "channels", "invert", "mean", "std", "keep_aspect") if k in d}
        if "size" in known:
            known["size"] = tuple(known["size"])
        return cls(**known)


# ------------------------------------------------------------------------------------------------ batches


def _decode_arrays(
    sources: Sequence[Any], preprocessing: Preprocessing, skip_errors: bool
) -> tuple[np.ndarray, list[int], list[tuple[int, str]]]:
    """Sources -> ((n, C, H, W) float32 of the readable ones, their positions, (position, reason) of the rest)."""
    arrays, kept, skipped = [], [], []
    for i, source in enumerate(sources):
        try:
            arrays.append(preprocessing.to_array(load_image(source, preprocessing.draft_size)))
        except ImageLoadError as exc:
            if not skip_errors:
                raise
            skipped.append((i, exc.reason))
            continue
        kept.append(i)
    height, width = preprocessing.size
    stacked = np.stack(arrays) if arrays else np.empty((0, preprocessing.channels, height, width), np.float32)
    return stacked, kept, skipped


def load_batch(
    sources: Sequence[Any], preprocessing: Preprocessing, skip_errors: bool = False
) -> tuple[torch.Tensor, list[int], list[tuple[Any, str]]]:
    """(N, C, H, W) tensor of the readable sources, their indices, and (source, reason) of the skipped ones.

    With skip_errors=False the first unreadable source raises its ImageLoadError.
    """
    array, kept, skipped = _decode_arrays(sources, preprocessing, skip_errors)
    return torch.from_numpy(array), kept, [(sources[i], reason) for i, reason in skipped]


def _decode_chunk(paths: list[str], prep: dict[str, Any]) -> tuple[np.ndarray, list[int], list[tuple[int, str]]]:
    """Worker process: decode one batch of paths. Numpy and PIL only: torch's thread pools are not fork-safe."""
    return _decode_arrays(paths, Preprocessing.from_dict(prep), skip_errors=True)


def iter_batches(
    images: Sequence[LabelledImage], preprocessing: Preprocessing, batch_size: int = 256, workers: int = 0
) -> Iterator[tuple[list[int], torch.Tensor, list[tuple[int, str]]]]:
    """Decode `images` in order, one batch at a time: (kept indices, (n, C, H, W) tensor, [(index, reason)]).

    Indices are positions in `images`; unreadable files are reported, never raised. With workers > 0 a process pool
    decodes up to 2 x workers batches ahead of the caller, so decoding overlaps whatever the caller does with each
    batch (encoding, writing) while memory stays bounded however many images there are.
    """
    if batch_size < 1:
        raise InvalidInputError(f"batch size must be positive, got {batch_size}")
    chunks = [(start, [str(im.path) for im in images[start : start + batch_size]])
              for start in range(0, len(images), batch_size)]

    def shifted(start: int, result: tuple[np.ndarray, list[int], list[tuple[int, str]]]):
        array, kept, skipped = result
        return [start + i for i in kept], torch.from_numpy(array), [(start + i, r) for i, r in skipped]

    if workers <= 0:
        for start, paths in chunks:
            yield shifted(start, _decode_arrays(paths, preprocessing, skip_errors=True))
        return
    prep = preprocessing.to_dict()
    for start, result in _run_ahead(_decode_chunk, [(start, (paths, prep)) for start, paths in chunks], workers):
        yield shifted(start, result)


MAX_READ_BYTES = 256 << 20  # larger files are hashed in blocks and decoded from disk instead of held in memory


@dataclass
class HashedBatch:
    """One batch of a build: what was decoded, what the store already holds, what could not be read.

    Every index is a position in the `images` given to `iter_hashed_batches`. `hashes[j]` is the sha256 of image
    `kept[j]`, whose preprocessed pixels are `tensor[j]` (n, C, H, W) float32.
    """

    kept: list[int]
    tensor: torch.Tensor
    hashes: list[str]
    held: list[int]  # files whose content hash equals the one the caller expected: not decoded
    skipped: list[tuple[int, str]]  # (index, reason)


def _read_for_build(path: str) -> EncodedFile | str:
    """One read of a regular file: its bytes (to hash and decode) or, when very large, just its path."""
    try:
        info = os.stat(path)
    except FileNotFoundError:
        raise ImageLoadError(path, "no such file") from None
    except PermissionError:
        raise ImageLoadError(path, "permission denied") from None
    except OSError as exc:
        raise ImageLoadError(path, exc.strerror or str(exc)) from None
    if stat.S_ISDIR(info.st_mode):
        raise ImageLoadError(path, "is a folder, not an image")
    if not stat.S_ISREG(info.st_mode):
        raise ImageLoadError(path, "not a regular file")  # a FIFO or device would block the reader forever
    if info.st_size == 0:
        raise ImageLoadError(path, "empty file")
    if info.st_size > MAX_READ_BYTES:
        return path
    try:
        with open(path, "rb") as fh:
            return EncodedFile(fh.read(), path)
    except PermissionError:
        raise ImageLoadError(path, "permission denied") from None
    except OSError as exc:
        raise ImageLoadError(path, exc.strerror or str(exc)) from None


def _hash_and_decode(
    paths: Sequence[str], expected: Sequence[str | None], prep: dict[str, Any]
) -> tuple[np.ndarray, list[int], list[str], list[int], list[tuple[int, str]]]:
    """Worker (or in-process) step of a build: read each file once, hash those bytes, decode them unless the hash
    equals `expected[i]` (the store already holds this file). Numpy and PIL only: safe in a forked worker.

    Returns ((n, C, H, W) float32 of the decoded files, their positions, their sha256s, positions held, skipped).
    """
    preprocessing = Preprocessing.from_dict(prep)
    arrays, kept, hashes, held, skipped = [], [], [], [], []
    for i, path in enumerate(paths):
        try:
            source = _read_for_build(path)
            digest = hashlib.sha256(source.data).hexdigest() if isinstance(source, EncodedFile) else file_sha256(path)
            if expected[i] is not None and digest == expected[i]:
                held.append(i)
                continue
            arrays.append(preprocessing.to_array(load_image(source, preprocessing.draft_size)))
        except ImageLoadError as exc:
            skipped.append((i, exc.reason))
            continue
        except OSError as exc:  # the streamed hash of a very large file
            skipped.append((i, exc.strerror or str(exc)))
            continue
        kept.append(i)
        hashes.append(digest)
    height, width = preprocessing.size
    stacked = np.stack(arrays) if arrays else np.empty((0, preprocessing.channels, height, width), np.float32)
    return stacked, kept, hashes, held, skipped


def iter_hashed_batches(
    images: Sequence[LabelledImage],
    preprocessing: Preprocessing,
    batch_size: int = 256,
    workers: int = 0,
    expected: Sequence[str | None] | None = None,
) -> Iterator[HashedBatch]:
    """The decoding stage of a build: each file is read once, hashed and decoded from those same bytes.

    `expected[i]` is the sha256 the caller already holds for image i (None if none): a file whose bytes still hash to
    it is reported in `held` without being decoded, so re-running a build costs one read and one hash per file.
    Batches come back in order; with workers > 0 a process pool works up to 2 x workers batches ahead of the
    caller, so reading, hashing and decoding overlap the caller's encoding and writing in bounded memory.
    """
    if batch_size < 1:
        raise InvalidInputError(f"batch size must be positive, got {batch_size}")
    if expected is None:
        expected = [None] * len(images)
    elif len(expected) != len(images):
        raise InvalidInputError(f"{len(images)} images but {len(expected)} expected hashes")
    prep = preprocessing.to_dict()
    tasks = [(start, ([str(im.path) for im in images[start : start + batch_size]],
                      list(expected[start : start + batch_size]), prep))
             for start in range(0, len(images), batch_size)]
    for start, (array, kept, hashes, held, skipped) in _run_ahead(_hash_and_decode, tasks, workers):
        yield HashedBatch(
            kept=[start + i for i in kept],
            tensor=torch.from_numpy(array),
            hashes=hashes,
            held=[start + i for i in held],
            skipped=[(start + i, reason) for i, reason in skipped],
        )


def _run_ahead(fn: Any, tasks: Sequence[tuple[int, tuple]], workers: int) -> Iterator[tuple[int, Any]]:
    """(key, fn(*args)) for each (key, args) task, in order; with workers > 0 computed in a process pool that keeps
    up to 2 x workers tasks in flight ahead of the consumer (bounded memory however many tasks there are)."""
    if workers <= 0 or len(tasks) < 2:  # one task: a pool would only add its start-up time
        for key, args in tasks:
            yield key, fn(*args)
        return
    todo = iter(tasks)
    pending: deque[tuple[int, Future]] = deque()
    with ProcessPoolExecutor(max_workers=min(workers, len(tasks))) as pool:
        try:
            for key, args in islice(todo, 2 * workers):
                pending.append((key, pool.submit(fn, *args)))
            while pending:
                key, future = pending.popleft()
                result = future.result()
                following = next(todo, None)
                if following is not None:  # refill before yielding: workers keep going while the consumer works
                    pending.append((following[0], pool.submit(fn, *following[1])))
                yield key, result
        finally:
            # A consumer that stops early (break, exception) waits only for the tasks already running.
            for _, future in pending:
                future.cancel()


# ------------------------------------------------------------------------------------------------ samplers


def _group_by_class(labels: Sequence[int]) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """(labels (n,) int64, order (n,), offsets (C,), counts (C,)): the items of class position c, ascending, are
    order[offsets[c] : offsets[c] + counts[c]] — so a uniform item of class c is one integer draw, no Python loop."""
    labels = np.asarray(labels, dtype=np.int64).reshape(-1)
    _, inverse, counts = np.unique(labels, return_inverse=True, return_counts=True)
    order = np.argsort(inverse, kind="stable")
    offsets = np.concatenate([[0], np.cumsum(counts)[:-1]]).astype(np.int64)
    return labels, order, offsets, counts.astype(np.int64)


def _members(order: np.ndarray, offsets: np.ndarray, counts: np.ndarray) -> list[np.ndarray]:
    return [order[o : o + c] for o, c in zip(offsets, counts)]


class PairSampler:
    """Random genuine / impostor pairs for contrastive and pairwise losses: half same-class, half different.

    Genuine pairs: a class uniformly among those with two or more items, then two different items of it. Impostor
    pairs: two different classes uniformly, one item of each. `forgery_of` maps a forged class to the genuine class it
    imitates (`U01/forged` -> `U01/genuine`). Forged classes never form genuine pairs; a `hard_fraction` of the
    impostor pairs is (genuine item, its skilled forgery), the hardest negatives there are.
    """

    def __init__(self, labels: Sequence[int], seed: int = 0, forgery_of: dict[int, int] | None = None,
                 hard_fraction: float = 0.5):
        self.labels, self.order, self.offsets, self.counts = _group_by_class(labels)
        self.rng = np.random.default_rng(seed)
        classes = np.unique(self.labels)
        position = {int(c): i for i, c in enumerate(classes)}
        self.members = _members(self.order, self.offsets, self.counts)
        # forged class position -> genuine class position, for the classes present in `labels`
        self.forgeries = {position[f]: position[g] for f, g in (forgery_of or {}).items()
                          if f in position and g in position}
        self.pairable = np.asarray([c for c, n in enumerate(self.counts) if n >= 2 and c not in self.forgeries],
                                   dtype=np.int64)
        self.forged_classes = np.asarray(sorted(self.forgeries), dtype=np.int64)
        self.genuine_of = np.full(len(classes), -1, dtype=np.int64)
        for forged, genuine in self.forgeries.items():
            self.genuine_of[forged] = genuine
        self.hard_fraction = float(hard_fraction) if len(self.forged_classes) else 0.0
        if len(classes) < 2 or len(self.pairable) == 0:
            raise InvalidInputError("pairs need at least two classes and one class with two items")

    def _item_of(self, classes: np.ndarray) -> np.ndarray:
        """One uniformly drawn item index of each class position in `classes`."""
        return self.order[self.offsets[classes] + self.rng.integers(0, self.counts[classes])]

    def sample(self, n: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(idx_a (n,) int64, idx_b (n,) int64, same (n,) float32): the first n // 2 genuine, the rest impostor."""
        if n < 0:
            raise InvalidInputError(f"number of pairs must be >= 0, got {n}")
        n_same, n_diff = n // 2, n - n // 2
        # Genuine: positions i != j inside one class (j drawn from the count - 1 others, then shifted past i).
        cls = self.rng.choice(self.pairable, size=n_same)
        i = self.rng.integers(0, self.counts[cls])
        j = self.rng.integers(0, self.counts[cls] - 1)
        j += j >= i
        base = self.offsets[cls]
        same_a, same_b = self.order[base + i], self.order[base + j]
        # Impostor: two different classes (cb drawn from the C - 1 others, then shifted past ca) ...
        n_classes = len(self.counts)
        ca = self.rng.integers(0, n_classes, size=n_diff)
        cb = self.rng.integers(0, n_classes - 1, size=n_diff)
        cb += cb >= ca
        if self.hard_fraction:
            # ... or, for a hard_fraction of them, a genuine class and its own forgeries.
            hard = self.rng.random(n_diff) < self.hard_fraction
            forged = self.rng.choice(self.forged_classes, size=n_diff)
            ca = np.where(hard, self.genuine_of[forged], ca)
            cb = np.where(hard, forged, cb)
        a = np.concatenate([same_a, self._item_of(ca)]).astype(np.int64)
        b = np.concatenate([same_b, self._item_of(cb)]).astype(np.int64)
        same = np.zeros(n, dtype=np.float32)
        same[:n_same] = 1.0
        return a, b, same


class ClassBalancedSampler:
    """P x K batches: P distinct classes, K items each (for triplet mining).

    A class with fewer than K items gives all it has plus repeats (drawn with replacement); others give K distinct.
    """

    def __init__(self, labels: Sequence[int], classes_per_batch: int, per_class: int, seed: int = 0):
        self.labels, order, offsets, counts = _group_by_class(labels)
        self.members = _members(order, offsets, counts)
        if classes_per_batch < 1 or per_class < 1:
            raise InvalidInputError(f"need P >= 1 and K >= 1, got P={classes_per_batch}, K={per_class}")
        if classes_per_batch > len(self.members):
            raise InvalidInputError(f"{classes_per_batch} classes per batch but only {len(self.members)} classes")
        self.p, self.k = classes_per_batch, per_class
        self.rng = np.random.default_rng(seed)

    def sample(self) -> np.ndarray:
        """(P*K,) indices, class-major: K items of the first class, then K of the second..."""
        out = []
        for c in self.rng.choice(len(self.members), size=self.p, replace=False):
            m = self.members[c]
            out.append(self.rng.choice(m, size=self.k, replace=len(m) < self.k))
        return np.concatenate(out).astype(np.int64)


class EpisodeSampler:
    """N-way K-shot episodes for prototypical training and evaluation: disjoint support and query items per class."""

    def __init__(self, labels: Sequence[int], way: int, shot: int, queries: int, seed: int = 0,
                 forgery_of: dict[int, int] | None = None, group_of_class: dict[int, int] | None = None,
                 within_group: float = 0.0):
        """`forgery_of` (forged class label -> genuine class label): an episode that draws a genuine class also draws
        its skilled forgeries as another class, so the loss must tell each writer from their imitators.

        `group_of_class` (class label -> group id, e.g. its alphabet) and `within_group` (a fraction): that share of
        episodes draws all its classes from one group, picked uniformly, at most `way` of them (fewer when the group
        is smaller, so those episodes are narrower): the look-alike rivals of Omniglot's within-alphabet test.
        """
        if way < 1 or shot < 1 or queries < 0:
            raise InvalidInputError(f"need way >= 1, shot >= 1, queries >= 0; got {way}, {shot}, {queries}")
        self.labels, order, offsets, counts = _group_by_class(labels)
        self.members = _members(order, offsets, counts)
        self.eligible = np.asarray([c for c, n in enumerate(counts) if n >= shot + queries], dtype=np.int64)
        if len(self.eligible) < way:
            raise InvalidInputError(f"only {len(self.eligible)} classes have {shot + queries} items; need {way}")
        self.way, self.shot, self.queries = way, shot, queries
        self.rng = np.random.default_rng(seed)
        # Class positions (indices into members): genuine position -> its eligible forged position.
        position = {int(label): c for c, label in enumerate(np.unique(self.labels))}
        eligible = set(self.eligible.tolist())
        self.forged_position = {position[g]: position[f] for f, g in (forgery_of or {}).items()
                                if f in position and g in position and position[f] in eligible}
        if not 0.0 <= within_group <= 1.0:
            raise InvalidInputError(f"within_group must be a fraction in [0, 1], got {within_group}")
        self.within_group = within_group if group_of_class else 0.0
        self.group_members: list[np.ndarray] = []  # per group: its eligible class positions (groups of >= 2 only)
        if self.within_group:
            by_group: dict[int, list[int]] = {}
            for label, c in position.items():
                if c in eligible and label in group_of_class:
                    by_group.setdefault(int(group_of_class[label]), []).append(c)
            self.group_members = [np.asarray(sorted(m), dtype=np.int64) for _, m in sorted(by_group.items()) if len(m) >= 2]
            if not self.group_members:
                raise InvalidInputError("within_group episodes need a group with at least two eligible classes")

    def _classes(self) -> np.ndarray:
        """`way` distinct class positions; with forgeries, each drawn genuine class brings its forged class along."""
        # The coin is only tossed when within-group episodes are asked for, so other runs draw what they always did.
        if self.within_group and self.rng.random() < self.within_group:
            group = self.group_members[self.rng.integers(len(self.group_members))]
            return self.rng.choice(group, size=min(self.way, len(group)), replace=False)
        if not self.forged_position:
            return self.rng.choice(self.eligible, size=self.way, replace=False)
        forged = set(self.forged_position.values())
        chosen: list[int] = []
        for c in self.rng.permutation(self.eligible).tolist():
            if len(chosen) == self.way:
                break
            if c in forged or c in chosen:
                continue  # forged classes come in with their genuine class, or fill the episode at the end
            chosen.append(c)
            if c in self.forged_position and len(chosen) < self.way:
                chosen.append(self.forged_position[c])
        if len(chosen) < self.way:
            spare = [c for c in self.eligible.tolist() if c not in chosen]
            chosen += self.rng.choice(spare, size=self.way - len(chosen), replace=False).tolist()
        return np.asarray(chosen, dtype=np.int64)

    def sample(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(support (w*shot,), query (w*queries,), query episode labels (w*queries,) in 0..w-1), w = `way` (or
        fewer in a within-group episode of a small group: w = len(support) // shot).

        Both index arrays are class-major; the support's episode labels are np.repeat(arange(w), shot).
        """
        support, query = [], []
        classes = self._classes()
        for c in classes:
            picked = self.rng.choice(self.members[c], size=self.shot + self.queries, replace=False)
            support.append(picked[: self.shot])
            query.append(picked[self.shot :])
        return (np.concatenate(support).astype(np.int64), np.concatenate(query).astype(np.int64),
                np.repeat(np.arange(len(classes)), self.queries))


# ---------------------------------------------------------------------------------------------- what images look like


class DomainWarning(UserWarning):
    """Images look unlike what the encoder was trained on: its vectors (and thresholds) may mean little."""


def image_profile(sources: Sequence[Any], limit: int = 64) -> dict[str, Any]:
    """What a sample of images looks like: median aspect (width / height) and size, the share in colour, and the
    share on a light background (ink on paper) -- enough to tell glyphs, signatures and photos apart.

    Reads at most `limit` images (spread evenly over `sources`); unreadable ones are left out. {} when none reads.
    """
    step = max(1, len(sources) // max(1, limit))
    aspects, widths, heights, colour, light, mid = [], [], [], [], [], []
    for source in list(sources)[::step][:limit]:
        try:
            image = load_image(source)
        except ImageLoadError:
            continue
        widths.append(image.width)
        heights.append(image.height)
        aspects.append(image.width / image.height)
        small = np.asarray(image.resize((32, 32)), dtype=np.float32)
        colour.append(small.ndim == 3 and float(np.abs(small - small.mean(axis=2, keepdims=True)).mean()) > 8.0)
        light.append(float(small.mean()) > 127.5)
        grey = small.mean(axis=2) if small.ndim == 3 else small
        mid.append(float(np.mean((grey > 48) & (grey < 208))))  # photos: mostly mid-tones; ink on paper: few
    if not aspects:
        return {}
    return {
        "images": len(aspects),
        "aspect": round(float(np.median(aspects)), 3),
        "size": [int(np.median(widths)), int(np.median(heights))],
        "colour": round(float(np.mean(colour)), 3),
        "light_background": round(float(np.mean(light)), 3),
        "mid_tones": round(float(np.median(mid)), 3),
    }


def profile_mismatch(trained: dict[str, Any], seen: dict[str, Any]) -> str | None:
    """Why images with profile `seen` look out of domain for an encoder trained on `trained`, or None."""
    if not trained or not seen:
        return None
    reasons = []
    ratio = seen["aspect"] / trained["aspect"]
    if ratio > 1.5 or ratio < 1 / 1.5:
        reasons.append(f"aspect {seen['aspect']:.2f} (trained on {trained['aspect']:.2f})")
    if abs(seen["colour"] - trained["colour"]) > 0.5:
        kind = {True: "colour", False: "grey"}
        reasons.append(f"{kind[seen['colour'] > 0.5]} images (trained on {kind[trained['colour'] > 0.5]})")
    if abs(seen["light_background"] - trained["light_background"]) > 0.5:
        kind = {True: "light", False: "dark"}
        reasons.append(f"{kind[seen['light_background'] > 0.5]} backgrounds "
                       f"(trained on {kind[trained['light_background'] > 0.5]})")
    if "mid_tones" in trained and "mid_tones" in seen and abs(seen["mid_tones"] - trained["mid_tones"]) > 0.35:
        kind = {True: "photo-like (mostly mid-tones)", False: "drawing-like (ink and paper)"}
        reasons.append(f"{kind[seen['mid_tones'] > trained['mid_tones']]} images")
    return ", ".join(reasons) or None
