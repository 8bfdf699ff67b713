"""Getting items in: the folder-build pipeline, the checks a batch of vectors passes, and what an item is stored as.

`add_images` overlaps reading + hashing + decoding (worker processes) with encoding and committing (this process);
`checked_vector_batch` refuses a bad `add_vectors` call before anything is written; `stored_path` and
`content_sha256` say how an image's source and identity are recorded.
"""

from __future__ import annotations

import functools
import hashlib
import os
import re
import stat
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from siamesedb.checks import as_labels, label_problem, shown_label
from siamesedb.data import LabelledImage, file_sha256, iter_hashed_batches
from siamesedb.errors import DimensionMismatchError, InvalidInputError
from siamesedb.images import EncodedFile, read_file_like, stat_failure_reason

ImageLike = Any  # a path (str / Path), a PIL image, a numpy array, encoded bytes or a binary file object
VECTOR_CHUNK = 16384  # rows per transaction when adding vectors (bounds the per-chunk temporaries)
NOT_UTF8 = "file or folder name is not valid UTF-8 (rename it)"
_label_problem = functools.lru_cache(maxsize=4096)(label_problem)  # a folder's images share one label
_LINE_BREAKERS = re.compile(r"[\x00-\x1f\x7f-\x9f\u2028\u2029]")


@dataclass
class BuildReport:
    """What one build or add_folder run did."""

    scanned: int = 0
    added: int = 0
    already_indexed: int = 0
    skipped: list[tuple[str, str]] = field(default_factory=list)  # (path, reason)
    seconds: float = 0.0

    @property
    def images_per_second(self) -> float:
        return self.added / self.seconds if self.seconds > 0 else 0.0

    def to_dict(self) -> dict[str, Any]:
        return {
            "scanned": self.scanned,
            "added": self.added,
            "already_indexed": self.already_indexed,
            "skipped": len(self.skipped),
            "skipped_files": [{"path": p, "reason": r} for p, r in self.skipped],
            "seconds": round(self.seconds, 3),
            "images_per_second": round(self.images_per_second, 1),
        }


# ---------------------------------------------------------------------------------------- folders of images


def printable(path: str | os.PathLike) -> str:
    """A path as text that always prints on one line: undecodable bytes shown as \\xNN, control characters and
    line separators escaped (\\n, \\t, \\x00, \\u2028)."""
    text = os.fsencode(path).decode("utf-8", "backslashreplace")
    return _LINE_BREAKERS.sub(lambda found: repr(found.group(0))[1:-1], text)


def unindexable_reason(image: LabelledImage) -> str | None:
    """Why a scanned file cannot be indexed before reading a byte of it, or None: names the store cannot hold
    (not UTF-8) and entries that are no regular file (a FIFO would block the content hash forever)."""
    try:
        str(image.path).encode("utf-8")
        image.label.encode("utf-8")
    except UnicodeEncodeError:
        return NOT_UTF8
    problem = _label_problem(image.label)  # the label rule (checks.py): a folder build refuses what add refuses
    if problem is not None:
        return f"label {shown_label(image.label)} {problem} (rename the file or folder)"
    try:
        mode = os.stat(image.path).st_mode
    except OSError as exc:
        return stat_failure_reason(image.path, exc)  # the words a query or `add` of the same file uses
    return None if stat.S_ISREG(mode) else "not a regular file"


def split_unindexable(images: list[LabelledImage]) -> tuple[list[LabelledImage], list[tuple[str, str]]]:
    """(indexable images, (printable path, reason) of the rest); see unindexable_reason."""
    kept, skipped = [], []
    for image in images:
        reason = unindexable_reason(image)
        if reason is None:
            kept.append(image)
        else:
            skipped.append((printable(image.path), reason))
    return kept, skipped


def absolute(images: list[LabelledImage]) -> list[LabelledImage]:
    """`images` with absolute paths; the parents of a folder scan are resolved once each (symlinks resolved too)."""
    resolved: dict[Path, Path] = {}
    out = []
    for image in images:
        parent = Path(image.path).parent
        if parent not in resolved:
            resolved[parent] = parent.resolve()
        out.append(LabelledImage(path=resolved[parent] / Path(image.path).name, label=image.label))
    return out


Commit = Callable[[list[str], list[str], list[str], np.ndarray], np.ndarray]


def add_images(
    images: list[LabelledImage],
    backend: Any,
    encoder: Any,
    commit: Commit,
    batch_size: int = 256,
    workers: int | None = None,
    progress: bool = False,
) -> BuildReport:
    """Read, hash, decode, encode and `commit(labels, paths, hashes, vectors)` `images`; files the backend already
    holds (label + sha256) are skipped.

    The stages overlap: worker processes read each file once, hash those bytes and decode them (a file whose
    (label, path) the backend holds with the same hash is not decoded at all), while this process encodes the
    previous batch and commits it in one transaction per batch. The caller saves its files afterwards (also when
    this raises): every committed batch is durable already.
    """
    from tqdm import tqdm

    started = time.perf_counter()
    report = BuildReport(scanned=len(images))
    # Paths are stored absolute: the index then answers the same from any working folder (a server started
    # elsewhere can still show each item's image). One resolve of the root, not one per file.
    images = absolute(images)
    held = backend.known_label_hashes()
    by_path = backend.label_path_hashes()
    expected = [by_path.get((image.label, str(image.path))) for image in images]
    del by_path
    if workers is None:
        # One decoding process per 4 cores, at least one, at most 4: decoding costs well under half of encoding
        # per image (tools/bench_build.py, BENCHMARKS.md "Build throughput"); on one core a pool only adds cost.
        cpus = os.cpu_count() or 1
        workers = min(4, max(1, cpus // 4)) if len(images) >= 2000 and cpus >= 2 else 0
    bar = tqdm(total=len(images), unit="img", disable=not progress, desc="build")
    # One batch in flight: while the encoder works on batch i, this thread commits batch i - 1.
    in_flight: tuple[list[str], list[str], list[str], Any] | None = None

    def commit_batch(pending: tuple[list[str], list[str], list[str], Any]) -> None:
        labels, paths, hashes, result = pending
        commit(labels, paths, hashes, result())
        report.added += len(labels)

    try:
        for batch in iter_hashed_batches(
            images, encoder.config.preprocessing, batch_size=batch_size, workers=workers, expected=expected
        ):
            report.skipped.extend((str(images[i].path), reason) for i, reason in batch.skipped)
            report.already_indexed += len(batch.held)
            rows: list[int] = []  # rows of batch.tensor to store
            for row, (i, digest) in enumerate(zip(batch.kept, batch.hashes)):
                key = (images[i].label, digest)
                if key in held:  # held under another path, or the same file twice under one label: stored once
                    report.already_indexed += 1
                    continue
                held.add(key)
                rows.append(row)
            if rows:
                tensor = batch.tensor if len(rows) == len(batch.kept) else batch.tensor[rows]
                positions = [batch.kept[r] for r in rows]
                started_batch = (
                    [images[i].label for i in positions],
                    [str(images[i].path) for i in positions],
                    [batch.hashes[r] for r in rows],
                    encoder.encode_tensors_async(tensor, batch_size=max(batch_size, 1)),
                )
                if in_flight is not None:
                    commit_batch(in_flight)
                in_flight = started_batch
            bar.update(len(batch.kept) + len(batch.held) + len(batch.skipped))
        if in_flight is not None:
            commit_batch(in_flight)
            in_flight = None
    finally:
        if in_flight is not None:  # interrupted: let the lanes finish, drop the batch (it was never committed)
            try:
                in_flight[3]()
            except Exception:  # the error that interrupted us is the one to report
                pass
        bar.close()
    report.seconds = time.perf_counter() - started
    return report


# ---------------------------------------------------------------------------------------- batches of vectors


def checked_vector_batch(
    vectors: np.ndarray,
    labels: Sequence[str],
    paths: Sequence[str] | None,
    hashes: Sequence[str] | None,
    ids: Sequence[int] | np.ndarray | None,
    dimension: int,
    cosine: bool,
) -> tuple[np.ndarray, np.ndarray | None]:
    """(vectors, ids as int64 or None) of an `add_vectors` call, every row checked before any is written: shape,
    dtype, lengths, labels, NaN / infinity, all-zero rows (cosine), ids positive and distinct. Chunked: no (n, D)
    temporaries. Whether given ids are free is the caller's check (it needs the backend)."""
    vectors = np.asarray(vectors)
    if vectors.ndim != 2 or vectors.shape[1] != dimension:
        raise DimensionMismatchError(f"vectors have shape {vectors.shape}, index needs (n, {dimension})")
    if not (np.issubdtype(vectors.dtype, np.floating) or np.issubdtype(vectors.dtype, np.integer)):
        raise InvalidInputError(f"vectors must be real numbers, got dtype {vectors.dtype}")
    n = len(vectors)
    for name, column in (("labels", labels), ("paths", paths), ("hashes", hashes), ("ids", ids)):
        if column is not None and len(column) != n:
            raise InvalidInputError(f"{n} vectors but {len(column)} {name}")
    as_labels(labels)
    for start in range(0, n, VECTOR_CHUNK):
        chunk = vectors[start : start + VECTOR_CHUNK]
        bad = ~np.isfinite(chunk).all(axis=1)
        if bad.any():
            raise InvalidInputError(f"vector {start + int(np.argmax(bad))} contains NaN or infinity")
        zero = ~chunk.any(axis=1) if cosine else np.zeros(len(chunk), dtype=bool)
        if zero.any():
            raise InvalidInputError(f"vector {start + int(np.argmax(zero))} is all zeros (it has no direction)")
    if ids is not None:
        ids = np.asarray(ids)
        if n and not np.issubdtype(ids.dtype, np.integer):
            raise InvalidInputError(f"ids must be integers, got dtype {ids.dtype}")
        ids = ids.astype(np.int64)
        if n and (ids.min() < 1 or len(np.unique(ids)) != n):
            raise InvalidInputError("ids must be positive and distinct")
    return vectors, ids


def vector_chunks(vectors: np.ndarray, labels: Sequence[str], paths: Sequence[str] | None,
                  hashes: Sequence[str] | None, cosine: bool):
    """(rows slice, labels, paths, hashes, (rows, D) float32 vectors) of a checked `add_vectors` call, VECTOR_CHUNK
    rows at a time: unit rows for a cosine index, "" paths and vector hashes where none were given."""
    for start in range(0, len(vectors), VECTOR_CHUNK):
        rows = slice(start, min(len(vectors), start + VECTOR_CHUNK))
        chunk = unit_rows(vectors[rows]) if cosine else np.ascontiguousarray(vectors[rows], dtype=np.float32)
        chunk_paths = [str(x) for x in paths[rows]] if paths is not None else [""] * len(chunk)
        chunk_hashes = [str(x) for x in hashes[rows]] if hashes is not None else [array_sha256(v) for v in chunk]
        yield rows, [str(x) for x in labels[rows]], chunk_paths, chunk_hashes, chunk


def unit_rows(chunk: np.ndarray) -> np.ndarray:
    """float32 rows scaled to unit length; rows already of unit length (float32 rounding) are kept bit for bit, so
    an exported index imports unchanged."""
    chunk = np.asarray(chunk, dtype=np.float32)
    norms = np.linalg.norm(chunk, axis=1, keepdims=True)
    return np.ascontiguousarray(chunk / np.where(np.abs(norms - 1) < 1e-5, np.float32(1), norms))


# ---------------------------------------------------------------------------------------- single images


def ids_for_new_rows(held: dict[tuple[str, str], int], labels: list[str],
                     hashes: list[str]) -> tuple[np.ndarray, list[int]]:
    """(ids (n,) int64, rows to store) of an `add`: a row whose (label, hash) is `held` gets that id; the first of
    rows repeating one (label, hash) is stored, and a later repeat gets -1 - (that first row) until
    `resolve_repeats` gives it the stored id."""
    ids = np.empty(len(labels), dtype=np.int64)
    new_rows: list[int] = []
    first_of: dict[tuple[str, str], int] = {}
    for row, key in enumerate(zip(labels, hashes)):
        if key in held:
            ids[row] = held[key]
        elif key in first_of:  # the same image twice in this call
            ids[row] = -1 - first_of[key]
        else:
            first_of[key] = row
            new_rows.append(row)
    return ids, new_rows


def resolve_repeats(ids: np.ndarray) -> np.ndarray:
    """Repeats marked by `ids_for_new_rows` take the id their first row was stored under."""
    repeats = ids < 0
    ids[repeats] = ids[-1 - ids[repeats]]
    return ids


def is_single(images: Any) -> bool:
    """One image in -> one result out; a list or tuple in -> a list out (a 2-D+ array is one image)."""
    return not isinstance(images, (list, tuple))


def stored_path(source: ImageLike) -> str:
    """What the store records as an image's source: its absolute path (resolved now, so the index answers the same
    from any working folder and `serve` can show it), or "" for in-memory images."""
    if isinstance(source, (str, os.PathLike)):
        return str(Path(source).resolve())
    return ""


def content_sha256(source: ImageLike) -> str:
    """sha256 of a file's bytes, of in-memory encoded bytes, or of an array / PIL image's pixels."""
    if isinstance(source, (str, os.PathLike)):
        return file_sha256(source)
    if isinstance(source, (bytes, bytearray, memoryview)):
        return hashlib.sha256(bytes(source)).hexdigest()
    if isinstance(source, EncodedFile):
        return hashlib.sha256(source.data).hexdigest()
    return array_sha256(source)


def read_file_objects(images: list[ImageLike]) -> list[ImageLike]:
    """File-like objects read once into memory (they can be decoded and hashed from those bytes; a stream can't be
    read twice); everything else as it is."""
    return [
        EncodedFile(read_file_like(src), str(getattr(src, "name", "<file object>")))
        if callable(getattr(src, "read", None)) and not isinstance(src, (str, os.PathLike)) else src
        for src in images
    ]


def array_sha256(obj: Any) -> str:
    """Content hash of an in-memory image or vector (files are hashed by data.file_sha256)."""
    array = np.asarray(obj)
    return hashlib.sha256(array.tobytes() + str(array.shape).encode()).hexdigest()
