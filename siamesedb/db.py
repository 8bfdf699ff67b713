"""SiameseDB, the front door: build, open, add, remove, search, classify, verify and calibrate an index.

An index is a folder (DESIGN.md, "On disk"):

    items.sqlite   the truth: id, label, path, sha256, vector of every item
    vectors.faiss  derived FAISS index over the same ids; rebuilt from the store when missing, stale or unreadable
    encoder/       the encoder that made the vectors (config.json + model.safetensors)
    manifest.json  format version, dimension, metric, factory, encoder fingerprint, calibration

Write order for every change: store transaction first (the durable truth), then the FAISS file, then the manifest,
which records the store version the FAISS file mirrors. A crash between steps leaves a manifest that names an older
store version, and the next open rebuilds the FAISS file from the store instead of trusting it.
"""

from __future__ import annotations

import bisect
import errno
import functools
import json
import os
import sqlite3
import stat
import time
import warnings
import weakref
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from siamesedb import __version__, query
from siamesedb.data import (
    DomainWarning,
    EncodedFile,
    LabelledImage,
    _read_file_like,
    file_sha256,
    image_profile,
    iter_hashed_batches,
    profile_mismatch,
    scan_folder,
)
from siamesedb.encoder import DEFAULT_ENCODER, Encoder
from siamesedb.errors import (
    CorruptIndexError,
    DimensionMismatchError,
    EmptyIndexError,
    EncoderMismatchError,
    IndexExistsError,
    IndexNotFoundError,
    InvalidInputError,
    NotCalibratedError,
    SiameseDBError,
    StorageError,
    UnknownLabelError,
)
from siamesedb.index import (
    AUTO,
    METRIC_OF_ENCODER,
    VectorIndex,
    _fsync_dir,
    _write_atomic,
    auto_search_defaults,
    choose_factory,
)
from siamesedb.item_table import ItemTable
from siamesedb.locking import IndexWriteLock
from siamesedb.store import ItemStore

FORMAT_VERSION = 1
MANIFEST_FILE = "manifest.json"
STORE_FILE = "items.sqlite"
VECTORS_FILE = "vectors.faiss"
ENCODER_DIR = "encoder"
DEFAULT_HOME = Path("indexes")
CLASSIFY_METHODS = ("prototype", "knn")
_VECTOR_CHUNK = 16384  # rows per transaction when adding vectors (bounds the per-chunk temporaries)
_TRAIN_SAMPLE = 131072  # rows an untrained index (IVF...) is trained on, from the start of add_vectors
# Fewer pairs than these and a calibration says how thin it is: with 2 genuine pairs an "equal-error" threshold is
# whatever the two scores happen to be (issue 16 saw 1.0000 from two copies of one file).
MIN_GENUINE_PAIRS = 20
MIN_IMPOSTOR_PAIRS = 100

ImageLike = Any  # a path (str / Path), a PIL image or a numpy array


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


@dataclass
class _ClassTable:
    """Classes of an index at one store version: sorted names, (C, D) prototypes, and each item's class code."""

    version: int
    names: list[str]
    prototypes: np.ndarray  # (C, D) float32 class means (L2-normalised for a cosine index), row c = names[c]
    ids: np.ndarray  # (N,) int64, ascending
    codes: np.ndarray  # (N,) int32, codes[i] = class of item ids[i]
    prototype_index: VectorIndex | None = None  # built on first use by a top-k prototype search


def _locked_write(method):
    """Run a public write of SiameseDB under the index's write lock (see SiameseDB._writing)."""

    @functools.wraps(method)
    def locked(self, *args, **kwargs):
        with self._writing():
            return method(self, *args, **kwargs)

    return locked


NOT_UTF8 = "file or folder name is not valid UTF-8 (rename it)"


def _printable(path: str | os.PathLike) -> str:
    """A path as text that always prints: undecodable bytes shown as \\xNN."""
    return os.fsencode(path).decode("utf-8", "backslashreplace")


def _unindexable_reason(image: LabelledImage) -> str | None:
    """Why a scanned file cannot be indexed before reading a byte of it, or None: names the store cannot hold
    (not UTF-8) and entries that are no regular file (a FIFO would block the content hash forever)."""
    try:
        str(image.path).encode("utf-8")
        image.label.encode("utf-8")
    except UnicodeEncodeError:
        return NOT_UTF8
    try:
        mode = os.stat(image.path).st_mode
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            return "symbolic link loop"
        if exc.errno == errno.ENOENT and os.path.islink(image.path):
            return "broken symbolic link"
        return exc.strerror or str(exc)
    return None if stat.S_ISREG(mode) else "not a regular file"


def _split_unindexable(images: list[LabelledImage]) -> tuple[list[LabelledImage], list[tuple[str, str]]]:
    """(indexable images, (printable path, reason) of the rest); see _unindexable_reason."""
    kept, skipped = [], []
    for image in images:
        reason = _unindexable_reason(image)
        if reason is None:
            kept.append(image)
        else:
            skipped.append((_printable(image.path), reason))
    return kept, skipped


def _remove_temporaries(path: Path) -> None:
    """Under the write lock: delete the temporary files a writer killed mid-write left (manifest, FAISS, encoder)."""
    for folder in (path, path / ENCODER_DIR):
        for leftover in folder.glob("*.tmp"):
            try:
                leftover.unlink()
            except OSError:
                pass


def _is_single(images: Any) -> bool:
    """One image in -> one result out; a list or tuple in -> a list out (a 2-D+ array is one image)."""
    return not isinstance(images, (list, tuple))


def _write_json_atomic(path: Path, document: dict[str, Any]) -> None:
    """Write, fsync, rename, fsync the folder: a crash leaves the old document or the new one, never half of one."""
    _write_atomic(path, (json.dumps(document, indent=2, sort_keys=True) + "\n").encode("utf-8"))
    _fsync_dir(path.parent)


def _read_manifest(path: Path) -> dict[str, Any]:
    """The manifest of the index at `path`, checked for the fields open() relies on (CorruptIndexError otherwise)."""
    manifest_path = path / MANIFEST_FILE
    try:
        manifest = json.loads(manifest_path.read_text(encoding="utf-8"))
        if not isinstance(manifest, dict):
            raise ValueError(f"a JSON {type(manifest).__name__}, not an object")
        int(manifest["dimension"])
        int(manifest["format_version"])
        if not isinstance(manifest.get("encoder", {}), dict) or not isinstance(manifest.get("factory", "Flat"), str):
            raise ValueError("'encoder' must be an object and 'factory' a string")
        if not isinstance(manifest.get("calibration") or {}, dict):
            raise ValueError("'calibration' must be an object")
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise CorruptIndexError(f"{manifest_path}: unreadable manifest ({exc})") from None
    return manifest


def _store_has_items(store_path: Path) -> bool:
    """Whether a store file holds any item (False for one whose creation was cut short before its tables)."""
    try:
        conn = sqlite3.connect(store_path, timeout=30.0)
        try:
            return conn.execute("SELECT EXISTS (SELECT 1 FROM items)").fetchone()[0] == 1
        finally:
            conn.close()
    except sqlite3.OperationalError as exc:
        if "no such table" in str(exc):
            return False
        raise CorruptIndexError(f"{store_path}: not a readable SQLite store ({exc})") from None
    except sqlite3.DatabaseError as exc:
        raise CorruptIndexError(f"{store_path}: not a readable SQLite store ({exc})") from None


class SiameseDB:
    """An index of labelled image embeddings on disk. Create it with `build`/`create`, reopen it with `open`."""

    def __init__(self, path: Path, store: ItemStore, index: VectorIndex, encoder: Encoder, manifest: dict[str, Any]):
        self.path = path
        self.store = store
        self.index = index
        self.encoder = encoder
        self.manifest = manifest
        self.last_report: BuildReport | None = None
        # One writer at a time (locking.py); build/open/create replace it with one carrying their lock_timeout.
        self._lock = IndexWriteLock(path)
        # The store version the in-memory FAISS index mirrors: a write that finds the store moved on (another
        # process wrote since) rebuilds it first, so this handle never writes a FAISS file missing their items.
        self._index_version: int | None = None
        # Class prototypes are derived from the store; cached per store version so repeated classify calls are cheap.
        self._prototype_cache: _ClassTable | None = None
        # Every item's label and path in memory for search hits (item_table.py), per store version; built once the
        # ids looked up from SQLite at one version reach half the items (see _labels_and_paths).
        self._item_table: ItemTable | None = None
        self._item_lookups = (-1, 0)  # (store version, ids looked up from the store at that version)
        # Search results whose labels and paths are not read yet: read before this handle writes or closes, so
        # they describe the index as it was when searched and stay usable after close().
        self._unread_results: list[weakref.ref[query.SearchResults]] = []
        self._domain_checked = False  # check_domain warns once per handle

    def __repr__(self) -> str:
        state = "closed" if self.store.closed else f"{len(self)} items, {len(self.store.label_counts())} classes"
        return f"SiameseDB({str(self.path)!r}, {state}, encoder {self.encoder.fingerprint})"

    # ------------------------------------------------------------------ creation and opening

    @classmethod
    def create(
        cls,
        path: str | os.PathLike,
        encoder: str | os.PathLike | Encoder = DEFAULT_ENCODER,
        factory: str = "Flat",
        device: str = "auto",
        expected_items: int | None = None,
        memory_budget: int | None = None,
        search_backend: str = "auto",
        lock_timeout: float | None = None,
        _lock: IndexWriteLock | None = None,
    ) -> SiameseDB:
        """Make a new, empty index folder at `path` carrying a copy of `encoder`.

        factory="auto" picks the FAISS index type for `expected_items` vectors within `memory_budget` bytes
        (siamesedb.index.choose_factory; README "Index types"); the manifest records the type chosen.
        The manifest is written last: a folder without one is an index whose creation was cut short, and creating
        it again starts over (as long as its store holds no items).
        """
        path = Path(path)
        if (path / MANIFEST_FILE).exists():
            raise IndexExistsError(f"{path}: an index already exists here (remove it first, or use `add`)")
        if path.exists() and not path.is_dir():
            raise IndexExistsError(f"{path}: exists and is not a folder")
        enc = encoder if isinstance(encoder, Encoder) else Encoder.load(encoder, device=device)
        requested = factory
        if factory == AUTO:
            factory = choose_factory(expected_items or 0, enc.dimension, memory_budget)
        # Validates the factory before anything is written. The index's metric is its encoder's.
        index = VectorIndex(enc.dimension, factory=factory, device=device, backend=search_backend,
                            metric=METRIC_OF_ENCODER[enc.config.metric])
        if requested == AUTO:
            index.set_search_defaults(**auto_search_defaults(factory, expected_items or 0))
        path.mkdir(parents=True, exist_ok=True)
        lock = _lock or IndexWriteLock(path, timeout=lock_timeout)
        with lock:
            return cls._create_locked(path, enc, encoder, index, factory, requested, device, search_backend, lock)

    @classmethod
    def _create_locked(
        cls, path: Path, enc: Encoder, encoder: Any, index: VectorIndex, factory: str, requested: str, device: str,
        search_backend: str, lock: IndexWriteLock
    ) -> SiameseDB:
        if (path / MANIFEST_FILE).exists():  # another process finished creating it while we waited for the lock
            raise IndexExistsError(f"{path}: an index already exists here (remove it first, or use `add`)")
        store_path = path / STORE_FILE
        if store_path.exists():
            if _store_has_items(store_path):
                raise IndexExistsError(
                    f"{path}: {STORE_FILE} holds items but there is no {MANIFEST_FILE}; move the folder aside"
                )
            for suffix in ("", "-wal", "-shm"):  # an empty store from a creation cut short: start over
                Path(f"{store_path}{suffix}").unlink(missing_ok=True)
        _remove_temporaries(path)
        enc.save(path / ENCODER_DIR)
        store = ItemStore(path / STORE_FILE, dim=enc.dimension)
        manifest = {
            "format_version": FORMAT_VERSION,
            "siamesedb_version": __version__,
            "dimension": enc.dimension,
            "metric": index.metric,  # "inner_product" (cosine encoders) or "l2" (Euclidean ones)
            "factory": factory,
            "factory_requested": requested,
            "encoder": {
                "fingerprint": enc.fingerprint,
                "backbone": enc.config.backbone,
                "name": enc.config.name or str(encoder if not isinstance(encoder, Encoder) else ""),
            },
            "vectors_store_version": store.version,
            "calibration": None,
            "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        }
        db = cls(path, store, index, enc, manifest)
        db._search_device = (device, search_backend)
        db._lock = lock
        db._index_version = store.version
        db._save_index_and_manifest()
        return db

    @classmethod
    def build(
        cls,
        folder: str | os.PathLike,
        path: str | os.PathLike | None = None,
        encoder: str | os.PathLike | Encoder = DEFAULT_ENCODER,
        factory: str = "Flat",
        device: str = "auto",
        batch_size: int = 256,
        workers: int | None = None,
        progress: bool = False,
        lock_timeout: float | None = None,
    ) -> SiameseDB:
        """Index every image of a labelled folder (label = parent folder relative to the root).

        Re-running a build into an existing index adds only the files it does not hold yet (same label and content
        hash), so an interrupted build resumes where it stopped. Unreadable files are skipped and reported in
        `db.last_report`, never fatal. The whole build holds the index's write lock (a second writer waits up to
        `lock_timeout` seconds, default $SIAMESEDB_LOCK_TIMEOUT or 60).
        """
        folder = Path(folder)
        images = scan_folder(folder)  # FolderError for a missing / empty folder, before anything is created
        images, unstorable = _split_unindexable(images)
        path = Path(path) if path is not None else DEFAULT_HOME / folder.resolve().name
        if not (path / MANIFEST_FILE).exists():
            # Check the encoder and factory before the folder (and its lock file) is made.
            checked = encoder if isinstance(encoder, Encoder) else Encoder.load(encoder, device=device)
            if factory != AUTO:
                VectorIndex(checked.dimension, factory=factory)
            if path.exists() and not path.is_dir():
                raise IndexExistsError(f"{path}: exists and is not a folder")
            path.mkdir(parents=True, exist_ok=True)
        lock = IndexWriteLock(path, timeout=lock_timeout)
        with lock:  # taken before deciding create-or-resume, so two builds of one new index cannot both create it
            if (path / MANIFEST_FILE).exists():
                db = cls.open(path, device=device, lock_timeout=lock_timeout, _lock=lock)
                if not isinstance(encoder, Encoder) and encoder != DEFAULT_ENCODER:
                    other = Encoder.load(encoder, device=device)
                    if other.fingerprint != db.encoder.fingerprint:
                        raise EncoderMismatchError(
                            f"{path}: index was built with encoder {db.encoder.fingerprint}, not {other.fingerprint}"
                        )
            else:
                db = cls.create(path, encoder=encoder, factory=factory, device=device, expected_items=len(images),
                                _lock=lock)
            _remove_temporaries(path)
            db.check_domain([image.path for image in images])
            report = db._add_images(images, batch_size=batch_size, workers=workers, progress=progress)
        report.scanned += len(unstorable)
        report.skipped[:0] = unstorable
        return db

    @classmethod
    def open(
        cls,
        path: str | os.PathLike,
        device: str = "auto",
        search_backend: str = "auto",
        lock_timeout: float | None = None,
        _lock: IndexWriteLock | None = None,
    ) -> SiameseDB:
        """Open an existing index; its FAISS file is rebuilt from the store when missing, stale or unreadable.

        Search runs where `device` resolves (README "GPU search"); search_backend="torch" forces the exact torch
        search, also on the CPU. Opening takes no lock: many readers may open an index at once, also while a writer works on it. Writes
        through the handle (add, remove, calibrate) take the write lock, waiting up to `lock_timeout` seconds.
        """
        path = Path(path)
        manifest_path = path / MANIFEST_FILE
        if not path.is_dir() or not manifest_path.exists():
            raise IndexNotFoundError(f"{path}: no index here (build one with `siamesedb build FOLDER --index {path}`)")
        manifest = _read_manifest(path)
        dim = int(manifest["dimension"])
        version = int(manifest["format_version"])
        if version > FORMAT_VERSION:
            raise CorruptIndexError(
                f"{path}: written by a newer siamesedb (format {version}; this one reads up to {FORMAT_VERSION})"
            )
        encoder = Encoder.load(path / ENCODER_DIR, device=device)
        expected = manifest.get("encoder", {}).get("fingerprint")
        if expected and encoder.fingerprint != expected:
            raise EncoderMismatchError(
                f"{path / ENCODER_DIR}: encoder fingerprint {encoder.fingerprint} differs from the manifest's {expected}"
            )
        if encoder.dimension != dim:
            raise DimensionMismatchError(f"{path}: encoder makes {encoder.dimension}-d vectors, manifest says {dim}")
        metric = manifest.get("metric", "inner_product")
        if METRIC_OF_ENCODER[encoder.config.metric] != metric:
            raise EncoderMismatchError(
                f"{path / ENCODER_DIR}: a {encoder.config.metric} encoder, but the manifest's metric is {metric}"
            )
        if not (path / STORE_FILE).exists():
            raise CorruptIndexError(f"{path / STORE_FILE}: missing (the store is the index's truth)")
        store = ItemStore(path / STORE_FILE)  # reads its own dimension; compared with the manifest's below
        if store.dim is not None and store.dim != dim:
            store.close()
            raise DimensionMismatchError(f"{path / STORE_FILE}: store holds {store.dim}-d vectors, manifest says {dim}")
        factory = manifest.get("factory", "Flat")
        db = cls(path, store, VectorIndex(dim, factory=factory, device=device, backend=search_backend, metric=metric),
                 encoder, manifest)
        db._search_device = (device, search_backend)
        db._lock = _lock or IndexWriteLock(path, timeout=lock_timeout)
        db.index = db._load_or_rebuild_vectors()
        return db

    def _load_or_rebuild_vectors(self) -> VectorIndex:
        vectors_path = self.path / VECTORS_FILE
        with self.store.snapshot():  # version and count of one committed state, even while a writer commits
            version, count = self.store.version, self.store.count()
        fresh = self.manifest.get("vectors_store_version") == version
        if fresh and vectors_path.exists():
            try:
                factory = self.manifest.get("factory", "Flat")
                index = VectorIndex.load(vectors_path, factory=factory, **self._device_args())
                if index.dim == self.store.dim and index.ntotal == count and index.metric == self.index_metric:
                    self._index_version = version
                    return index
            except CorruptIndexError:
                pass  # derived data: fall through and rebuild it from the store
        self.index = self._index_from_store()
        # Save the rebuilt file only when no writer is at work (never wait: a reader must not block). A writer
        # holding the lock saves a fresh file when it finishes; until then every opener rebuilds in memory.
        if self._lock.try_acquire():
            try:
                self._catch_up()
                self._save_index_and_manifest()
            except StorageError:
                pass  # a reader answers from the rebuilt index in memory; saving it was only a courtesy
            finally:
                self._lock.release()
        return self.index

    def _device_args(self) -> dict[str, str]:
        device, backend = getattr(self, "_search_device", ("cpu", "auto"))
        return {"device": device, "backend": backend}

    def _index_from_store(self, factory: str | None = None) -> VectorIndex:
        """A fresh FAISS index over one committed state of the store, keeping the current search defaults (nprobe,
        efSearch); records which store version it mirrors.

        A factory that needs training and cannot train on what the store holds yet (fewer vectors than IVF lists
        or PQ centroids) stays untrained and empty: searches then run exactly over the store until it can.
        """
        with self.store.snapshot():
            version = self.store.version
            ids, vectors = self.store.vectors()
        factory = factory or self.manifest.get("factory", "Flat")
        index = VectorIndex(self.dimension, factory=factory, metric=self.index_metric, **self._device_args())
        if len(ids):
            if not index.is_trained:
                try:
                    index.train(vectors)
                except InvalidInputError:
                    return index
            index.add(vectors, ids)
        if factory == self.manifest.get("factory") and self.manifest.get("search_defaults"):
            index.set_search_defaults(**self.manifest["search_defaults"])
        self._index_version = version
        return index

    @contextmanager
    def _writing(self) -> Iterator[None]:
        """Hold the write lock for one public write; on first taking it, catch up with other processes' writes."""
        self._read_pending_results()
        self._lock.acquire()
        outermost = self._lock.depth == 1  # read under the lock: another thread's write has finished by now
        started_at = None
        try:
            if outermost:
                self._catch_up()
                started_at = self._index_version
            yield
        except BaseException:
            if outermost and not self._store_still_at(started_at):
                self._index_version = None  # a write failed part-way: rebuild from the store before the next one
            raise
        else:
            if outermost:
                self._index_version = self.store.version  # under the lock only our writes moved it, in step
        finally:
            self._lock.release()

    def _store_still_at(self, version: int | None) -> bool:
        """Whether the store is still at `version` (a refused write changed nothing: no rebuild needed)."""
        try:
            return version is not None and self.store.version == version
        except SiameseDBError:
            return False

    def _catch_up(self) -> None:
        """Under the write lock: drop leftovers of crashed writers, re-read the manifest, rebuild a stale index."""
        _remove_temporaries(self.path)
        self.manifest = _read_manifest(self.path)
        if self._index_version is None or self._index_version != self.store.version:
            self.index = self._index_from_store()
            self._prototype_cache = None

    def _save_index_and_manifest(self) -> None:
        try:
            self.index.save(self.path / VECTORS_FILE)
            self.manifest["search_defaults"] = self.index.search_defaults  # survive a rebuild from the store
            self.manifest["vectors_store_version"] = self.store.version
            _write_json_atomic(self.path / MANIFEST_FILE, self.manifest)
        except OSError as exc:  # disk full, read-only folder, a folder where the file should be...
            raise StorageError(
                f"{self.path}: cannot save the index files ({exc.strerror or exc}); the item store is intact and "
                "the FAISS file is rebuilt from it on the next open"
            ) from None

    def _read_pending_results(self) -> None:
        for ref in self._unread_results:
            results = ref()
            if results is not None:
                results.fetch()
        self._unread_results.clear()

    def close(self) -> None:
        if not self.store.closed:
            self._read_pending_results()
        self.store.close()

    def __enter__(self) -> SiameseDB:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ------------------------------------------------------------------ properties

    @property
    def dimension(self) -> int:
        return int(self.manifest["dimension"])

    @property
    def index_metric(self) -> str:
        """The FAISS metric: "inner_product" (cosine encoders) or "l2" (Euclidean ones), as the manifest names it."""
        return self.manifest.get("metric", "inner_product")

    @property
    def metric(self) -> str:
        """How scores are made: "cosine" (inner product of unit vectors) or "euclidean" (score = -distance)."""
        return "euclidean" if self.index_metric == "l2" else "cosine"

    def __len__(self) -> int:
        return self.store.count()

    def labels(self) -> list[str]:
        return sorted(self.store.label_counts())

    # ------------------------------------------------------------------ writing

    def _add_images(
        self,
        images: list[LabelledImage],
        batch_size: int = 256,
        workers: int | None = None,
        progress: bool = False,
    ) -> BuildReport:
        """Read, hash, decode, encode and store `images`; files already held (label + sha256) are skipped.

        The stages overlap: worker processes read each file once, hash those bytes and decode them (a file whose
        (label, path) the store holds with the same hash is not decoded at all), while this process encodes the
        previous batch and commits it to SQLite in one transaction per batch.
        """
        from tqdm import tqdm

        started = time.perf_counter()
        report = BuildReport(scanned=len(images))
        # Paths are stored absolute: the index then answers the same from any working folder (a server started
        # elsewhere can still show each item's image). One resolve of the root, not one per file.
        images = _absolute(images)
        held = self.store.known_label_hashes()
        by_path = self.store.label_path_hashes()
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

        def commit(pending: tuple[list[str], list[str], list[str], Any]) -> None:
            labels, paths, hashes, result = pending
            self._commit(labels, paths, hashes, result(), save=False)
            report.added += len(labels)

        try:
            for batch in iter_hashed_batches(
                images, self.encoder.config.preprocessing, batch_size=batch_size, workers=workers, expected=expected
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
                        self.encoder.encode_tensors_async(tensor, batch_size=max(batch_size, 1)),
                    )
                    if in_flight is not None:
                        commit(in_flight)
                    in_flight = started_batch
                bar.update(len(batch.kept) + len(batch.held) + len(batch.skipped))
            if in_flight is not None:
                commit(in_flight)
                in_flight = None
        finally:
            if in_flight is not None:  # interrupted: let the lanes finish, drop the batch (it was never committed)
                try:
                    in_flight[3]()
                except Exception:  # the error that interrupted us is the one to report
                    pass
            bar.close()
            # Save once at the end (and on interruption): the store already holds every committed batch, and a
            # stale FAISS file is rebuilt from it on open anyway.
            self._save_index_and_manifest()
        report.seconds = time.perf_counter() - started
        self.last_report = report
        return report

    def _commit(
        self, labels: list[str], paths: list[str], hashes: list[str], vectors: np.ndarray, save: bool = True
    ) -> np.ndarray:
        ids = self.store.add(labels, paths, hashes, vectors)
        if self.index.is_trained:
            self.index.add(vectors, ids)
        else:
            # Train on everything stored so far once there is enough of it (IVF / PQ); until then search is exact.
            self.index = self._index_from_store()
        self._prototype_cache = None
        if save:
            self._save_index_and_manifest()
        return ids

    @_locked_write
    def add_folder(
        self, folder: str | os.PathLike, batch_size: int = 256, workers: int | None = None, progress: bool = False
    ) -> BuildReport:
        """Add every image of a labelled folder that the index does not hold yet."""
        images, unstorable = _split_unindexable(scan_folder(Path(folder)))
        report = self._add_images(images, batch_size=batch_size, workers=workers, progress=progress)
        report.scanned += len(unstorable)
        report.skipped[:0] = unstorable
        return report

    @_locked_write
    def add(self, images: ImageLike | Sequence[ImageLike], label: str | Sequence[str]) -> int | np.ndarray:
        """Add image(s) under `label` (one label for all, or one per image). Returns the id(s).

        A bad image raises ImageLoadError before anything is stored: the whole call is all or nothing. An image the
        index already holds under the same label (same content) is not stored again: its existing id is returned,
        and `last_add_duplicates` counts such images. Paths are stored absolute, so the index works from any folder.
        """
        single = _is_single(images)
        batch = [images] if single else list(images)
        labels = [label] * len(batch) if isinstance(label, str) else list(label)
        if len(labels) != len(batch):
            raise InvalidInputError(f"{len(batch)} images but {len(labels)} labels")
        if not batch:
            return np.empty(0, dtype=np.int64)
        if any(not str(lab).strip() for lab in labels):
            raise InvalidInputError("labels must be non-empty text")
        labels = [str(x) for x in labels]
        batch = _read_file_objects(batch)
        vectors = self._encode(batch)  # every image decoded before anything is stored: all or nothing
        paths = [_stored_path(src) for src in batch]
        hashes = [_content_sha256(src) for src in batch]
        # An image already stored under the same label (same content hash) is not stored twice, as `build` skips it:
        # its existing id is returned. Twins would double-count in kNN votes and make calibration see "genuine"
        # pairs that are one image against itself (a threshold of 1.0).
        held = self.store.ids_by_label_hash(list(zip(labels, hashes)))
        ids = np.empty(len(batch), dtype=np.int64)
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
        if new_rows:
            ids[new_rows] = self._commit([labels[r] for r in new_rows], [paths[r] for r in new_rows],
                                         [hashes[r] for r in new_rows], vectors[new_rows])
        repeats = ids < 0
        ids[repeats] = ids[-1 - ids[repeats]]
        self.last_add_duplicates = len(batch) - len(new_rows)
        return int(ids[0]) if single else ids

    @_locked_write
    def add_vectors(
        self,
        vectors: np.ndarray,
        labels: Sequence[str],
        paths: Sequence[str] | None = None,
        hashes: Sequence[str] | None = None,
        ids: Sequence[int] | np.ndarray | None = None,
        metric: str | None = None,
    ) -> np.ndarray:
        """Add precomputed (n, D) vectors (made by this index's encoder) with their labels. Returns the new ids.

        `metric` ("cosine" / "euclidean"), when given, names the space the vectors were made in: another metric
        than the index's is refused (a Euclidean encoder's raw vectors mean nothing to a cosine index, and back).

        Bring your own vectors: `paths` (the source of each vector) and `hashes` (its content hash) are optional;
        without a hash an item is identified by the sha256 of its vector. `ids` keeps given ids (an import): they
        must be positive and unused. For a cosine index vectors are L2-normalised here and all-zero rows refused (a
        Euclidean index stores them as given); NaN and infinity are refused before anything is stored. Written in transactions of 16k rows, normalised chunk by chunk, so adding a
        million vectors holds no second full copy of them; the FAISS file and manifest are saved once at the end.
        """
        if metric is not None and metric != self.metric:
            raise EncoderMismatchError(f"{self.path}: a {self.metric} index cannot hold {metric} vectors")
        cosine = self.metric == "cosine"
        vectors = np.asarray(vectors)
        if vectors.ndim != 2 or vectors.shape[1] != self.dimension:
            raise DimensionMismatchError(f"vectors have shape {vectors.shape}, index needs (n, {self.dimension})")
        if not (np.issubdtype(vectors.dtype, np.floating) or np.issubdtype(vectors.dtype, np.integer)):
            raise InvalidInputError(f"vectors must be real numbers, got dtype {vectors.dtype}")
        n = len(vectors)
        for name, column in (("labels", labels), ("paths", paths), ("hashes", hashes), ("ids", ids)):
            if column is not None and len(column) != n:
                raise InvalidInputError(f"{n} vectors but {len(column)} {name}")
        if any(not isinstance(label, str) or not label.strip() for label in labels):
            raise InvalidInputError("labels must be non-empty text")
        # Check every row before writing any: the call is all or nothing. (chunked: no (n, D) temporaries)
        for start in range(0, n, _VECTOR_CHUNK):
            chunk = vectors[start : start + _VECTOR_CHUNK]
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
            taken = [item.id for item in self.store.items(ids) if item is not None]
            if taken:
                raise InvalidInputError(f"{self.path}: id {taken[0]} is already in use")
        out = np.empty(n, dtype=np.int64)
        if n and len(self) == 0 and not self.index.is_trained:  # with vectors stored already, _commit retrains on all
            # Train on up to _TRAIN_SAMPLE rows, not just the first transaction's worth. Too few rows to train
            # (fewer than IVF lists / PQ centroids): stay untrained; _commit trains once the store holds enough.
            try:
                sample = vectors[:_TRAIN_SAMPLE]
                self.index.train(query.normalize(sample) if cosine else np.asarray(sample, dtype=np.float32))
            except InvalidInputError:
                pass
        try:
            for start in range(0, n, _VECTOR_CHUNK):
                stop = min(n, start + _VECTOR_CHUNK)
                chunk = np.asarray(vectors[start:stop], dtype=np.float32)
                # Rows already of unit length (float32 rounding) are kept bit for bit: an exported index imports
                # unchanged; others are scaled to unit length.
                if cosine:
                    norms = np.linalg.norm(chunk, axis=1, keepdims=True)
                    chunk = np.ascontiguousarray(chunk / np.where(np.abs(norms - 1) < 1e-5, np.float32(1), norms))
                else:
                    chunk = np.ascontiguousarray(chunk)
                chunk_labels = [str(x) for x in labels[start:stop]]
                chunk_paths = [str(x) for x in paths[start:stop]] if paths is not None else [""] * (stop - start)
                chunk_hashes = (
                    [str(x) for x in hashes[start:stop]] if hashes is not None else [_array_sha256(v) for v in chunk]
                )
                if ids is None:
                    out[start:stop] = self._commit(chunk_labels, chunk_paths, chunk_hashes, chunk, save=False)
                else:
                    self.store.insert_with_ids(ids[start:stop], chunk_labels, chunk_paths, chunk_hashes, chunk)
                    if self.index.is_trained:
                        self.index.add(chunk, ids[start:stop])
                    else:
                        self.index = self._index_from_store()
                    self._prototype_cache = None
                    out[start:stop] = ids[start:stop]
        finally:
            if n:
                self._save_index_and_manifest()
        return out

    def export_vectors(self, to: str | os.PathLike) -> dict[str, Any]:
        """Write ids, labels, paths, content hashes and vectors to FILE.parquet or FILE.npy (+ FILE.json)."""
        from siamesedb.export import export_vectors

        return export_vectors(self, to)

    @_locked_write
    def import_vectors(self, path: str | os.PathLike, force: bool = False, renumber: bool = False) -> dict[str, Any]:
        """Add the items of an export (see `export_vectors`); refuses another encoder's vectors unless `force`."""
        from siamesedb.export import import_vectors

        return import_vectors(self, path, force=force, renumber=renumber)

    @_locked_write
    def remove(self, ids: int | Iterable[int] | None = None, label: str | None = None) -> int:
        """Remove items by id(s) or every item of a label. Returns how many were removed."""
        if ids is None and label is None:
            raise InvalidInputError("remove needs ids (ids=...) or a label (label=...)")
        if ids is not None and label is not None:
            raise InvalidInputError("remove takes ids or a label, not both")
        if label is not None:
            removed = self.store.remove_label(label)
            if len(removed) == 0:
                raise UnknownLabelError(f"{self.path}: no items with label {label!r}")
        else:
            wanted = np.unique(np.atleast_1d(np.asarray(ids, dtype=np.int64)))
            present = [item.id for item in self.store.items(wanted) if item is not None]
            missing = sorted(set(wanted.tolist()) - set(present))
            if missing:
                raise InvalidInputError(f"{self.path}: no item with id {missing[0]}")
            self.store.remove_ids(np.asarray(present, dtype=np.int64))
            removed = np.asarray(present, dtype=np.int64)
        self.index.remove(removed)  # HNSW: tombstones, filtered out of every search
        if self.index.needs_compaction:
            self.index = self._index_from_store()  # rebuild the graph without them, from the exact stored vectors
        self._prototype_cache = None
        self._save_index_and_manifest()
        return int(len(removed))

    @_locked_write
    def set_search_defaults(self, nprobe: int | None = None, ef_search: int | None = None) -> dict[str, int]:
        """Store the nprobe (IVF) / efSearch (HNSW) searches use unless they pass their own; returns them all."""
        self.index.set_search_defaults(nprobe=nprobe, ef_search=ef_search)
        self._save_index_and_manifest()
        return self.index.search_defaults

    @_locked_write
    def reindex(self, factory: str | None = None, memory_budget: int | None = None) -> str:
        """Rebuild the FAISS index from the store: retrain it on every stored vector, drop tombstones, and
        optionally switch its type (`factory`, or "auto" to choose again for today's size). Returns the type."""
        requested = factory or self.manifest.get("factory", "Flat")
        chosen = choose_factory(len(self), self.dimension, memory_budget) if requested == AUTO else requested
        # Validates the factory before anything changes; the same type keeps its search defaults.
        fresh = self._index_from_store(chosen)
        if requested == AUTO and chosen != self.index.factory:
            fresh.set_search_defaults(**auto_search_defaults(chosen, len(self)))
        self.index = fresh
        self.manifest["factory"] = chosen
        self.manifest["factory_requested"] = requested
        self._save_index_and_manifest()
        return chosen

    @_locked_write
    def reroot(self, old: str | os.PathLike, new: str | os.PathLike) -> int:
        """The images moved from folder `old` to `new`: rewrite the stored paths that start with `old` (whole path
        components). Vectors, ids and labels are untouched. Returns how many paths changed."""
        old_text, new_text = str(old), str(new)
        if not old_text or not new_text:
            raise InvalidInputError("reroot needs both the old and the new folder")
        changed = self.store.reroot_paths(old_text, new_text)
        if changed == 0 and not Path(old_text).is_absolute():
            # Stored paths are absolute (resolved at build/add): try the absolute form of a relative OLD too.
            changed = self.store.reroot_paths(str(Path(old_text).resolve()), str(Path(new_text).resolve()))
        return changed

    # ------------------------------------------------------------------ reading

    def _queries(self, vectors: np.ndarray) -> np.ndarray:
        """(nq, D) float32 query vectors for the array-level calls: NaN / infinity refused, and for a cosine index
        scaled to unit length, so every score is a cosine in [-1, 1] whatever the caller passed (a zero row stays
        zero and scores 0). Euclidean indexes take vectors as they are."""
        array = _finite_queries(vectors)
        if array.ndim != 2 or array.shape[1] != self.dimension:
            raise DimensionMismatchError(f"query vectors have shape {array.shape}, index needs (n, {self.dimension})")
        array = np.ascontiguousarray(array, dtype=np.float32)
        if getattr(self.encoder.config, "metric", "cosine") == "cosine":
            norms = np.linalg.norm(array, axis=1)
            off = np.abs(norms - 1) >= 1e-5  # the encoder's own vectors are unit already: kept bit for bit
            if off.any():
                array = array.copy()
                array[off] = query.normalize(array[off])
        return array

    def _encode(self, images: Sequence[ImageLike]) -> np.ndarray:
        """(N, D) float32 vectors of `images` with this index's encoder; ImageLoadError names the first bad one."""
        return np.atleast_2d(self.encoder.encode(list(images)))

    def search(
        self,
        images: ImageLike | Sequence[ImageLike],
        k: int = 5,
        nprobe: int | None = None,
        ef_search: int | None = None,
    ) -> list[query.Hit] | list[list[query.Hit]]:
        """Top-k most similar items for each image (highest cosine similarity first).

        `nprobe` (IVF indexes) and `ef_search` (HNSW) trade speed for recall for this call only.
        """
        single = _is_single(images)
        hits = self.search_vectors(self._encode([images] if single else list(images)), k, nprobe, ef_search)
        return hits[0] if single else hits

    def _search_index(
        self, vectors: np.ndarray, k: int, nprobe: int | None = None, ef_search: int | None = None
    ) -> tuple[np.ndarray, np.ndarray]:
        """(D, I) from the FAISS index; exact over the store while a type that needs training cannot train yet."""
        if self.index.is_trained or len(self) == 0:
            return self.index.search(vectors, k, nprobe=nprobe, ef_search=ef_search)
        self.index.search(np.empty((0, self.dimension), np.float32), k, nprobe=nprobe, ef_search=ef_search)  # checks
        ids, corpus = self.store.vectors()
        D, rows = query.brute_force_search(vectors, corpus, k, metric=self.metric)
        return D, np.where(rows >= 0, ids[np.maximum(rows, 0)], -1)

    def search_vectors(
        self, vectors: np.ndarray, k: int = 5, nprobe: int | None = None, ef_search: int | None = None
    ) -> query.SearchResults:
        """Array-level search: (nq, D) vectors -> one list of Hits per query (fewer than k if the index is small).

        The result also holds the raw `scores` / `ids` arrays (FAISS's (D, I), -1 for none); labels and paths are
        read from the store in one query when a Hit is first asked for, or before this handle next writes or
        closes, whichever comes first (an item another process removes before then is left out).
        """
        if k < 1:
            raise InvalidInputError(f"k must be at least 1, got {k}")
        D, I = self._search_index(self._queries(vectors), k, nprobe, ef_search)
        results = query.SearchResults(D, I, self._labels_and_paths, metric=self.metric)
        self._unread_results = [r for r in self._unread_results if r() is not None and not r().fetched]
        self._unread_results.append(weakref.ref(results))
        return results

    def _labels_and_paths(self, ids: np.ndarray) -> dict[int, tuple[str, str]]:
        """{id: (label, path)} of search hits: from the in-memory ItemTable while it mirrors the store's version,
        else from the store. Measured (200k items): SQLite ~5.4 us per id looked up, a table build ~2.9 us per item,
        a table lookup ~1.2 us per id; so the table is (re)built once the ids looked up from SQLite at one version
        reach half the items held (never more than about twice the cheaper choice's cost, whatever comes next)."""
        version = self.store.version
        table = self._item_table
        if table is None or table.version != version:
            seen_version, looked_up = self._item_lookups
            looked_up = (looked_up if seen_version == version else 0) + len(ids)
            self._item_lookups = (version, looked_up)
            if looked_up < self.index.ntotal / 2:
                return self.store.labels_and_paths(ids)
            with self.store.snapshot():  # ids, labels and paths of one committed state
                table = self._item_table = ItemTable.from_store(self.store)
            if table.version != version:  # a writer committed in between: answer this call from the store
                return self.store.labels_and_paths(ids)
        return table.lookup(ids)

    def _class_table(self) -> _ClassTable:
        """Per-class prototypes and each item's class code, computed in one streamed pass over the store.

        Bounded memory at any size: vectors are read 16k rows at a time and summed per class code (grouped, then
        added into a (C, D) float64 array); no per-item Python objects are kept. Cached until the store changes.
        """
        version = self.store.version
        if self._prototype_cache is not None and self._prototype_cache.version == version:
            return self._prototype_cache
        with self.store.snapshot():  # version, labels and vectors of one committed state, whoever writes meanwhile
            return self._read_class_table()

    def _read_class_table(self) -> _ClassTable:
        version = self.store.version
        dim = self.dimension
        names = sorted(self.store.label_counts())  # one GROUP BY: the (C, D) sums are allocated once, exactly
        if not names:
            raise EmptyIndexError(f"{self.path}: the index holds no items")
        code_of = {name: code for code, name in enumerate(names)}
        sums = np.zeros((len(names), dim), dtype=np.float64)
        id_chunks, code_chunks = [], []
        for ids, rows in self.store.iter_rows("label, vector", chunk=16384):
            try:
                codes = np.fromiter((code_of[r[0]] for r in rows), dtype=np.int32, count=len(rows))
            except KeyError:  # a label appeared between the two reads: another process wrote meanwhile
                raise CorruptIndexError(f"{self.path / STORE_FILE}: changed while being read; try again") from None
            blob = b"".join(r[1] for r in rows)
            del rows
            if len(blob) != len(codes) * dim * 4:
                raise CorruptIndexError(f"{self.path / STORE_FILE}: a stored vector does not hold {dim} float32 values")
            vectors = np.frombuffer(blob, dtype="<f4").reshape(len(codes), dim)
            # Per-class sums of this chunk: rows grouped by code, then one reduceat in float64 (a (rows, D) float32
            # gather and a (classes in chunk, D) float64 result; np.add.at would cast every row to float64 and is slow).
            order = np.argsort(codes, kind="stable")
            present, starts = np.unique(codes[order], return_index=True)
            sums[present] += np.add.reduceat(vectors[order], starts, axis=0, dtype=np.float64)
            del blob, vectors, order
            id_chunks.append(ids)
            code_chunks.append(codes)
        # Normalise in place (cosine; Euclidean: divide by the class sizes, a plain mean), then one float32 copy.
        # Row norms by einsum: np.linalg.norm(axis=1) would square into a second (C, D) float64 array first.
        if self.metric == "cosine":
            sums /= np.maximum(np.sqrt(np.einsum("ij,ij->i", sums, sums)), 1e-12)[:, None]
        else:
            sums /= np.bincount(np.concatenate(code_chunks), minlength=len(names))[:, None]
        table = _ClassTable(
            version=version,
            names=names,
            prototypes=sums.astype(np.float32),
            ids=np.concatenate(id_chunks),
            codes=np.concatenate(code_chunks),
        )
        del sums
        self._prototype_cache = table
        return table

    def _prototypes(self, classes: Sequence[str] | None = None) -> tuple[list[str], np.ndarray]:
        table = self._class_table()
        names, protos = table.names, table.prototypes
        if classes is None:
            return names, protos
        rows = []
        for c in classes:
            r = bisect.bisect_left(names, c)
            if r == len(names) or names[r] != c:
                raise UnknownLabelError(f"{self.path}: no class {c!r}")
            rows.append(r)
        return [names[r] for r in rows], protos[rows]

    def classify(
        self,
        images: ImageLike | Sequence[ImageLike],
        method: str = "prototype",
        k: int = 5,
        classes: Sequence[str] | None = None,
        nprobe: int | None = None,
        ef_search: int | None = None,
        top: int | None = None,
    ) -> query.Prediction | list[query.Prediction]:
        """Which class is each image? `prototype`: nearest class mean; `knn`: score-weighted vote of the top k.

        `classes` restricts the candidates (an N-way episode); by default every class in the index competes.
        `nprobe` / `ef_search` tune the knn search over the whole index (prototype ranking is always exact).
        `top` keeps only the best `top` classes in each ranking (with many classes, the prototype search then
        runs through FAISS instead of ranking every class).
        """
        single = _is_single(images)
        predictions = self.classify_vectors(
            self._encode([images] if single else list(images)), method, k, classes, nprobe, ef_search, top=top
        )
        return predictions[0] if single else predictions

    def classify_vectors(
        self,
        vectors: np.ndarray,
        method: str = "prototype",
        k: int = 5,
        classes: Sequence[str] | None = None,
        nprobe: int | None = None,
        ef_search: int | None = None,
        top: int | None = None,
    ) -> list[query.Prediction]:
        """Array-level classify of (nq, D) vectors (normalised here for a cosine index); `top` as in `classify`."""
        vectors = self._queries(vectors)
        if isinstance(classes, str):  # one class name, not a sequence of one-letter names
            classes = [classes]
        if top is not None and (int(top) != top or top < 1):
            raise InvalidInputError(f"top must be an integer of at least 1, got {top}")
        if method == "prototype" and classes is None and top is not None:
            rankings = self._rank_prototypes_top(vectors, int(top))
        elif method == "prototype":
            names, protos = self._prototypes(classes)
            rankings = query.rank_by_prototype(vectors, protos, names, metric=self.metric)
        elif method == "knn":
            if k < 1:
                raise InvalidInputError(f"k must be at least 1, got {k}")
            if len(self) == 0:
                raise EmptyIndexError(f"{self.path}: the index holds no items")
            if classes is None:
                D, I = self._search_index(vectors, k, nprobe, ef_search)
                # Hit id -> class code through the cached table (sorted ids): no store query, no per-item objects.
                table = self._class_table()
                where = np.clip(np.searchsorted(table.ids, I), 0, len(table.ids) - 1)
                known = (I >= 0) & (table.ids[where] == I)
                codes = np.where(known, table.codes[where], -1)
                hit_labels = [[table.names[c] if c >= 0 else None for c in row] for row in codes.tolist()]
            else:
                self._prototypes(classes)  # raises UnknownLabelError for a class the index lacks
                D, hit_labels = self._knn_within(vectors, classes, k)
            rankings = query.rank_by_knn(hit_labels, D, k, metric=self.metric)
        else:
            raise InvalidInputError(f"unknown method {method!r}; choose from {', '.join(CLASSIFY_METHODS)}")
        if top is not None:
            rankings = [r[: int(top)] for r in rankings]
        return [query.Prediction(label=r[0][0], score=r[0][1], ranking=r) for r in rankings]

    def _rank_prototypes_top(self, vectors: np.ndarray, top: int) -> list[list[tuple[str, float]]]:
        """The `top` nearest prototypes of each query via an exact FAISS search over the (C, D) prototypes,
        in query blocks: never a (queries, classes) score matrix. Ties: FAISS order, not class order."""
        table = self._class_table()
        if table.prototype_index is None:
            index = VectorIndex(self.dimension, factory="Flat", metric=self.index_metric)
            index.add(table.prototypes, np.arange(len(table.names), dtype=np.int64))
            table.prototype_index = index
        rankings: list[list[tuple[str, float]]] = []
        for start in range(0, len(vectors), 4096):
            D, I = table.prototype_index.search(vectors[start : start + 4096], min(top, len(table.names)))
            rankings.extend(
                [(table.names[c], s) for c, s in zip(row_i, row_d) if c >= 0]
                for row_i, row_d in zip(I.tolist(), D.tolist())
            )
        return rankings

    def _knn_within(self, vectors: np.ndarray, classes: Sequence[str], k: int) -> tuple[np.ndarray, list[list]]:
        """Exact top-k among the items of `classes` only (an episode's support set is small: brute force)."""
        with self.store.snapshot():
            ids, corpus = self.store.vectors()
            labels = np.asarray(self.store.labels_of(ids), dtype=object)
        keep = np.isin(labels, np.asarray(list(classes), dtype=object))
        D, I = query.brute_force_search(vectors, corpus[keep], k, metric=self.metric)
        kept_labels = labels[keep]
        return D, [[kept_labels[i] if i >= 0 else None for i in row] for row in I]

    def support(self, label: str) -> np.ndarray:
        """(M, D) vectors of a class's support set."""
        ids, vectors = self.store.vectors(label=label)
        if len(ids) == 0:
            raise UnknownLabelError(f"{self.path}: no class {label!r} (see `siamesedb info --index {self.path}`)")
        return vectors

    def verify(
        self,
        images: ImageLike | Sequence[ImageLike],
        label: str,
        threshold: float | None = None,
        rule: str | None = None,
    ) -> query.Verification | list[query.Verification]:
        """Is each image of class `label`? Scores it against the class's support set and compares with a threshold.

        The threshold: `threshold` if given; else the index's calibration for the rule (`calibrate`); else the
        pair threshold the encoder carries, so a fresh index of one reference per class verifies out of the box.
        `rule` defaults to the rule calibrated last (else "prototype"). Each answer's `threshold_source` says which.
        One image in -> one Verification out; a list in -> a list out.
        """
        single = _is_single(images)
        batch = _read_file_objects([images] if single else list(images))
        vectors = self._encode(batch)
        self.check_domain(batch)
        results = [self.verify_vector(v, label, threshold=threshold, rule=rule) for v in vectors]
        for source, result in zip(batch, results):
            if isinstance(source, (str, os.PathLike)):
                result.query = str(source)
        return results[0] if single else results

    def check_domain(self, images: Sequence[ImageLike]) -> str | None:
        """Warn (once per handle, DomainWarning) when `images` look unlike the encoder's training images (aspect,
        colour, background, photo vs drawing: `data.profile_mismatch` against the profile its config records).
        Returns the reason, or None. Encoders without a recorded profile are never warned about."""
        if self._domain_checked or not self.encoder.config.data_profile:
            return None
        self._domain_checked = True
        reason = profile_mismatch(self.encoder.config.data_profile, image_profile(list(images), limit=32))
        if reason:
            warnings.warn(
                f"{self.path}: these images look unlike the encoder's training images ({reason}); its scores and "
                "thresholds may not hold: train an encoder on images like these (`siamesedb train`)",
                DomainWarning, stacklevel=3,
            )
        return reason

    @property
    def calibrations(self) -> dict[str, dict[str, Any]]:
        """The index's verification thresholds, one per rule it was calibrated for (manifest "calibrations"; an
        index calibrated before there was one per rule holds its single one under "calibration")."""
        found = dict(self.manifest.get("calibrations") or {})
        legacy = self.manifest.get("calibration")
        if legacy and legacy.get("rule") not in found:
            found[legacy["rule"]] = legacy
        return found

    def threshold_for(self, rule: str | None = None) -> tuple[str, float, str]:
        """(rule, threshold, source) that `verify` uses when no threshold is passed (see `verify`)."""
        calibrations = self.calibrations
        if rule is None:
            latest = self.manifest.get("calibration") or {}
            rule = latest.get("rule", "prototype")
        if rule not in query.VERIFY_RULES:
            raise InvalidInputError(f"unknown rule {rule!r}; choose from {', '.join(query.VERIFY_RULES)}")
        calibration = calibrations.get(rule)
        if calibration:
            source = f"index:{rule}:{calibration['genuine_pairs']}/{calibration['impostor_pairs']} pairs"
            return rule, float(calibration["threshold"]), source
        carried = self.encoder.config.pair_threshold
        if carried is None:
            raise NotCalibratedError(
                f"{self.path}: no threshold for rule {rule!r}: the index is not calibrated for it and its encoder "
                f"carries none; run `siamesedb calibrate --index {self.path} --rule {rule}` or pass --threshold"
            )
        return rule, carried, "encoder"

    def verify_vector(
        self, vector: np.ndarray, label: str, threshold: float | None = None, rule: str | None = None
    ) -> query.Verification:
        """Array-level verify of one (D,) vector (normalised here for a cosine index)."""
        vector = self._queries(vector)[0]
        if threshold is None:
            rule, threshold, source = self.threshold_for(rule)
        else:
            rule = rule or (self.manifest.get("calibration") or {}).get("rule", "prototype")
            if rule not in query.VERIFY_RULES:
                raise InvalidInputError(f"unknown rule {rule!r}; choose from {', '.join(query.VERIFY_RULES)}")
            threshold, source = float(threshold), "given"
        score = self._verification_score(vector, self.support(label), rule)
        return query.Verification(label=label, accepted=bool(score >= threshold), score=float(score),
                                  threshold=float(threshold), threshold_source=source)

    def _verification_score(self, vector: np.ndarray, support: np.ndarray, rule: str) -> float:
        return query.verification_score(vector, support, rule=rule, metric=self.metric)

    @_locked_write
    def calibrate(self, target_far: float | None = None, rule: str = "prototype") -> dict[str, Any]:
        """Choose the verification threshold for `rule` from the support set's own genuine / impostor pairs.

        Without `target_far` the threshold sits at the equal-error point (needs a class with two or more items);
        with it, at the lowest threshold whose false-accept rate on the impostor pairs is at most `target_far`,
        which impostor pairs alone fix: a one-shot index (one item per class) can be calibrated that way, its FRR
        then unknown (None). Kept per rule in the manifest; the result carries a "warning" when it rests on fewer
        than MIN_GENUINE_PAIRS genuine or MIN_IMPOSTOR_PAIRS impostor pairs.
        """
        if rule not in query.VERIFY_RULES:
            raise InvalidInputError(f"unknown rule {rule!r}; choose from {', '.join(query.VERIFY_RULES)}")
        if target_far is not None and not 0.0 <= target_far <= 1.0:
            raise InvalidInputError(f"target FAR must lie in [0, 1], got {target_far}")
        ids, vectors = self.store.vectors()
        if len(ids) == 0:
            raise EmptyIndexError(f"{self.path}: the index holds no items to calibrate on")
        labels = self.store.labels_of(ids)
        if len(set(labels)) < 2:
            raise InvalidInputError(f"{self.path}: calibration needs at least two classes (impostor pairs)")
        genuine, impostor = self._genuine_impostor_scores(vectors, labels, rule)
        if target_far is None:
            if len(genuine) == 0:
                raise InvalidInputError(
                    f"{self.path}: every class holds one item, so there are no genuine pairs for an equal-error "
                    "threshold; calibrate with --target-far F (impostor pairs alone fix it), or verify with the "
                    "encoder's own threshold (the default) or --threshold"
                )
            threshold, eer = query.eer_threshold(genuine, impostor)
            method = "eer"
        else:
            threshold = query.far_threshold(impostor, target_far)
            method = "far"
        calibration = {
            "threshold": float(threshold),
            "rule": rule,
            "method": method,
            "target_far": target_far,
            "far": float(np.mean(impostor >= threshold)),
            "frr": float(np.mean(genuine < threshold)) if len(genuine) else None,  # None: unknown (one-shot)
            "eer": float(eer) if method == "eer" else None,
            "genuine_pairs": int(len(genuine)),
            "impostor_pairs": int(len(impostor)),
            "items": int(len(ids)),
        }
        thin = []
        if 0 < len(genuine) < MIN_GENUINE_PAIRS:
            thin.append(f"{len(genuine)} genuine pairs")
        if len(impostor) < MIN_IMPOSTOR_PAIRS:
            thin.append(f"{len(impostor)} impostor pairs")
        if thin:
            calibration["warning"] = (
                f"threshold rests on only {' and '.join(thin)} (want >= {MIN_GENUINE_PAIRS} genuine and >= "
                f"{MIN_IMPOSTOR_PAIRS} impostor): add references, or keep the encoder's threshold"
            )
        self.manifest["calibrations"] = {**self.calibrations, rule: calibration}
        self.manifest["calibration"] = calibration  # the latest one: the rule `verify` uses when given none
        try:
            _write_json_atomic(self.path / MANIFEST_FILE, self.manifest)
        except OSError as exc:
            raise StorageError(f"{self.path}: cannot save the manifest ({exc.strerror or exc})") from None
        return calibration

    def _genuine_impostor_scores(self, vectors: np.ndarray, labels: list, rule: str) -> tuple[np.ndarray, np.ndarray]:
        return query.genuine_impostor_scores(vectors, labels, rule=rule, require_genuine=False, metric=self.metric)

    def info(self) -> dict[str, Any]:
        """Counts, classes, dimension, encoder and calibration of this index."""
        counts = self.store.label_counts()
        return {
            "path": str(self.path),
            "items": int(sum(counts.values())),
            "classes": len(counts),
            "dimension": self.dimension,
            "metric": self.manifest.get("metric", "inner_product"),
            "factory": self.manifest.get("factory", "Flat"),
            "search_defaults": self.index.search_defaults,
            "removed_pending": self.index.removed_pending,
            "encoder": {
                "fingerprint": self.encoder.fingerprint,
                "backbone": self.encoder.config.backbone,
                "name": self.manifest.get("encoder", {}).get("name", ""),
                "image_size": list(self.encoder.config.preprocessing.size),
                "members": self.encoder.config.members,  # > 1: an ensemble (tools/ensemble.py)
                "whitening": self.encoder.config.whitening,
                "test_time_shift": self.encoder.config.test_time_shift,
                "pair_threshold": self.encoder.config.pair_threshold,  # verify's threshold where none is calibrated
            },
            "calibration": self.manifest.get("calibration"),  # the latest: the rule verify uses when given none
            "calibrations": self.calibrations,  # one per rule
            "format_version": self.manifest.get("format_version"),
            "largest_classes": sorted(counts.items(), key=lambda kv: (-kv[1], kv[0]))[:5],
        }

    def refresh(self) -> bool:
        """Catch up with writes another process made to this index (a server's view of it). Returns whether it did.

        Reads only: the manifest is re-read, and the FAISS index is reloaded from its file when that mirrors the
        store's current version, else rebuilt in memory from the store (never written here, so a reader can never
        race the writer for the files).
        """
        manifest = _read_manifest(self.path)
        version = self.store.version
        if manifest == self.manifest and self.manifest.get("vectors_store_version") == version:
            return False  # nothing changed (this object's own writes keep the two in step)
        if getattr(self, "_refreshed_to", None) == (version, manifest):
            return False  # caught up already; the writer has not finished its FAISS file and manifest yet
        self._refreshed_to = (version, manifest)
        self.manifest = manifest
        index = None
        vectors_path = self.path / VECTORS_FILE
        if manifest.get("vectors_store_version") == version and vectors_path.exists():
            try:
                index = VectorIndex.load(vectors_path, factory=manifest.get("factory", "Flat"))
                if index.ntotal != self.store.count():
                    index = None
            except CorruptIndexError:
                index = None
        if index is not None:
            self._index_version = version
        self.index = index if index is not None else self._index_from_store()
        self._prototype_cache = None
        return True


def verify_pair(
    image_a: ImageLike,
    image_b: ImageLike,
    encoder: str | os.PathLike | Encoder = DEFAULT_ENCODER,
    threshold: float | None = None,
    device: str = "auto",
) -> query.Verification:
    """Do two images show the same class? Their score (cosine, or minus the Euclidean distance for a Euclidean
    encoder) against the encoder's calibrated pair threshold."""
    enc = encoder if isinstance(encoder, Encoder) else Encoder.load(encoder, device=device)
    source = "given"
    if threshold is None:
        threshold, source = enc.config.pair_threshold, "encoder"
        if threshold is None:
            raise NotCalibratedError("this encoder carries no pair threshold; pass one with --threshold")
    vectors = np.atleast_2d(enc.encode([image_a, image_b]))
    score = float(query.scores_for(enc.config.metric, vectors[:1], vectors[1:])[0, 0])  # Euclidean: -distance
    return query.Verification(
        label=str(image_b), accepted=bool(score >= threshold), score=score, threshold=float(threshold),
        threshold_source=source, query=str(image_a) if isinstance(image_a, (str, os.PathLike)) else None,
    )


def _finite_queries(vectors: np.ndarray) -> np.ndarray:
    """(nq, D) query vectors, refused when any value is NaN or infinite (every score would be NaN, silently)."""
    array = np.atleast_2d(np.asarray(vectors))
    if np.issubdtype(array.dtype, np.number) and not np.isfinite(array).all():
        raise InvalidInputError("query vectors contain NaN or infinity")
    return array


def _absolute(images: list[LabelledImage]) -> list[LabelledImage]:
    """`images` with absolute paths; the parents of a folder scan are resolved once each (symlinks resolved too)."""
    resolved: dict[Path, Path] = {}
    out = []
    for image in images:
        parent = Path(image.path).parent
        if parent not in resolved:
            resolved[parent] = parent.resolve()
        out.append(LabelledImage(path=resolved[parent] / Path(image.path).name, label=image.label))
    return out


def _stored_path(source: ImageLike) -> str:
    """What the store records as an image's source: its absolute path (resolved now, so the index answers the same
    from any working folder and `serve` can show it), or "" for in-memory images."""
    if isinstance(source, (str, os.PathLike)):
        return str(Path(source).resolve())
    return ""


def _content_sha256(source: ImageLike) -> str:
    """sha256 of a file's bytes, of in-memory encoded bytes, or of an array / PIL image's pixels."""
    import hashlib

    if isinstance(source, (str, os.PathLike)):
        return file_sha256(source)
    if isinstance(source, (bytes, bytearray, memoryview)):
        return hashlib.sha256(bytes(source)).hexdigest()
    if isinstance(source, EncodedFile):
        return hashlib.sha256(source.data).hexdigest()
    return _array_sha256(source)


def _read_file_objects(images: list[ImageLike]) -> list[ImageLike]:
    """File-like objects read once into memory (they can be decoded and hashed from those bytes; a stream can't be
    read twice); everything else as it is."""
    return [
        EncodedFile(_read_file_like(src), str(getattr(src, "name", "<file object>")))
        if callable(getattr(src, "read", None)) and not isinstance(src, (str, os.PathLike)) else src
        for src in images
    ]


def _array_sha256(obj: Any) -> str:
    """Content hash of an in-memory image or vector (files are hashed by data.file_sha256)."""
    import hashlib

    array = np.asarray(obj)
    return hashlib.sha256(array.tobytes() + str(array.shape).encode()).hexdigest()


__all__ = ["SiameseDB", "BuildReport", "verify_pair"]
