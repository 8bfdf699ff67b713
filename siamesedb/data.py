"""Labelled folders in, batches of input tensors out: scan a folder and label its images (groups, skilled
forgeries), then decode them in order, batch by batch, in worker processes when asked (hashed for builds).

One image's loading and preprocessing live in `siamesedb.images`, the training samplers in `siamesedb.samplers`,
the domain profile in `siamesedb.domain`; their names stay importable from here.
"""

from __future__ import annotations

import hashlib
import os
import re
import stat
from collections import deque
from collections.abc import Iterator, Sequence
from concurrent.futures import Future, ProcessPoolExecutor
from dataclasses import dataclass
from itertools import islice
from pathlib import Path
from typing import Any

import numpy as np
import torch

from siamesedb.domain import DomainWarning, image_profile, profile_mismatch  # noqa: F401
from siamesedb.errors import FolderError, ImageLoadError, InvalidInputError
from siamesedb.images import (  # noqa: F401
    DRAFT_MARGIN,
    MAX_PIXELS,
    EncodedFile,
    Preprocessing,
    load_image,
    read_file_like,
    stat_failure_reason,
)
from siamesedb.samplers import ClassBalancedSampler, EpisodeSampler, PairSampler  # noqa: F401

IMAGE_EXTENSIONS = frozenset({".png", ".jpg", ".jpeg", ".pgm", ".ppm", ".pbm", ".bmp", ".webp", ".tif", ".tiff"})
FORGED = "forged"  # a class `X/forged` holds skilled forgeries of class `X/genuine`
GENUINE = "genuine"


@dataclass(frozen=True)
class LabelledImage:
    """An image file and its label (see `label_for`)."""

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
    except OSError as exc:
        raise ImageLoadError(path, stat_failure_reason(path, exc)) from None
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


def hash_and_decode(
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
    for start, (array, kept, hashes, held, skipped) in _run_ahead(hash_and_decode, tasks, workers):
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


# The old private names, still imported by ingest and ray_build.
_read_file_like = read_file_like
_hash_and_decode = hash_and_decode
