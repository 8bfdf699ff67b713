"""Labelled folders in, tensors out: scan a folder, load images robustly, preprocess them, sample pairs and episodes."""

from __future__ import annotations

import hashlib
import os
import re
import warnings
from collections.abc import Iterator, Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image, ImageOps

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
    relative = Path(path).relative_to(root)
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
        for name in filenames:
            if name.startswith(".") or Path(name).suffix.lower() not in IMAGE_EXTENSIONS:
                continue
            path = Path(dirpath) / name
            found.append(LabelledImage(path=path, label=label_for(path, root)))
    if not found:
        raise FolderError(f"{root}: no images (looked for {', '.join(sorted(IMAGE_EXTENSIONS))})")
    found.sort(key=lambda im: (im.label, str(im.path)))
    return found


def file_sha256(path: str | os.PathLike) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _to_l_or_rgb(image: Image.Image) -> Image.Image:
    """Any PIL mode -> 'L' or 'RGB'; alpha is composited on white (a transparent background reads as paper)."""
    mode = image.mode
    if mode in ("L", "RGB"):
        return image
    if mode == "1":
        return image.convert("L")
    if mode in ("I;16", "I;16B", "I;16L", "I;16N", "I", "F"):
        array = np.asarray(image, dtype=np.float64)
        top = 65535.0 if mode.startswith("I;16") or array.max(initial=0) > 255 else 255.0
        return Image.fromarray(np.clip(array / top * 255.0 + 0.5, 0, 255).astype(np.uint8), mode="L")
    if mode == "P":
        image = image.convert("RGBA") if "transparency" in image.info else image.convert("RGB")
        mode = image.mode
    if mode in ("LA", "La", "PA", "RGBA", "RGBa"):
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        out = Image.alpha_composite(background, rgba).convert("RGB")
        return out.convert("L") if mode in ("LA", "La") else out
    return image.convert("RGB")  # CMYK, YCbCr, LAB, HSV...


def load_image(source: Any) -> Image.Image:
    """A path, PIL image or numpy array -> a PIL image in mode 'L' or 'RGB'. Every failure is an ImageLoadError."""
    try:
        if isinstance(source, Image.Image):
            image = source
        elif isinstance(source, np.ndarray):
            image = _array_to_image(source)
        elif isinstance(source, (str, os.PathLike)):
            path = Path(source)
            if not path.exists():
                raise ImageLoadError(source, "no such file")
            if path.is_dir():
                raise ImageLoadError(source, "is a folder, not an image")
            if path.stat().st_size == 0:
                raise ImageLoadError(source, "empty file")
            with warnings.catch_warnings():
                warnings.simplefilter("error", Image.DecompressionBombWarning)
                with Image.open(path) as opened:
                    width, height = opened.size
                    if width * height > MAX_PIXELS:
                        raise ImageLoadError(source, f"image too large ({width}x{height} pixels)")
                    if getattr(opened, "n_frames", 1) > 1:
                        opened.seek(0)  # animated: the first frame
                    opened.load()
                    image = ImageOps.exif_transpose(opened) or opened
                    image = image.copy()
        else:
            raise ImageLoadError(repr(source)[:80], f"unsupported image type {type(source).__name__}")
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
    except (OSError, SyntaxError, ValueError, TypeError, EOFError, MemoryError, IndexError, KeyError) as exc:
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ImageLoadError(source, f"unreadable image ({reason})") from None


def _array_to_image(array: np.ndarray) -> Image.Image:
    if array.ndim == 3 and array.shape[2] == 1:
        array = array[:, :, 0]
    if array.ndim not in (2, 3) or (array.ndim == 3 and array.shape[2] not in (3, 4)):
        raise ImageLoadError("<array>", f"array of shape {array.shape} is not an HxW or HxWx3/4 image")
    if array.dtype == np.uint8:
        pass
    elif array.dtype == np.uint16:
        array = (array.astype(np.float64) / 65535.0 * 255.0 + 0.5).astype(np.uint8)
    elif np.issubdtype(array.dtype, np.floating):
        if not np.isfinite(array).all():
            raise ImageLoadError("<array>", "array contains NaN or infinity")
        array = (np.clip(array, 0.0, 1.0) * 255.0 + 0.5).astype(np.uint8)
    else:
        raise ImageLoadError("<array>", f"unsupported array dtype {array.dtype}")
    return Image.fromarray(np.ascontiguousarray(array))


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
        self.size = (int(self.size[0]), int(self.size[1]))
        if self.channels not in (1, 3):
            raise InvalidInputError(f"channels must be 1 or 3, got {self.channels}")
        if self.std <= 0:
            raise InvalidInputError(f"std must be positive, got {self.std}")

    def to_tensor(self, image: Image.Image) -> torch.Tensor:
        """PIL image -> (C, H, W) float32."""
        image = image.convert("L" if self.channels == 1 else "RGB")
        height, width = self.size
        if self.keep_aspect:
            scale = min(width / image.width, height / image.height)
            inner = (max(1, round(image.width * scale)), max(1, round(image.height * scale)))
            resized = image.resize(inner, Image.Resampling.BILINEAR, reducing_gap=3.0)
            canvas = Image.new(image.mode, (width, height), 255 if image.mode == "L" else (255, 255, 255))
            canvas.paste(resized, ((width - inner[0]) // 2, (height - inner[1]) // 2))
            image = canvas
        elif image.size != (width, height):
            # BILINEAR in PIL widens its filter when shrinking, so this is antialiased.
            image = image.resize((width, height), Image.Resampling.BILINEAR, reducing_gap=3.0)
        array = np.asarray(image, dtype=np.float32) / 255.0
        if self.invert:
            array = 1.0 - array
        array = (array - self.mean) / self.std
        tensor = torch.from_numpy(np.ascontiguousarray(array))
        return tensor.unsqueeze(0) if tensor.ndim == 2 else tensor.permute(2, 0, 1).contiguous()

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
        known = {k: d[k] for k in ("size", "channels", "invert", "mean", "std", "keep_aspect") if k in d}
        if "size" in known:
            known["size"] = tuple(known["size"])
        return cls(**known)


def load_batch(
    sources: Sequence[Any], preprocessing: Preprocessing, skip_errors: bool = False
) -> tuple[torch.Tensor, list[int], list[tuple[Any, str]]]:
    """(N, C, H, W) tensor of the readable sources, their indices, and (source, reason) of the skipped ones."""
    tensors, kept, skipped = [], [], []
    for i, source in enumerate(sources):
        try:
            tensors.append(preprocessing.to_tensor(load_image(source)))
            kept.append(i)
        except ImageLoadError as exc:
            if not skip_errors:
                raise
            skipped.append((source, exc.reason))
    height, width = preprocessing.size
    batch = torch.stack(tensors) if tensors else torch.empty((0, preprocessing.channels, height, width))
    return batch, kept, skipped


def _decode_chunk(args: tuple[list[str], dict[str, Any]]) -> tuple[np.ndarray, list[int], list[tuple[int, str]]]:
    """Worker: decode a chunk of paths -> (n, C, H, W) float32 array, kept positions, (position, reason)."""
    paths, prep = args
    preprocessing = Preprocessing.from_dict(prep)
    batch, kept, skipped = load_batch(paths, preprocessing, skip_errors=True)
    positions = {p: i for i, p in enumerate(paths)}
    return batch.numpy(), kept, [(positions[s], r) for s, r in skipped]


def iter_batches(
    images: Sequence[LabelledImage], preprocessing: Preprocessing, batch_size: int = 256, workers: int = 0
) -> Iterator[tuple[list[int], torch.Tensor, list[tuple[int, str]]]]:
    """Decode `images` in order, one batch at a time: (kept indices, (n, C, H, W) tensor, [(index, reason)]).

    With workers > 0 a process pool decodes several batches ahead of the caller, so decoding overlaps whatever the
    caller does with each batch (encoding, writing).
    """
    if batch_size < 1:
        raise InvalidInputError(f"batch size must be positive, got {batch_size}")
    starts = range(0, len(images), batch_size)
    jobs = [([str(im.path) for im in images[s : s + batch_size]], preprocessing.to_dict()) for s in starts]
    if workers <= 0:
        results: Iterator = map(_decode_chunk, jobs)
        for start, (array, kept, skipped) in zip(starts, results):
            yield [start + i for i in kept], torch.from_numpy(array), [(start + i, r) for i, r in skipped]
        return
    with ProcessPoolExecutor(max_workers=workers) as pool:
        # map() submits every chunk at once and yields in order: decoding runs ahead while the caller encodes.
        for start, (array, kept, skipped) in zip(starts, pool.map(_decode_chunk, jobs)):
            yield [start + i for i in kept], torch.from_numpy(array), [(start + i, r) for i, r in skipped]


# ------------------------------------------------------------------------------------------------ samplers


class PairSampler:
    """Random genuine / impostor pairs for contrastive and pairwise losses: half same-class, half different.

    `forgery_of` maps a forged class to the genuine class it imitates (`U01/forged` -> `U01/genuine`). Forged
    classes never form genuine pairs; a `hard_fraction` of the impostor pairs is (genuine item, its skilled forgery),
    the hardest negatives there are, and the rest are random pairs of different classes.
    """

    def __init__(self, labels: Sequence[int], seed: int = 0, forgery_of: dict[int, int] | None = None,
                 hard_fraction: float = 0.5):
        self.labels = np.asarray(labels, dtype=np.int64)
        self.rng = np.random.default_rng(seed)
        classes, inverse = np.unique(self.labels, return_inverse=True)
        position = {int(c): i for i, c in enumerate(classes)}
        self.members = [np.flatnonzero(inverse == c) for c in range(len(classes))]
        # forged class position -> genuine class position, for the classes present in `labels`
        self.forgeries = {position[f]: position[g] for f, g in (forgery_of or {}).items()
                          if f in position and g in position}
        self.pairable = np.asarray([c for c, m in enumerate(self.members) if len(m) >= 2 and c not in self.forgeries])
        self.forged_classes = np.asarray(sorted(self.forgeries), dtype=np.int64)
        self.hard_fraction = hard_fraction if len(self.forged_classes) else 0.0
        if len(self.members) < 2 or len(self.pairable) == 0:
            raise InvalidInputError("pairs need at least two classes and one class with two items")

    def sample(self, n: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(idx_a (n,), idx_b (n,), same (n,) float32): the first n // 2 genuine, the rest impostor."""
        n_same = n // 2
        a = np.empty(n, dtype=np.int64)
        b = np.empty(n, dtype=np.int64)
        for i, c in enumerate(self.rng.choice(self.pairable, size=n_same)):
            a[i], b[i] = self.rng.choice(self.members[c], size=2, replace=False)
        n_classes = len(self.members)
        for i in range(n_same, n):
            if self.hard_fraction and self.rng.random() < self.hard_fraction:
                forged = int(self.rng.choice(self.forged_classes))
                a[i] = self.rng.choice(self.members[self.forgeries[forged]])
                b[i] = self.rng.choice(self.members[forged])
                continue
            ca, cb = self.rng.choice(n_classes, size=2, replace=False)
            a[i] = self.rng.choice(self.members[ca])
            b[i] = self.rng.choice(self.members[cb])
        same = np.zeros(n, dtype=np.float32)
        same[:n_same] = 1.0
        return a, b, same


class ClassBalancedSampler:
    """P x K batches: P distinct classes, K items each (for triplet mining)."""

    def __init__(self, labels: Sequence[int], classes_per_batch: int, per_class: int, seed: int = 0):
        self.labels = np.asarray(labels, dtype=np.int64)
        classes, inverse = np.unique(self.labels, return_inverse=True)
        self.members = [np.flatnonzero(inverse == c) for c in range(len(classes))]
        if classes_per_batch > len(self.members):
            raise InvalidInputError(f"{classes_per_batch} classes per batch but only {len(self.members)} classes")
        self.p, self.k = classes_per_batch, per_class
        self.rng = np.random.default_rng(seed)

    def sample(self) -> np.ndarray:
        """(P*K,) indices, class-major: items of the first class, then the second..."""
        out = []
        for c in self.rng.choice(len(self.members), size=self.p, replace=False):
            m = self.members[c]
            out.append(self.rng.choice(m, size=self.k, replace=len(m) < self.k))
        return np.concatenate(out)


class EpisodeSampler:
    """N-way K-shot episodes for prototypical training: disjoint support and query items per class."""

    def __init__(self, labels: Sequence[int], way: int, shot: int, queries: int, seed: int = 0):
        self.labels = np.asarray(labels, dtype=np.int64)
        classes, inverse = np.unique(self.labels, return_inverse=True)
        self.members = [np.flatnonzero(inverse == c) for c in range(len(classes))]
        self.eligible = np.asarray([c for c, m in enumerate(self.members) if len(m) >= shot + queries])
        if len(self.eligible) < way:
            raise InvalidInputError(f"only {len(self.eligible)} classes have {shot + queries} items; need {way}")
        self.way, self.shot, self.queries = way, shot, queries
        self.rng = np.random.default_rng(seed)

    def sample(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(support (way*shot,), query (way*queries,), episode labels (way*shot,) and (way*queries,) in 0..way-1).

        Returns support indices, query indices and the episode label of each query; the support's episode labels
        are np.repeat(arange(way), shot).
        """
        support, query = [], []
        for c in self.rng.choice(self.eligible, size=self.way, replace=False):
            picked = self.rng.choice(self.members[c], size=self.shot + self.queries, replace=False)
            support.append(picked[: self.shot])
            query.append(picked[self.shot :])
        return np.concatenate(support), np.concatenate(query), np.repeat(np.arange(self.way), self.queries)
