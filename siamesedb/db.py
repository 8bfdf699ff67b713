"""SiameseDB, the front door: create, build, open, import into, refresh and close an index.

An index is a folder (layout.py; DESIGN.md "On disk"): a manifest, the encoder that made the vectors, and the items
in a backend (backends/: the embedded FAISS + SQLite one, or Milvus), made and opened through the backends'
registry. SiameseDB checks inputs, encodes images and asks the questions; the backend stores items and finds nearest
neighbours; classes.py derives the classes. The questions live in reading.py (IndexQueries), the writes, each under
the index's write lock, in writing.py (IndexWrites); SiameseDB inherits both.

Caches (class prototypes, the in-memory item table) are keyed on the backend's version, which every committed write
moves, so no write has to remember to drop them.
"""

from __future__ import annotations

import os
import shutil
import weakref
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from siamesedb.backends import create_backend, open_backend, resolve_factory
from siamesedb.classes import CLASSIFY_METHODS, MIN_GENUINE_PAIRS, MIN_IMPOSTOR_PAIRS, ClassTable
from siamesedb.data import scan_folder
from siamesedb.encoder import DEFAULT_ENCODER, Encoder
from siamesedb.errors import EncoderMismatchError, FolderError, IndexExistsError, IndexNotFoundError, StorageError
from siamesedb.export import read_metadata
from siamesedb.ingest import BuildReport, split_unindexable
from siamesedb.item_table import ItemTable
from siamesedb.layout import (DEFAULT_HOME, ENCODER_DIR, FORMAT_VERSION, MANIFEST_FILE, manifest_metric, new_manifest,
                              read_checked, read_manifest, remove_temporaries)
from siamesedb.locking import LOCK_FILE, OWNER_FILE, IndexWriteLock
from siamesedb.reading import verify_pair
from siamesedb.results import SearchResults
from siamesedb.writing import IndexWrites, with_shared

__all__ = ["SiameseDB", "BuildReport", "verify_pair", "CLASSIFY_METHODS", "DEFAULT_HOME", "MANIFEST_FILE",  # noqa: F822
           "STORE_FILE", "VECTORS_FILE", "ENCODER_DIR", "FORMAT_VERSION", "MIN_GENUINE_PAIRS", "MIN_IMPOSTOR_PAIRS"]


def __getattr__(name: str) -> str:
    """STORE_FILE / VECTORS_FILE, the embedded backend's file names, importable from here as before; read from
    siamesedb.backends.faiss on first use, so that opening a Milvus index never imports FAISS for them."""
    if name in ("STORE_FILE", "VECTORS_FILE"):
        from siamesedb.backends import faiss

        return getattr(faiss, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def _loaded(encoder: str | os.PathLike | Encoder, device: str) -> Encoder:
    """`encoder` itself, or the encoder it names loaded onto `device`."""
    return encoder if isinstance(encoder, Encoder) else Encoder.load(encoder, device=device)


def _refuse_existing(path: Path) -> None:
    """IndexExistsError when `path` holds an index already, or is something other than a folder."""
    if (path / MANIFEST_FILE).exists():
        raise IndexExistsError(f"{path}: an index already exists here (remove it first, or use `add`)")
    _refuse_non_folder(path)


def _refuse_non_folder(path: Path) -> None:
    """IndexExistsError when `path` is not a folder, or is a folder without a manifest holding files that are not an
    index's (the user's own): nothing is written beside them. An empty folder, or one holding only what a creation
    cut short left (README "Reliability"), is fine."""
    if path.exists() and not path.is_dir():
        raise IndexExistsError(f"{path}: exists and is not a folder")
    foreign = _foreign_entries(path)
    if foreign and not (path / MANIFEST_FILE).exists():
        shown = ", ".join(repr(name) for name in foreign[:3]) + (f" and {len(foreign) - 3} more" if len(foreign) > 3 else "")
        raise IndexExistsError(f"{path}: exists, is not an index and holds other files ({shown}); give a new or "
                               "empty folder")


# What an index folder may hold before its manifest exists (a creation cut short): the manifest and encoder, the
# write lock, the embedded backend's store and FAISS file, a Milvus Lite file (with their -wal / .suffix companions),
# temporary files, hidden entries. Anything else is someone's own file.
_OWN_EXACT = (MANIFEST_FILE, ENCODER_DIR)
_OWN_STEMS = (LOCK_FILE, "items.sqlite", "vectors.faiss", "milvus.db")


def _own_entry(name: str) -> bool:
    return (name in _OWN_EXACT or name.startswith(".") or name.endswith(".tmp")
            or any(name == stem or name.startswith((stem + ".", stem + "-")) for stem in _OWN_STEMS))


def _foreign_entries(path: Path) -> list[str]:
    try:
        return sorted(name for name in os.listdir(path) if not _own_entry(name))
    except (FileNotFoundError, NotADirectoryError):
        return []


def _nothing_readable(folder: Path, skipped: list[tuple[str, str]], index: Path, created: bool) -> FolderError:
    """The FolderError of a build that could read none of its folder's images (each reason kept in `.skipped`)."""
    first, reason = skipped[0]
    outcome = "no index was made" if created else f"the index {index} is unchanged"
    error = FolderError(f"{folder}: none of its {len(skipped)} images could be read (e.g. {first}: {reason}); {outcome}")
    error.skipped = skipped
    return error


def _discard_created(db: SiameseDB, before: set[str] | None) -> None:
    """Under the write lock: undo a creation that stored nothing. The manifest goes first (the folder is then a
    creation cut short, never an empty index), then whatever the creation wrote, the lock files last (by the caller,
    `_remove_lock_files`, once the lock is released)."""
    db.backend.close()
    (db.path / MANIFEST_FILE).unlink(missing_ok=True)
    for name in os.listdir(db.path):
        if name in (before or set()) or name in (LOCK_FILE, OWNER_FILE):
            continue
        entry = db.path / name
        if entry.is_dir() and not entry.is_symlink():
            shutil.rmtree(entry, ignore_errors=True)
        else:
            entry.unlink(missing_ok=True)


def _remove_lock_files(path: Path, before: set[str] | None) -> None:
    """After `_discard_created`: drop the lock files this build made, and the folder when it made that too, unless
    another writer has started there meanwhile."""
    lock = IndexWriteLock(path, timeout=0)
    if not lock.try_acquire():
        return
    try:
        if set(os.listdir(path)) - (before or set()) - {LOCK_FILE, OWNER_FILE}:
            return  # another build is at work here now
        for name in (OWNER_FILE, LOCK_FILE):
            if name not in (before or set()):
                (path / name).unlink(missing_ok=True)
    finally:
        lock.release()
    if before is None:
        try:
            path.rmdir()
        except OSError:
            pass


class SiameseDB(IndexWrites):
    """An index of labelled image embeddings on disk. Create it with `build`/`create`, reopen it with `open`.

    Creating, opening and closing live here; the writes in its base IndexWrites, the questions (search, classify,
    verify) in IndexQueries under that."""

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
        self._unread_results: list[weakref.ref[SearchResults]] = []
        self._domain_checked = False  # check_domain warns once per handle
        self._saves_deferred = False  # inside bulk_writes: the index files are saved once, when it ends
        self._files_behind = False  # a bulk_writes(save=False) left the index files for save_files()
        self._refreshed_to: tuple[int, dict[str, Any]] | None = None  # what refresh() last caught up to

    def __repr__(self) -> str:
        state = "closed" if self.backend.closed else f"{len(self)} items, {len(self.label_counts())} classes"
        return f"SiameseDB({str(self.path)!r}, {state}, encoder {self.encoder.fingerprint})"

    # ------------------------------------------------------------------ the embedded backend's parts

    @property
    def store(self) -> Any:
        """The embedded backend's item store (items.sqlite); for another backend, the backend itself, which answers
        the same reads (items, vectors, label_counts, iter_rows, version...)."""
        return self.backend.store

    @property
    def index(self) -> Any:
        """The embedded backend's FAISS index (a VectorIndex; None for another backend)."""
        return self.backend.index

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
        backend_options: Mapping[str, Any] | None = None,
        _lock: IndexWriteLock | None = None,
        _encoder_name: str | None = None,
        _resolved: tuple[str, dict[str, int]] | None = None,
    ) -> SiameseDB:
        """Make a new, empty index folder at `path` carrying a copy of `encoder`.

        factory="auto" picks the index type for `expected_items` vectors within `memory_budget` bytes (the
        backend's policy; README "Index types"); the manifest records the type chosen. `backend` names a backend
        of the registry (siamesedb.backends): "faiss" (embedded), or "milvus" (README "Scaling out").
        `backend_options` is handed to it as one mapping (`uri`: a Milvus server, http://..., else a Milvus Lite
        file inside the folder); `device` and `search_backend` travel in it too. `milvus_uri=URI` is the older
        spelling of backend_options={"uri": URI}.
        The manifest is written last: a folder without one is an index whose creation was cut short, and creating
        it again starts over (as long as it holds no items).
        """
        path = Path(path)
        _refuse_existing(path)
        enc = _loaded(encoder, device)
        options = {"device": device, "search_backend": search_backend, **(backend_options or {})}
        if milvus_uri is not None:
            options["uri"] = milvus_uri
        # The index type `build` resolved (and so checked) already, else resolved here, before anything is written:
        # an unknown backend or a type it cannot build is refused.
        chosen, search_defaults = _resolved or resolve_factory(backend, factory, enc.dimension, expected_items or 0,
                                                               memory_budget)
        path.mkdir(parents=True, exist_ok=True)
        lock = _lock or IndexWriteLock(path, timeout=lock_timeout)
        with lock:
            _refuse_existing(path)  # another process may have finished creating it while we waited for the lock
            remove_temporaries(path)
            name = _encoder_name if _encoder_name is not None else "" if isinstance(encoder, Encoder) else str(encoder)
            encoder_fields = {"fingerprint": enc.fingerprint, "backbone": enc.config.backbone,
                              "name": enc.config.name or name}
            made, fields = create_backend(backend, path, enc.dimension, enc.config.metric, chosen, search_defaults,
                                          options)
            enc.save(path / ENCODER_DIR)
            manifest = new_manifest(enc.dimension, manifest_metric(enc.config.metric), chosen, factory,
                                    encoder_fields, backend, **fields)
            db = cls(path, made, enc, manifest, lock)
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
        backend_options: Mapping[str, Any] | None = None,
    ) -> SiameseDB:
        """Index every image of a labelled folder (label = parent folder relative to the root).

        Re-running a build into an existing index adds only the files it does not hold yet (same label and content
        hash), so an interrupted build resumes where it stopped. Unreadable files are skipped and reported in
        `db.last_report`, never fatal. The whole build holds the index's write lock (a second writer waits up to
        `lock_timeout` seconds, default $SIAMESEDB_LOCK_TIMEOUT or 60). `backend`, `backend_options` and
        `milvus_uri` as in `create` (an existing index keeps the backend its manifest names). The encoder is loaded
        once, and checked (with the factory) before the index folder and its lock file are made.
        """
        folder = Path(folder)
        images = scan_folder(folder)  # FolderError for a missing / empty folder, before anything is created
        images, unstorable = split_unindexable(images)
        path = Path(path) if path is not None else DEFAULT_HOME / folder.resolve().name
        if not images:  # every file is a loop, a FIFO, a name the store cannot hold...: as an empty folder, an error
            raise _nothing_readable(folder, unstorable, path, not (path / MANIFEST_FILE).exists())
        loaded = resolved = None
        before: set[str] | None = None  # what the folder held before this build (None: it did not exist)
        if not (path / MANIFEST_FILE).exists():
            loaded = _loaded(encoder, device)
            resolved = resolve_factory(backend, factory, loaded.dimension, len(images))  # checks it
            # Not _refuse_existing: another build may create the index meanwhile; the lock below settles who did.
            _refuse_non_folder(path)
            before = set(os.listdir(path)) if path.is_dir() else None
            path.mkdir(parents=True, exist_ok=True)
        lock = IndexWriteLock(path, timeout=lock_timeout)
        try:
            return cls._build_locked(folder, path, images, unstorable, lock, loaded, resolved, before, encoder,
                                     factory, device, batch_size, workers, progress, lock_timeout, backend,
                                     milvus_uri, backend_options)
        except FolderError as exc:
            if getattr(exc, "discarded", False):  # the creation was undone: its lock files (and folder) go too
                _remove_lock_files(path, before)
            raise

    @classmethod
    def _build_locked(cls, folder: Path, path: Path, images: list, unstorable: list[tuple[str, str]],
                      lock: IndexWriteLock, loaded: Encoder | None, resolved: Any, before: set[str] | None,
                      encoder: Any, factory: str, device: str, batch_size: int, workers: int | None, progress: bool,
                      lock_timeout: float | None, backend: str, milvus_uri: str | None,
                      backend_options: Mapping[str, Any] | None) -> SiameseDB:
        """`build` from the write lock on: create or resume, add, and undo a creation that could store nothing."""
        with lock:  # taken before deciding create-or-resume, so two builds of one new index cannot both create it
            created = False
            if (path / MANIFEST_FILE).exists():
                db = cls.open(path, device=device, lock_timeout=lock_timeout, _lock=lock)
                if not isinstance(encoder, Encoder) and encoder != DEFAULT_ENCODER:
                    other = loaded or Encoder.load(encoder, device=device)
                    if other.fingerprint != db.encoder.fingerprint:
                        raise EncoderMismatchError(
                            f"{path}: index was built with encoder {db.encoder.fingerprint}, not {other.fingerprint}"
                        )
            else:
                loaded = loaded or _loaded(encoder, device)
                name = None if isinstance(encoder, Encoder) else str(encoder)
                db = cls.create(path, encoder=loaded, factory=factory, device=device, expected_items=len(images),
                                backend=backend, backend_options=backend_options, milvus_uri=milvus_uri, _lock=lock,
                                _encoder_name=name, _resolved=resolved)
                created = True
            remove_temporaries(path)
            db.check_domain([image.path for image in images])
            report = db._add_images(images, batch_size=batch_size, workers=workers, progress=progress)
            report.scanned += len(unstorable)
            report.skipped[:0] = unstorable
            if report.added == 0 and report.already_indexed == 0:  # not one image could be read
                error = _nothing_readable(folder, report.skipped, path, created)
                if created:
                    _discard_created(db, before)
                else:
                    db.close()
                error.discarded = created
                raise error
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
        opened = open_backend(path, manifest, encoder.config.metric,
                              {"device": device, "search_backend": search_backend})
        try:
            manifest = with_shared(manifest, opened)  # what every host shares (Milvus: calibrations) over the folder's
        except BaseException:
            opened.close()
            raise
        db = cls(path, opened, encoder, manifest, lock)
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

    @classmethod
    def import_into(cls, index: str | os.PathLike, path: str | os.PathLike, encoder: str | os.PathLike = DEFAULT_ENCODER,
                    force: bool = False, renumber: bool = False, **create: Any) -> tuple[SiameseDB, dict[str, Any]]:
        """Import an export (FILE.parquet or FILE.npy + FILE.json) into the index at `index`, creating it (with
        `encoder`, and `create`'s options such as backend="milvus") when it does not exist yet. Returns (the
        SiameseDB, `import_vectors`' result).

        A new index is refused before anything is created when the file's vectors come from another encoder (unless
        `force`): an index made just to hold them would be useless."""
        index = Path(index)
        if (index / MANIFEST_FILE).exists():
            db = cls.open(index)
        else:
            enc = Encoder.load(encoder)
            theirs = read_metadata(path)["encoder"].get("fingerprint")
            if theirs != enc.fingerprint and not force:
                raise EncoderMismatchError(f"{path}: vectors were made by encoder {theirs}, not {encoder!r} "
                                           f"({enc.fingerprint}); pass the right --encoder, or --force")
            db = cls.create(index, encoder=enc, **create)
        return db, db.import_vectors(path, force=force, renumber=renumber)

    # ------------------------------------------------------------------ the handle's life

    def close(self) -> None:
        if not self.backend.closed:
            self._read_pending_results()
            if self._files_behind:
                self.save_files()
        self.backend.close()

    def __enter__(self) -> SiameseDB:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def refresh(self) -> bool:
        """Catch up with writes another process made to this index (a server's view of it). Returns whether it did.

        Reads only: the manifest is re-read (with what the backend shares between hosts merged over it: another
        host's calibration), and the backend catches up (the embedded one reloads its FAISS file
        when that mirrors the store's current version, else rebuilds it in memory; never written here, so a reader
        can never race the writer for the files). Caches follow the backend's version by themselves.
        """
        manifest = with_shared(read_manifest(self.path), self.backend)  # and what other hosts published
        version = self.backend.version
        if manifest == self.manifest and self.manifest.get("vectors_store_version", version) == version:
            return False  # nothing changed (this object's own writes keep the two in step)
        if self._refreshed_to == (version, manifest):
            return False  # caught up already; the writer has not finished its FAISS file and manifest yet
        self._refreshed_to = (version, manifest)
        self.manifest = manifest
        appended = self.backend.refresh(manifest)
        if appended is not None:  # only rows appended by other processes: the tables take them alone
            self.follow_appended(appended)
        return True
