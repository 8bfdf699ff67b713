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
import weakref
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np

from siamesedb import query
from siamesedb.backends import check_factory, create_backend, open_backend
from siamesedb.classes import CLASSIFY_METHODS, MIN_GENUINE_PAIRS, MIN_IMPOSTOR_PAIRS, ClassTable, calibrate_items
from siamesedb.data import scan_folder
from siamesedb.encoder import DEFAULT_ENCODER, Encoder
from siamesedb.errors import (EncoderMismatchError, IndexExistsError, IndexNotFoundError, InvalidInputError,
                              StorageError, UnknownLabelError)
from siamesedb.index import AUTO, METRIC_OF_ENCODER, VectorIndex, auto_search_defaults, choose_factory
from siamesedb.ingest import (BuildReport, ImageLike, add_images, checked_vector_batch, content_sha256, ids_for_new_rows,
                              is_single, read_file_objects, resolve_repeats, split_unindexable, stored_path, unit_rows,
                              vector_chunks)
from siamesedb.item_table import ItemTable
from siamesedb.layout import (DEFAULT_HOME, ENCODER_DIR, FORMAT_VERSION, MANIFEST_FILE, STORE_FILE, VECTORS_FILE,
                              new_manifest, read_checked, read_manifest, remove_temporaries, write_json_atomic)
from siamesedb.locking import IndexWriteLock
from siamesedb.reading import IndexQueries, verify_pair

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


class SiameseDB(IndexQueries):
    """An index of labelled image embeddings on disk. Create it with `build`/`create`, reopen it with `open`.

    Creating, opening and writing live here; searching, classifying and verifying in its base, IndexQueries."""

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
        self._saves_deferred = False  # inside bulk_writes: the index files are saved once, when it ends

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
        enc = encoder if isinstance(encoder, Encoder) else Encoder.load(encoder, device=device)
        requested = factory
        if factory == AUTO:
            factory = choose_factory(expected_items or 0, enc.dimension, memory_budget)
        search_defaults = auto_search_defaults(factory, expected_items or 0) if requested == AUTO else {}
        check_factory(backend, factory, enc.dimension)  # before anything is written
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
            store, fields = create_backend(backend, path, enc.dimension, enc.config.metric, factory, search_defaults,
                                           device, search_backend, milvus_uri)
            enc.save(path / ENCODER_DIR)
            manifest = new_manifest(enc.dimension, METRIC_OF_ENCODER[enc.config.metric], factory, requested,
                                    encoder_fields, backend, **fields)
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
            if factory != AUTO:
                check_factory(backend, factory, checked.dimension)
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
        manifest, encoder = read_checked(path, device)
        lock = _lock or IndexWriteLock(path, timeout=lock_timeout)
        db = cls(path, open_backend(path, manifest, encoder.config.metric, device, search_backend), encoder, manifest,
                 lock)
        if not getattr(db.backend, "fresh", True) and lock.try_acquire():
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

    @contextmanager
    def bulk_writes(self) -> Iterator[SiameseDB]:
        """Hold the write lock across many writes (`add_vectors`, `add`, `remove`...) and save the index files and
        manifest once, when the block ends, instead of after each write: for pipelines that commit many batches
        (the Ray build). Every batch is durable in the backend when its call returns, as always; only the derived
        FAISS file waits (a crash meanwhile leaves it stale, and the next open rebuilds it from the store)."""
        with self._writing():
            outermost = not self._saves_deferred
            self._saves_deferred = True
            try:
                yield self
            finally:
                if outermost:
                    self._saves_deferred = False
                    self._save()

    def _catch_up(self) -> None:
        """Under the write lock: drop leftovers of crashed writers, re-read the manifest, let the backend catch up."""
        remove_temporaries(self.path)
        self.manifest = read_manifest(self.path)
        _hook(self.backend, "catch_up", self.manifest)

    def _save(self) -> None:
        """Save the backend's derived files (FAISS) and then the manifest that names what they mirror (at the end of
        a `bulk_writes` block, when inside one)."""
        if self._saves_deferred:
            return
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
        ids, new_rows = ids_for_new_rows(held, labels, hashes)
        if new_rows:
            ids[new_rows] = self._commit([labels[r] for r in new_rows], [paths[r] for r in new_rows],
                                         [hashes[r] for r in new_rows], vectors[new_rows])
            self._save()
        ids = resolve_repeats(ids)
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
            for rows, chunk_labels, chunk_paths, chunk_hashes, chunk in vector_chunks(vectors, labels, paths, hashes,
                                                                                      cosine):
                out[rows] = self._commit(chunk_labels, chunk_paths, chunk_hashes, chunk,
                                         ids=None if ids is None else ids[rows])
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
        if changed:
            self._save()  # the FAISS file is unchanged, but the manifest must name the store version it mirrors
        return changed

    @_locked_write
    def calibrate(self, target_far: float | None = None, rule: str = "prototype") -> dict[str, Any]:
        """Choose the verification threshold for `rule` from the support set's own genuine / impostor pairs.

        Without `target_far` the threshold sits at the equal-error point (needs a class with two or more items);
        with it, at the lowest threshold whose false-accept rate on the impostor pairs is at most `target_far`,
        which impostor pairs alone fix: a one-shot index (one item per class) can be calibrated that way, its FRR
        then unknown (None). Kept per rule in the manifest; the result carries a "warning" when it rests on fewer
        than MIN_GENUINE_PAIRS genuine or MIN_IMPOSTOR_PAIRS impostor pairs.
        """
        calibration = calibrate_items(self.backend, rule, target_far, self.metric, self.path)
        self.manifest["calibrations"] = {**self.calibrations, rule: calibration}
        self.manifest["calibration"] = calibration  # the latest one: the rule `verify` uses when given none
        try:
            write_json_atomic(self.path / MANIFEST_FILE, self.manifest)
        except OSError as exc:
            raise StorageError(f"{self.path}: cannot save the manifest ({exc.strerror or exc})") from None
        return calibration

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
