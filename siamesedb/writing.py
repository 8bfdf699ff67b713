"""IndexWrites, the writing half of SiameseDB: add, import, remove, reroot, reindex and calibrate, each under the lock.

A base class of SiameseDB (db.py: creating, opening, closing), over IndexQueries (reading.py: the questions). Every
public write holds the index's write lock (locking.py) and, on first taking it, catches up with what other processes
wrote; afterwards it saves the backend's derived files (FAISS) and the manifest that names what they mirror.
"""

from __future__ import annotations

import functools
import os
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np

from siamesedb.backends import resolve_factory
from siamesedb.checks import labels_for
from siamesedb.classes import calibrate_items
from siamesedb.data import scan_folder
from siamesedb.errors import (DimensionMismatchError, EncoderMismatchError, InvalidInputError, StorageError,
                              UnknownLabelError)
from siamesedb.export import export_vectors, read_export
from siamesedb.ingest import (BuildReport, ImageLike, add_images, checked_vector_batch, content_sha256, ids_for_new_rows,
                              is_single, read_file_objects, resolve_repeats, split_unindexable, stored_path, unit_rows,
                              vector_chunks)
from siamesedb.layout import MANIFEST_FILE, read_manifest, remove_temporaries, write_json_atomic
from siamesedb.locking import IndexWriteLock
from siamesedb.reading import IndexQueries

TRAINING_SAMPLE_ROWS = 131072  # rows of a bulk add an untrained index type (IVF / PQ) may train on


def with_shared(manifest: dict[str, Any], backend: Any) -> dict[str, Any]:
    """`manifest` with the fields its backend keeps for every host merged over it (VectorBackend.shared_fields:
    Milvus's calibrations; a dict field entry by entry, so a rule only this folder calibrated stays)."""
    shared = backend.shared_fields()
    if not shared:
        return manifest
    merged = dict(manifest)
    for name, value in shared.items():
        mine = merged.get(name)
        merged[name] = {**mine, **value} if isinstance(mine, dict) and name in SHARED_PER_ENTRY else value
    return merged


SHARED_PER_ENTRY = ("calibrations",)  # shared manifest fields kept one entry (one rule) per row


def _locked_write(method):
    """Run a public write under the index's write lock (see IndexWrites._writing)."""

    @functools.wraps(method)
    def locked(self, *args, **kwargs):
        with self._writing():
            return method(self, *args, **kwargs)

    return locked


class IndexWrites(IndexQueries):
    """The writes of SiameseDB over `self.backend`, `self.manifest` and `self._lock` (see the module docstring)."""

    _lock: IndexWriteLock
    _saves_deferred: bool
    _files_behind: bool
    last_report: BuildReport | None
    last_add_duplicates: int

    # ------------------------------------------------------------------ the write lock and saving

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
                started_at = self.backend.begin_write()
            yield
        except BaseException:
            if outermost:
                self.backend.end_write(started_at, True)
            raise
        else:
            if outermost:
                self.backend.end_write(started_at, False)
        finally:
            self._lock.release()

    @contextmanager
    def bulk_writes(self, save: bool = True) -> Iterator[IndexWrites]:
        """Hold the write lock across many writes (`add_vectors`, `add`, `remove`...) and save the index files and
        manifest once, when the block ends, instead of after each write: for pipelines that commit many batches
        (the Ray build). Every batch is durable in the backend when its call returns, as always; only the derived
        FAISS file waits (a crash meanwhile leaves it stale, and the next open rebuilds it from the store).

        `save=False` leaves even that save to a later `save_files()` (or `close()`): a server committing small
        groups of adds saves the files once writes pause, not after every group (the FAISS file is a full copy of
        the index: rewriting it per add costs O(items) each time)."""
        with self._writing():
            outermost = not self._saves_deferred
            self._saves_deferred = True
            try:
                yield self
            finally:
                if outermost:
                    self._saves_deferred = False
                    if save:
                        self._save()
                    else:
                        self._files_behind = True

    def save_files(self) -> bool:
        """Save the index files and manifest that a `bulk_writes(save=False)` left behind, under the write lock
        (a writer in another process may have moved the index on meanwhile: the save then mirrors that). Whether
        anything was saved."""
        if not self._files_behind:
            return False
        with self._writing():
            if self._files_behind:
                self._save()
        return True

    def _catch_up(self) -> None:
        """Under the write lock: drop leftovers of crashed writers, re-read the manifest, let the backend catch up."""
        remove_temporaries(self.path)
        self.manifest = with_shared(read_manifest(self.path), self.backend)
        appended = self.backend.catch_up(self.manifest)
        if appended is not None:  # only rows appended by other processes: the tables take them alone
            self.follow_appended(appended)

    def _save(self) -> None:
        """Save the backend's derived files (FAISS) and then the manifest that names what they mirror (at the end of
        a `bulk_writes` block, when inside one)."""
        if self._saves_deferred:
            return
        try:
            self.manifest.update(self.backend.save())
            write_json_atomic(self.path / MANIFEST_FILE, self.manifest)
            self._files_behind = False
        except OSError as exc:  # disk full, read-only folder, a folder where the file should be...
            raise StorageError(
                f"{self.path}: cannot save the index files ({exc.strerror or exc}); the item store is intact and "
                "the FAISS file is rebuilt from it on the next open"
            ) from None

    def _read_pending_results(self) -> None:
        """Read the labels and paths of search results not read yet (before a write or close changes the items)."""
        for ref in self._unread_results:
            results = ref()
            if results is not None:
                results.fetch()
        self._unread_results.clear()

    # ------------------------------------------------------------------ adding

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
        """The one write path of new items: the backend stores them (allocating ids unless given); the in-memory
        class and item tables follow the add instead of being reread (IndexQueries.follow_add)."""
        before = self.backend.version
        new_ids = self.backend.add(ids, labels, paths, hashes, vectors)
        self.follow_add(before, new_ids, labels, paths, vectors)
        return new_ids

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
        labels = labels_for(label, len(batch))  # the one label rule (checks.label_problem)
        if not batch:
            return np.empty(0, dtype=np.int64)
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
            sample = vectors[:TRAINING_SAMPLE_ROWS]
            self.backend.bulk_sample(unit_rows(sample) if cosine else np.asarray(sample, np.float32))
        try:
            for rows, chunk_labels, chunk_paths, chunk_hashes, chunk in vector_chunks(vectors, labels, paths, hashes,
                                                                                      cosine):
                out[rows] = self._commit(chunk_labels, chunk_paths, chunk_hashes, chunk,
                                         ids=None if ids is None else ids[rows])
        finally:
            if n:
                self._save()
        return out

    # ------------------------------------------------------------------ exports

    def export_vectors(self, to: str | os.PathLike) -> dict[str, Any]:
        """Write ids, labels, paths, content hashes and vectors to FILE.parquet or FILE.npy (+ FILE.json)."""
        return export_vectors(self, to)

    @_locked_write
    def import_vectors(self, path: str | os.PathLike, force: bool = False, renumber: bool = False) -> dict[str, Any]:
        """Add the items of an export (see `export_vectors`). Returns {"file", "items", "added", "already_indexed",
        "encoder", "forced", "renumbered"}.

        Refuses another encoder's vectors (EncoderMismatchError) unless `force`, and another dimension or metric
        always. Items the index holds already (same label and content hash) are skipped, so importing twice adds
        nothing. The file's ids are kept unless `renumber`; an id another item uses is refused before anything is
        written.
        """
        exported = read_export(path)
        meta = exported.metadata
        if int(meta["dimension"]) != self.dimension:
            raise DimensionMismatchError(f"{path}: holds {meta['dimension']}-d vectors, the index {self.dimension}-d")
        their_metric = meta.get("metric", "inner_product")
        if their_metric != self.index_metric:  # not even --force: the numbers mean different things
            raise EncoderMismatchError(f"{path}: holds {their_metric} vectors, the index {self.path} is "
                                       f"{self.index_metric}")
        theirs = meta["encoder"].get("fingerprint")
        if theirs != self.encoder.fingerprint and not force:
            raise EncoderMismatchError(
                f"{path}: vectors were made by encoder {theirs}, the index uses {self.encoder.fingerprint} "
                "(they are not comparable; pass --force to import anyway)"
            )
        held = self.known_label_hashes()
        keep = np.fromiter(
            ((label, digest) not in held for label, digest in zip(exported.labels, exported.hashes)),
            dtype=bool, count=len(exported),
        )
        rows = np.flatnonzero(keep)
        whole = len(rows) == len(exported)
        pick = (lambda column: column) if whole else (lambda column: [column[i] for i in rows])
        ids = None if renumber else exported.ids[rows]
        if ids is not None and len(ids):
            taken = [item.id for item in self.items(ids) if item is not None]
            if taken:
                raise InvalidInputError(
                    f"{path}: id {taken[0]} is already used by another item of {self.path} (pass --renumber for new "
                    "ids)"
                )
        new_ids = self.add_vectors(exported.vectors if whole else exported.vectors[rows], pick(exported.labels),
                                   paths=pick(exported.paths), hashes=pick(exported.hashes), ids=ids)
        return {
            "file": str(path),
            "items": len(exported),
            "added": int(len(new_ids)),
            "already_indexed": int(len(exported) - len(rows)),
            "encoder": theirs,
            "forced": bool(theirs != self.encoder.fingerprint),
            "renumbered": bool(renumber),
        }

    # ------------------------------------------------------------------ removing and changing

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
        if not self.backend.reindexable:
            raise InvalidInputError(f"{self.path}: a {self.manifest.get('backend')} index keeps its index type; "
                                    "build a new index to change it")
        requested = factory or self.manifest.get("factory", "Flat")
        previous = self.manifest.get("factory", "Flat")
        chosen, search_defaults = resolve_factory(self.manifest.get("backend", "faiss"), requested, self.dimension,
                                                  len(self), memory_budget)
        self.backend.reindex(self.manifest, chosen)  # validates the factory before anything changes
        if search_defaults and chosen != previous:  # "auto"'s choice; the same type keeps its search defaults
            self.backend.set_search_defaults(**search_defaults)
        self.manifest["factory"] = chosen
        self.manifest["factory_requested"] = requested
        self._save()
        return chosen

    @_locked_write
    def reroot(self, old: str | os.PathLike, new: str | os.PathLike) -> int:
        """The images moved from folder `old` to `new`: rewrite the stored paths that start with `old` (whole path
        components). Vectors, ids and labels are untouched. Returns how many paths changed; InvalidInputError when
        no stored path starts with `old` (a mistyped folder would otherwise pass unnoticed)."""
        old_text, new_text = str(old), str(new)
        if not old_text or not new_text:
            raise InvalidInputError("reroot needs both the old and the new folder")
        changed = self.backend.reroot_paths(old_text, new_text)
        if changed == 0 and not Path(old_text).is_absolute():
            # Stored paths are absolute (resolved at build/add): try the absolute form of a relative OLD too.
            changed = self.backend.reroot_paths(str(Path(old_text).resolve()), str(Path(new_text).resolve()))
        if not changed:
            # A typo in OLD must not pass as "0 of N rewritten": say what the stored paths look like.
            example = next((rows[0][0] for _, rows in self.backend.iter_rows("path", chunk=1) if rows), None)
            raise InvalidInputError(f"no stored path starts with {old_text} ({len(self)} items"
                                    + (f"; e.g. {example})" if example is not None else ")"))
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
        # Every host reaching the backend sees it (Milvus: the collection's side collection; FAISS: a no-op).
        self.backend.publish({"calibrations": {rule: calibration}, "calibration": calibration},
                             per_entry=SHARED_PER_ENTRY)
        self.manifest["calibrations"] = {**self.calibrations, rule: calibration}
        self.manifest["calibration"] = calibration  # the latest one: the rule `verify` uses when given none
        try:
            write_json_atomic(self.path / MANIFEST_FILE, self.manifest)
        except OSError as exc:
            raise StorageError(f"{self.path}: cannot save the manifest ({exc.strerror or exc})") from None
        return calibration


__all__ = ["IndexWrites", "SHARED_PER_ENTRY", "TRAINING_SAMPLE_ROWS", "with_shared"]
