"""SiameseDB, the front door: build, open, add, remove, search, classify, verify and calibrate an index.

An index is a folder (layout.py; DESIGN.md "On disk"): a manifest, the encoder that made the vectors, and the items
in a backend (backends/): the embedded one (items.sqlite + vectors.faiss, backends/faiss.py) or Milvus
(backends/milvus.py: a Milvus Lite file in the folder, or a Milvus server). SiameseDB checks inputs, encodes images
and asks the questions; the backend stores items and finds nearest neighbours; classes.py derives the classes.

Every public write holds the index's write lock (locking.py) and, on first taking it, catches up with what other
processes wrote. Caches (class prototypes, the in-memory item table) are keyed on the backend's version, which
every committed write moves, so no write has to remember to drop them.
"""

from __future__ import annotations

import functools
import os
import warnings
import weakref
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np

from siamesedb import query
from siamesedb.backends.faiss import FaissBackend
from siamesedb.classes import (
    CLASSIFY_METHODS,
    MIN_GENUINE_PAIRS,
    MIN_IMPOSTOR_PAIRS,
    ClassTable,
    calibration_record,
    calibrations_of,
    check_rule,
    read_class_table,
    threshold_for,
)
from siamesedb.data import DomainWarning, image_profile, profile_mismatch, scan_folder
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
    StorageError,
    UnknownLabelError,
)
from siamesedb.index import AUTO, METRIC_OF_ENCODER, VectorIndex, auto_search_defaults, choose_factory
from siamesedb.ingest import (
    VECTOR_CHUNK,
    BuildReport,
    ImageLike,
    add_images,
    array_sha256,
    checked_vector_batch,
    content_sha256,
    is_single,
    read_file_objects,
    split_unindexable,
    stored_path,
    unit_rows,
)
from siamesedb.item_table import ItemTable
from siamesedb.layout import (
    DEFAULT_HOME,
    ENCODER_DIR,
    FORMAT_VERSION,
    MANIFEST_FILE,
    STORE_FILE,
    VECTORS_FILE,
    new_manifest,
    read_manifest,
    remove_temporaries,
    write_json_atomic,
)
from siamesedb.locking import IndexWriteLock

__all__ = ["SiameseDB", "BuildReport", "verify_pair", "CLASSIFY_METHODS", "DEFAULT_HOME", "MANIFEST_FILE",
           "STORE_FILE", "VECTORS_FILE", "ENCODER_DIR", "FORMAT_VERSION", "MIN_GENUINE_PAIRS", "MIN_IMPOSTOR_PAIRS"]


def _locked_write(method):
    """Run a public write of SiameseDB under the index's write lock (see SiameseDB._writing)."""

    @functools.wraps(method)
    def locked(self, *args, **kwargs):
        with self._writing():
            return method(self, *args, **kwargs)

    return locked


def _hook(backend: Any, name: str, *args: Any, default: Any = None) -> Any:
    """Call a backend's optional lifecycle hook (catch_up, begin_write, end_write, save, refresh, bulk_sample):
    the embedded backend mirrors its store in a FAISS file and needs them; a backend that does not, lacks them."""
    method = getattr(backend, name, None)
    return method(*args) if method is not None else default


class SiameseDB:
    """An index of labelled image embeddings on disk. Create it with `build`/`create`, reopen it with `open`."""

    def __init__(self, path: Path, backend: Any, encoder: Encoder, manifest: dict[str, Any],
                 lock: IndexWriteLock | None = None):
        self.path = path
        self.backend = backend
        self.encoder = encoder
        self.manifest = manifest
        self.last_report: BuildReport | None = None
        # One writer at a time (locking.py); build/open/create pass one carrying their lock_timeout.
        self._lock = lock or IndexWriteLock(path)
        # Derived from the backend's items and keyed on its version (see the module docstring).
        self._prototype_cache: ClassTable | None = None
        # Every item's label and path in memory for search hits (item_table.py), per version; built once the ids
        # looked up from the backend at one version reach half the items (see _labels_and_paths).
        self._item_table: ItemTable | None = None
        self._item_lookups = (-1, 0)  # (version, ids looked up from the backend at that version)
        # Search results whose labels and paths are not read yet: read before this handle writes or closes, so
        # they describe the index as it was when searched and stay usable after close().
        self._unread_results: list[weakref.ref[query.SearchResults]] = []
        self._domain_checked = False  # check_domain warns once per handle

    def __repr__(self) -> str:
        state = "closed" if self.backend.closed else f"{len(self)} items, {len(self.backend.label_counts())} classes"
        return f"SiameseDB({str(self.path)!r}, {state}, encoder {self.encoder.fingerprint})"

    # ------------------------------------------------------------------ the embedded backend's parts

    @property
    def store(self) -> Any:
        """The embedded backend's item store (items.sqlite); for another backend, the backend itself, which answers
        the same reads (items, vectors, label_counts, iter_rows, version...)."""
        return getattr(self.backend, "store", self.backend)

    @property
    def index(self) -> VectorIndex | None:
        """The embedded backend's FAISS index (None for another backend)."""
        return getattr(self.backend, "index", None)

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
        backend: str = "faiss",
        milvus_uri: str | None = None,
        _lock: IndexWriteLock | None = None,
    ) -> SiameseDB:
        """Make a new, empty index folder at `path` carrying a copy of `encoder`.

        factory="auto" picks the index type for `expected_items` vectors within `memory_budget` bytes
        (siamesedb.index.choose_factory; README "Index types"); the manifest records the type chosen.
        backend="milvus" keeps the items in Milvus (README "Scaling out"): `milvus_uri` a Milvus server
        (http://...), else a Milvus Lite file inside the folder.
        The manifest is written last: a folder without one is an index whose creation was cut short, and creating
        it again starts over (as long as it holds no items).
        """
        path = Path(path)
        if (path / MANIFEST_FILE).exists():
            raise IndexExistsError(f"{path}: an index already exists here (remove it first, or use `add`)")
        if path.exists() and not path.is_dir():
            raise IndexExistsError(f"{path}: exists and is not a folder")
        if backend not in ("faiss", "milvus"):
            raise InvalidInputError(f"unknown backend {backend!r}; choose from faiss, milvus")
        enc = encoder if isinstance(encoder, Encoder) else Encoder.load(encoder, device=device)
        requested = factory
        if factory == AUTO:
            factory = choose_factory(expected_items or 0, enc.dimension, memory_budget)
        # Validates the factory before anything is written. The index's metric is its encoder's.
        metric = METRIC_OF_ENCODER[enc.config.metric]
        search_defaults = auto_search_defaults(factory, expected_items or 0) if requested == AUTO else {}
        if backend == "milvus":
            from siamesedb.backends.milvus_index import milvus_index_type

            milvus_index_type(factory)
        else:
            index = VectorIndex(enc.dimension, factory=factory, device=device, backend=search_backend, metric=metric)
            index.set_search_defaults(**search_defaults)
        path.mkdir(parents=True, exist_ok=True)
        lock = _lock or IndexWriteLock(path, timeout=lock_timeout)
        with lock:
            if (path / MANIFEST_FILE).exists():  # another process finished creating it while we waited for the lock
                raise IndexExistsError(f"{path}: an index already exists here (remove it first, or use `add`)")
            remove_temporaries(path)
            encoder_fields = {
                "fingerprint": enc.fingerprint,
                "backbone": enc.config.backbone,
                "name": enc.config.name or str(encoder if not isinstance(encoder, Encoder) else ""),
            }
            if backend == "milvus":
                from siamesedb.backends.milvus_index import create_milvus

                store, fields = create_milvus(path, enc.dimension, enc.config.metric, factory, milvus_uri,
                                              search_defaults)
            else:
                store = FaissBackend.create(path, index, device, search_backend)
                fields = {"vectors_store_version": store.version}
            enc.save(path / ENCODER_DIR)
            manifest = new_manifest(enc.dimension, metric, factory, requested, encoder_fields, backend, **fields)
            db = cls(path, store, enc, manifest, lock)
            db._save()
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
        backend: str = "faiss",
        milvus_uri: str | None = None,
    ) -> SiameseDB:
        """Index every image of a labelled folder (label = parent folder relative to the root).

        Re-running a build into an existing index adds only the files it does not hold yet (same label and content
        hash), so an interrupted build resumes where it stopped. Unreadable files are skipped and reported in
        `db.last_report`, never fatal. The whole build holds the index's write lock (a second writer waits up to
        `lock_timeout` seconds, default $SIAMESEDB_LOCK_TIMEOUT or 60). `backend` / `milvus_uri` as in `create`
        (an existing index keeps the backend its manifest names).
        """
        folder = Path(folder)
        images = scan_folder(folder)  # FolderError for a missing / empty folder, before anything is created
        images, unstorable = split_unindexable(images)
        path = Path(path) if path is not None else DEFAULT_HOME / folder.resolve().name
        if not (path / MANIFEST_FILE).exists():
            # Check the encoder and factory before the folder (and its lock file) is made.
            checked = encoder if isinstance(encoder, Encoder) else Encoder.load(encoder, device=device)
            if factory != AUTO and backend != "milvus":
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
                                backend=backend, milvus_uri=milvus_uri, _lock=lock)
            remove_temporaries(path)
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
        """Open an existing index; the embedded backend's FAISS file is rebuilt from the store when missing, stale
        or unreadable.

        Search runs where `device` resolves (README "GPU search"); search_backend="torch" forces the exact torch
        search, also on the CPU. Opening takes no lock: many readers may open an index at once, also while a writer
        works on it. Writes through the handle (add, remove, calibrate) take the write lock, waiting up to
        `lock_timeout` seconds.
        """
        path = Path(path)
        if not path.is_dir() or not (path / MANIFEST_FILE).exists():
            raise IndexNotFoundError(f"{path}: no index here (build one with `siamesedb build FOLDER --index {path}`)")
        manifest = read_manifest(path)
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
        lock = _lock or IndexWriteLock(path, timeout=lock_timeout)
        if manifest.get("backend", "faiss") == "milvus":
            from siamesedb.backends.milvus_index import open_milvus

            return cls(path, open_milvus(path, manifest, encoder.config.metric), encoder, manifest, lock)
        db = cls(path, FaissBackend.open(path, manifest, device, search_backend), encoder, manifest, lock)
        if not db.backend.fresh and lock.try_acquire():
            # Save the rebuilt FAISS file only when no writer is at work (never wait: a reader must not block). A
            # writer holding the lock saves a fresh file when it finishes; until then every opener rebuilds in memory.
            try:
                db._catch_up()
                db._save()
            except StorageError:
                pass  # a reader answers from the rebuilt index in memory; saving it was only a courtesy
            finally:
                lock.release()
        return db

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
                started_at = _hook(self.backend, "begin_write")
            yield
        except BaseException:
            if outermost:
                _hook(self.backend, "end_write", started_at, True)
            raise
        else:
            if outermost:
                _hook(self.backend, "end_write", started_at, False)
        finally:
            self._lock.release()

    def _catch_up(self) -> None:
        """Under the write lock: drop leftovers of crashed writers, re-read the manifest, let the backend catch up."""
        remove_temporaries(self.path)
        self.manifest = read_manifest(self.path)
        _hook(self.backend, "catch_up", self.manifest)

    def _save(self) -> None:
        """Save the backend's derived files (FAISS) and then the manifest that names what they mirror."""
        try:
            fields = _hook(self.backend, "save", default=None)
            self.manifest.update(fields if fields is not None else {"search_defaults": self.backend.search_defaults})
            write_json_atomic(self.path / MANIFEST_FILE, self.manifest)
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
        if not self.backend.closed:
            self._read_pending_results()
        self.backend.close()

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
        return self.backend.count()

    def labels(self) -> list[str]:
        return sorted(self.backend.label_counts())

    # ------------------------------------------------------------------ writing

    def _add_images(self, images: list, batch_size: int = 256, workers: int | None = None,
                    progress: bool = False) -> BuildReport:
        """The build pipeline (ingest.add_images) into this index; saves once at the end, also when interrupted
        (every committed batch is in the backend already)."""
        try:
            report = add_images(images, self.backend, self.encoder, self._commit, batch_size=batch_size,
                                workers=workers, progress=progress)
        finally:
            self._save()
        self.last_report = report
        return report

    def _commit(self, labels: list[str], paths: list[str], hashes: list[str], vectors: np.ndarray,
                ids: np.ndarray | None = None) -> np.ndarray:
        """The one write path of new items: the backend stores them (allocating ids unless given)."""
        return self.backend.add(ids, labels, paths, hashes, vectors)

    @_locked_write
    def add_folder(
        self, folder: str | os.PathLike, batch_size: int = 256, workers: int | None = None, progress: bool = False
    ) -> BuildReport:
        """Add every image of a labelled folder that the index does not hold yet."""
        images, unstorable = split_unindexable(scan_folder(Path(folder)))
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
        single = is_single(images)
        batch = [images] if single else list(images)
        labels = [label] * len(batch) if isinstance(label, str) else list(label)
        if len(labels) != len(batch):
            raise InvalidInputError(f"{len(batch)} images but {len(labels)} labels")
        if not batch:
            return np.empty(0, dtype=np.int64)
        if any(not str(lab).strip() for lab in labels):
            raise InvalidInputError("labels must be non-empty text")
        labels = [str(x) for x in labels]
        batch = read_file_objects(batch)
        vectors = self._encode(batch)  # every image decoded before anything is stored: all or nothing
        paths = [stored_path(src) for src in batch]
        hashes = [content_sha256(src) for src in batch]
        # An image already stored under the same label (same content hash) is not stored twice, as `build` skips it:
        # its existing id is returned. Twins would double-count in kNN votes and make calibration see "genuine"
        # pairs that are one image against itself (a threshold of 1.0).
        held = self.backend.ids_by_label_hash(list(zip(labels, hashes)))
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
            self._save()
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
        Euclidean index stores them as given); NaN and infinity are refused before anything is stored. Written in
        transactions of 16k rows, normalised chunk by chunk, so adding a million vectors holds no second full copy
        of them; the index files and manifest are saved once at the end.
        """
        if metric is not None and metric != self.metric:
            raise EncoderMismatchError(f"{self.path}: a {self.metric} index cannot hold {metric} vectors")
        cosine = self.metric == "cosine"
        vectors, ids = checked_vector_batch(vectors, labels, paths, hashes, ids, self.dimension, cosine)
        n = len(vectors)
        if ids is not None:
            taken = [item.id for item in self.backend.items(ids) if item is not None]
            if taken:
                raise InvalidInputError(f"{self.path}: id {taken[0]} is already in use")
        out = np.empty(n, dtype=np.int64)
        if n:
            sample = vectors[: 131072]
            _hook(self.backend, "bulk_sample", unit_rows(sample) if cosine else np.asarray(sample, np.float32))
        try:
            for start in range(0, n, VECTOR_CHUNK):
                stop = min(n, start + VECTOR_CHUNK)
                chunk = unit_rows(vectors[start:stop]) if cosine else np.ascontiguousarray(vectors[start:stop],
                                                                                          dtype=np.float32)
                chunk_paths = [str(x) for x in paths[start:stop]] if paths is not None else [""] * (stop - start)
                chunk_hashes = (
                    [str(x) for x in hashes[start:stop]] if hashes is not None else [array_sha256(v) for v in chunk]
                )
                out[start:stop] = self._commit([str(x) for x in labels[start:stop]], chunk_paths, chunk_hashes, chunk,
                                               ids=None if ids is None else ids[start:stop])
        finally:
            if n:
                self._save()
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
            removed = len(self.backend.remove_label(label))
            if removed == 0:
                raise UnknownLabelError(f"{self.path}: no items with label {label!r}")
        else:
            wanted = np.unique(np.atleast_1d(np.asarray(ids, dtype=np.int64)))
            present = [item.id for item in self.backend.items(wanted) if item is not None]
            missing = sorted(set(wanted.tolist()) - set(present))
            if missing:
                raise InvalidInputError(f"{self.path}: no item with id {missing[0]}")
            removed = self.backend.remove(np.asarray(present, dtype=np.int64))
        self._save()
        return int(removed)

    @_locked_write
    def set_search_defaults(self, nprobe: int | None = None, ef_search: int | None = None) -> dict[str, int]:
        """Store the nprobe (IVF) / efSearch (HNSW) searches use unless they pass their own; returns them all."""
        self.backend.set_search_defaults(nprobe=nprobe, ef_search=ef_search)
        self._save()
        return self.backend.search_defaults

    @_locked_write
    def reindex(self, factory: str | None = None, memory_budget: int | None = None) -> str:
        """Rebuild the FAISS index from the store: retrain it on every stored vector, drop tombstones, and
        optionally switch its type (`factory`, or "auto" to choose again for today's size). Returns the type."""
        if not hasattr(self.backend, "reindex"):
            raise InvalidInputError(f"{self.path}: a {self.manifest.get('backend')} index keeps its index type; "
                                    "build a new index to change it")
        requested = factory or self.manifest.get("factory", "Flat")
        chosen = choose_factory(len(self), self.dimension, memory_budget) if requested == AUTO else requested
        # Validates the factory before anything changes; the same type keeps its search defaults.
        previous = self.index.factory
        fresh = self.backend.reindex(self.manifest, chosen)
        if requested == AUTO and chosen != previous:
            fresh.set_search_defaults(**auto_search_defaults(chosen, len(self)))
        self.manifest["factory"] = chosen
        self.manifest["factory_requested"] = requested
        self._save()
        return chosen

    @_locked_write
    def reroot(self, old: str | os.PathLike, new: str | os.PathLike) -> int:
        """The images moved from folder `old` to `new`: rewrite the stored paths that start with `old` (whole path
        components). Vectors, ids and labels are untouched. Returns how many paths changed."""
        old_text, new_text = str(old), str(new)
        if not old_text or not new_text:
            raise InvalidInputError("reroot needs both the old and the new folder")
        changed = self.backend.reroot_paths(old_text, new_text)
        if changed == 0 and not Path(old_text).is_absolute():
            # Stored paths are absolute (resolved at build/add): try the absolute form of a relative OLD too.
            changed = self.backend.reroot_paths(str(Path(old_text).resolve()), str(Path(new_text).resolve()))
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
        single = is_single(images)
        hits = self.search_vectors(self._encode([images] if single else list(images)), k, nprobe, ef_search)
        return hits[0] if single else hits

    def search_vectors(
        self, vectors: np.ndarray, k: int = 5, nprobe: int | None = None, ef_search: int | None = None
    ) -> query.SearchResults:
        """Array-level search: (nq, D) vectors -> one list of Hits per query (fewer than k if the index is small).

        The result also holds the raw `scores` / `ids` arrays (FAISS's (D, I), -1 for none); labels and paths are
        read from the backend in one query when a Hit is first asked for, or before this handle next writes or
        closes, whichever comes first (an item another process removes before then is left out).
        """
        if k < 1:
            raise InvalidInputError(f"k must be at least 1, got {k}")
        D, I = self.backend.search(self._queries(vectors), k, nprobe=nprobe, ef_search=ef_search)
        results = query.SearchResults(D, I, self._labels_and_paths, metric=self.metric)
        self._unread_results = [r for r in self._unread_results if r() is not None and not r().fetched]
        self._unread_results.append(weakref.ref(results))
        return results

    def _labels_and_paths(self, ids: np.ndarray) -> dict[int, tuple[str, str]]:
        """{id: (label, path)} of search hits: from the in-memory ItemTable while it mirrors the backend's version,
        else from the backend. Measured (200k items): SQLite ~5.4 us per id looked up, a table build ~2.9 us per
        item, a table lookup ~1.2 us per id; so the table is (re)built once the ids looked up from SQLite at one
        version reach half the items held (never more than about twice the cheaper choice's cost)."""
        version = self.backend.version
        table = self._item_table
        if table is None or table.version != version:
            seen_version, looked_up = self._item_lookups
            looked_up = (looked_up if seen_version == version else 0) + len(ids)
            self._item_lookups = (version, looked_up)
            if looked_up < self.backend.count() / 2:
                return self.backend.labels_and_paths(ids)
            with self.backend.snapshot():  # ids, labels and paths of one committed state
                table = self._item_table = ItemTable.from_store(self.backend)
            if table.version != version:  # a writer committed in between: answer this call from the backend
                return self.backend.labels_and_paths(ids)
        return table.lookup(ids)

    def _class_table(self) -> ClassTable:
        """Per-class prototypes and each item's class code (classes.read_class_table), cached per backend version."""
        version = self.backend.version
        if self._prototype_cache is not None and self._prototype_cache.version == version:
            return self._prototype_cache
        with self.backend.snapshot():  # version, labels and vectors of one committed state
            self._prototype_cache = read_class_table(self.backend, self.metric, self._items_where())
        return self._prototype_cache

    def _items_where(self) -> Path:
        """Where the items live, for error messages: the store file, or the index folder for another backend."""
        return self.path / STORE_FILE if isinstance(self.backend, FaissBackend) else self.path

    def _prototypes(self, classes: Sequence[str] | None = None) -> tuple[list[str], np.ndarray]:
        return self._class_table().select(classes, self.path)

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
        single = is_single(images)
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
            rankings = self._class_table().rank_top(vectors, int(top), self.index_metric)
        elif method == "prototype":
            names, protos = self._prototypes(classes)
            rankings = query.rank_by_prototype(vectors, protos, names, metric=self.metric)
        elif method == "knn":
            if k < 1:
                raise InvalidInputError(f"k must be at least 1, got {k}")
            if len(self) == 0:
                raise EmptyIndexError(f"{self.path}: the index holds no items")
            if classes is not None:
                self._prototypes(classes)  # raises UnknownLabelError for a class the index lacks
            # `classes` filter inside the backend (Milvus: a label expression), so k hits of those classes return.
            D, I = self.backend.search(vectors, k, classes, nprobe=nprobe, ef_search=ef_search)
            rankings = query.rank_by_knn(self._class_table().labels_of_hits(I), D, k, metric=self.metric)
        else:
            raise InvalidInputError(f"unknown method {method!r}; choose from {', '.join(CLASSIFY_METHODS)}")
        if top is not None:
            rankings = [r[: int(top)] for r in rankings]
        return [query.Prediction(label=r[0][0], score=r[0][1], ranking=r) for r in rankings]

    def support(self, label: str) -> np.ndarray:
        """(M, D) vectors of a class's support set."""
        ids, vectors = self.backend.vectors(label=label)
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
        single = is_single(images)
        batch = read_file_objects([images] if single else list(images))
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
        """The index's verification thresholds, one per rule it was calibrated for (classes.calibrations_of)."""
        return calibrations_of(self.manifest)

    def threshold_for(self, rule: str | None = None) -> tuple[str, float, str]:
        """(rule, threshold, source) that `verify` uses when no threshold is passed (see `verify`)."""
        return threshold_for(self.manifest, self.encoder.config.pair_threshold, rule, self.path)

    def verify_vector(
        self, vector: np.ndarray, label: str, threshold: float | None = None, rule: str | None = None
    ) -> query.Verification:
        """Array-level verify of one (D,) vector (normalised here for a cosine index)."""
        vector = self._queries(vector)[0]
        if threshold is None:
            rule, threshold, source = self.threshold_for(rule)
        else:
            rule = check_rule(rule or (self.manifest.get("calibration") or {}).get("rule", "prototype"))
            threshold, source = float(threshold), "given"
        score = query.verification_score(vector, self.support(label), rule=rule, metric=self.metric)
        return query.Verification(label=label, accepted=bool(score >= threshold), score=float(score),
                                  threshold=float(threshold), threshold_source=source)

    @_locked_write
    def calibrate(self, target_far: float | None = None, rule: str = "prototype") -> dict[str, Any]:
        """Choose the verification threshold for `rule` from the support set's own genuine / impostor pairs.

        Without `target_far` the threshold sits at the equal-error point (needs a class with two or more items);
        with it, at the lowest threshold whose false-accept rate on the impostor pairs is at most `target_far`,
        which impostor pairs alone fix: a one-shot index (one item per class) can be calibrated that way, its FRR
        then unknown (None). Kept per rule in the manifest; the result carries a "warning" when it rests on fewer
        than MIN_GENUINE_PAIRS genuine or MIN_IMPOSTOR_PAIRS impostor pairs.
        """
        check_rule(rule)
        if target_far is not None and not 0.0 <= target_far <= 1.0:
            raise InvalidInputError(f"target FAR must lie in [0, 1], got {target_far}")
        with self.backend.snapshot():
            ids, vectors = self.backend.vectors()
            labels = self.backend.labels_of(ids)
        if len(ids) == 0:
            raise EmptyIndexError(f"{self.path}: the index holds no items to calibrate on")
        if len(set(labels)) < 2:
            raise InvalidInputError(f"{self.path}: calibration needs at least two classes (impostor pairs)")
        genuine, impostor = query.genuine_impostor_scores(vectors, labels, rule=rule, require_genuine=False,
                                                          metric=self.metric)
        calibration = calibration_record(genuine, impostor, rule, target_far, len(ids), self.path)
        self.manifest["calibrations"] = {**self.calibrations, rule: calibration}
        self.manifest["calibration"] = calibration  # the latest one: the rule `verify` uses when given none
        try:
            write_json_atomic(self.path / MANIFEST_FILE, self.manifest)
        except OSError as exc:
            raise StorageError(f"{self.path}: cannot save the manifest ({exc.strerror or exc})") from None
        return calibration

    def info(self) -> dict[str, Any]:
        """Counts, classes, dimension, encoder and calibration of this index."""
        counts = self.backend.label_counts()
        described = self.backend.describe()
        return {
            "path": str(self.path),
            "items": int(sum(counts.values())),
            "classes": len(counts),
            "dimension": self.dimension,
            "metric": self.manifest.get("metric", "inner_product"),
            "backend": self.manifest.get("backend", "faiss"),
            "factory": self.manifest.get("factory", "Flat"),
            "search_defaults": self.backend.search_defaults,
            "removed_pending": described.get("removed_pending", 0),
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
            **({"milvus": {k: v for k, v in described.items() if k in ("uri", "lite", "collection", "index_type")}}
               if described.get("backend") == "milvus" else {}),
        }

    def refresh(self) -> bool:
        """Catch up with writes another process made to this index (a server's view of it). Returns whether it did.

        Reads only: the manifest is re-read, and the backend catches up (the embedded one reloads its FAISS file
        when that mirrors the store's current version, else rebuilds it in memory; never written here, so a reader
        can never race the writer for the files). Caches follow the backend's version by themselves.
        """
        manifest = read_manifest(self.path)
        version = self.backend.version
        if manifest == self.manifest and self.manifest.get("vectors_store_version", version) == version:
            return False  # nothing changed (this object's own writes keep the two in step)
        if getattr(self, "_refreshed_to", None) == (version, manifest):
            return False  # caught up already; the writer has not finished its FAISS file and manifest yet
        self._refreshed_to = (version, manifest)
        self.manifest = manifest
        _hook(self.backend, "refresh", manifest)
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




