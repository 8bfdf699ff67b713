"""IndexQueries, the reading half of SiameseDB: search, classify and verify images or vectors against an index.

A base class, as sqlite-utils' Queryable is for its tables: it asks its questions through `self.backend`,
`self.encoder` and `self.manifest`, which SiameseDB (db.py: creating, opening, writing) provides. Nothing here writes.
"""

from __future__ import annotations

import os
import warnings
import weakref
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from siamesedb.checks import as_k, as_threshold, as_vectors
from siamesedb.classes import (
    CLASSIFY_METHODS,
    ClassTable,
    calibrations_of,
    check_rule,
    read_class_table,
    threshold_for,
    with_staleness,
)
from siamesedb.data import DomainWarning, image_profile, profile_mismatch
from siamesedb.encoder import DEFAULT_ENCODER, Encoder
from siamesedb.errors import EmptyIndexError, InvalidInputError, NotCalibratedError, UnknownLabelError
from siamesedb.ingest import ImageLike, is_single, read_file_objects
from siamesedb.item_table import ItemTable
from siamesedb.layout import metric_from_manifest
from siamesedb.results import Hit, Prediction, SearchResults, Verification
from siamesedb.rules import verification_score
from siamesedb.scoring import normalize, rank_by_knn, rank_by_prototype, score_matrix


class IndexQueries:
    """Search, classify and verify over `self.backend` (see the module docstring)."""

    path: Path
    backend: Any
    encoder: Encoder
    manifest: dict[str, Any]
    _prototype_cache: ClassTable | None
    _item_table: ItemTable | None
    _item_lookups: tuple[int, int]
    _unread_results: list[weakref.ref[SearchResults]]
    _domain_checked: bool

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
        return metric_from_manifest(self.index_metric)

    def __len__(self) -> int:
        return self.backend.count()

    def labels(self) -> list[str]:
        return sorted(self.backend.label_counts())

    # ------------------------------------------------------------------ the items, read through the front door
    # cli, serve, plots and export read items only through these, never through `db.backend`.

    def label_counts(self) -> dict[str, int]:
        """{label: number of items}, labels sorted."""
        return self.backend.label_counts()

    def items(self, ids: Sequence[int] | np.ndarray) -> list[Any]:
        """Item metadata (id, label, path, sha256) in the order of `ids`; None for an id not held."""
        return self.backend.items(np.asarray(ids, dtype=np.int64).reshape(-1))

    def item(self, item_id: int) -> Any:
        """One item's metadata, or None when `item_id` is not held."""
        return self.items([item_id])[0]

    def vectors(self, label: str | None = None) -> tuple[np.ndarray, np.ndarray]:
        """(ids (n,) int64, vectors (n, D) float32) in id order, of every item or of one label's."""
        return self.backend.vectors(label=label)

    def labels_of(self, ids: Sequence[int] | np.ndarray) -> list[str | None]:
        """Labels in the order of `ids`; None for an id not held."""
        return self.backend.labels_of(np.asarray(ids, dtype=np.int64).reshape(-1))

    def iter_rows(self, columns: str = "label, vector", chunk: int = 65536) -> Iterator[tuple[np.ndarray, list[tuple]]]:
        """Every item in id order, `chunk` at a time (bounded memory): (ids, rows of the named columns)."""
        return self.backend.iter_rows(columns, chunk=chunk)

    def ids_by_label_hash(self, pairs: Sequence[tuple[str, str]]) -> dict[tuple[str, str], int]:
        """{(label, sha256): id} of the pairs the index holds already (an add that must not store a twin)."""
        return self.backend.ids_by_label_hash(list(pairs))

    def known_label_hashes(self) -> set[tuple[str, str]]:
        """(label, sha256) of every item held: what an import or a resumed build skips."""
        return self.backend.known_label_hashes()

    @property
    def search_defaults(self) -> dict[str, int]:
        """The nprobe / ef_search a search uses when it passes none (empty for exact index types)."""
        return self.backend.search_defaults

    # ------------------------------------------------------------------ reading

    def _queries(self, vectors: np.ndarray) -> np.ndarray:
        """(nq, D) float32 query vectors for the array-level calls, checked once (checks.as_vectors: shape, a real
        dtype, NaN / infinity refused) and for a cosine index scaled to unit length, so every score is a cosine in
        [-1, 1] whatever the caller passed (a zero row stays zero and scores 0). Euclidean indexes take vectors as
        they are."""
        array = as_vectors(vectors, self.dimension, "query vectors")
        if self.metric == "cosine":
            norms = np.linalg.norm(array, axis=1)
            off = np.abs(norms - 1) >= 1e-5  # the encoder's own vectors are unit already: kept bit for bit
            if off.any():
                array = array.copy()
                array[off] = normalize(array[off])
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
    ) -> list[Hit] | list[list[Hit]]:
        """Top-k most similar items for each image (highest cosine similarity first).

        `nprobe` (IVF indexes) and `ef_search` (HNSW) trade speed for recall for this call only.
        """
        single = is_single(images)
        hits = self.search_vectors(self._encode([images] if single else list(images)), k, nprobe, ef_search)
        return hits[0] if single else hits

    def search_vectors(
        self, vectors: np.ndarray, k: int = 5, nprobe: int | None = None, ef_search: int | None = None,
        fetch: bool = False,
    ) -> SearchResults:
        """Array-level search: (nq, D) vectors -> one list of Hits per query (fewer than k if the index is small).

        The result also holds the raw `scores` / `ids` arrays (FAISS's (D, I), -1 for none); labels and paths are
        read from the backend in one query when a Hit is first asked for, or before this handle next writes or
        closes, whichever comes first (an item another process removes before then is left out). `fetch=True`
        reads them now, in this thread (a server answering at once while another thread writes: nothing is left
        for that write to read on this caller's behalf).
        """
        k = as_k(k)  # an integer of at least 1; a k beyond the collection returns what there is (rows min(k, held))
        D, I = self.backend.search(self._queries(vectors), k, nprobe=nprobe, ef_search=ef_search)
        results = SearchResults(D, I, self._labels_and_paths, metric=self.metric)
        if fetch:
            return results.fetch()
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

    def follow_add(self, before: int, ids: np.ndarray, labels: Sequence[str], paths: Sequence[str],
                   vectors: np.ndarray) -> None:
        """After this handle's add of `ids` under the write lock: bring the cached class table and item table from
        version `before` to the backend's new one by the add alone (follow_rows), not a reread of every item; a
        server classifying between adds would otherwise reread the whole index after each one. Only where one add
        is one step of the version (the FAISS backend's store, whose writers all hold the index's lock)."""
        if self.manifest.get("backend", "faiss") == "faiss" and self.backend.version == before + 1:
            self.follow_rows(before, before + 1, ids, labels, paths, vectors)

    def follow_appended(self, appended: Any) -> None:
        """The tables follow the rows other processes appended, as a catch-up took them (FaissBackend.Appended)."""
        self.follow_rows(appended.start, appended.version, appended.ids, appended.labels, appended.paths,
                         appended.vectors)

    def follow_rows(self, before: int, after: int, ids: np.ndarray, labels: Sequence[str], paths: Sequence[str],
                    vectors: np.ndarray) -> None:
        """The cached tables at version `before`, moved to `after` by these appended rows alone (this handle's add,
        or other processes' appends a catch-up took: FaissBackend.Appended); a table that cannot follow
        (ClassTable / ItemTable.with_added: a new class...) is dropped, to be rebuilt when next needed."""
        classes = self._prototype_cache
        if classes is not None and classes.version == before:
            self._prototype_cache = classes.with_added(after, ids, labels, vectors) if len(ids) else None
        items = self._item_table
        if items is not None and items.version == before:
            self._item_table = items.with_added(after, ids, labels, paths) if len(ids) else None

    def _class_table(self) -> ClassTable:
        """Per-class prototypes and each item's class code (classes.read_class_table), cached per backend version."""
        version = self.backend.version
        if self._prototype_cache is not None and self._prototype_cache.version == version:
            return self._prototype_cache
        with self.backend.snapshot():  # version, labels and vectors of one committed state
            self._prototype_cache = read_class_table(self.backend, self.metric, self._items_where())
        return self._prototype_cache

    def _items_where(self) -> Path:
        """Where the items live, for error messages: the backend's items file (the FAISS backend's store), else the
        index folder."""
        return self.backend.items_file or self.path

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
    ) -> Prediction | list[Prediction]:
        """Which class is each image? `prototype`: nearest class mean; `knn`: score-weighted vote of the top k.

        Scores are on the index's scale (a cosine, or minus a Euclidean distance): `prototype`'s is the score against
        the class prototype; `knn` ranks classes by their vote and reports, for each, the mean score of its
        neighbours among the k (the best class's score is the mean similarity of its neighbours that voted).

        `classes` restricts the candidates (an N-way episode); by default every class in the index competes.
        `nprobe` / `ef_search` tune the knn search over the whole index (prototype ranking is always exact).
        `top` keeps only the best `top` classes in each ranking. Rankings are lazy: each query's best class is
        found at once, the order of the others only when a ranking is read (scoring.Ranking).
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
    ) -> list[Prediction]:
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
            rankings = rank_by_prototype(vectors, protos, names, metric=self.metric)
        elif method == "knn":
            k = as_k(k)
            if len(self) == 0:
                raise EmptyIndexError(f"{self.path}: the index holds no items")
            if classes is not None:
                self._prototypes(classes)  # raises UnknownLabelError for a class the index lacks
            # `classes` filter inside the backend (Milvus: a label expression), so k hits of those classes return.
            D, I = self.backend.search(vectors, k, classes, nprobe=nprobe, ef_search=ef_search)
            rankings = rank_by_knn(self._class_table().labels_of_hits(I), D, k, metric=self.metric, scores="mean")
        else:
            raise InvalidInputError(f"unknown method {method!r}; choose from {', '.join(CLASSIFY_METHODS)}")
        if top is not None:
            rankings = [r[: int(top)] for r in rankings]
        return [Prediction(label=r[0][0], score=r[0][1], ranking=r) for r in rankings]

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
    ) -> Verification | list[Verification]:
        """Is each image of class `label`? Scores it against the class's support set and compares with a threshold.

        The threshold: `threshold` if given; else the index's calibration for the rule (`calibrate`; its source says
        when the index changed since); else the pair threshold the encoder carries, for the rules scored on a pair
        score's scale (prototype, max, mean_top3), so a fresh index verifies out of the box; "relative" without a
        calibration of its own raises NotCalibratedError naming the `calibrate` command.
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
        """(rule, threshold, source) that `verify` uses when no threshold is passed (see `verify`,
        classes.threshold_for: a rule off the pair scale needs its own calibration; a stale one says so)."""
        return threshold_for(self.manifest, self.encoder.config.pair_threshold, rule, self.path, state=self._state,
                             encoder_rule=(self.encoder.config.pair_calibration or {}).get("rule"))

    def _state(self) -> tuple[int, int]:
        """(items held, backend version) of one committed state: what a calibration's staleness is judged by."""
        with self.backend.snapshot():
            return self.backend.count(), self.backend.version

    def verify_vector(
        self, vector: np.ndarray, label: str, threshold: float | None = None, rule: str | None = None
    ) -> Verification:
        """Array-level verify of one (D,) vector (normalised here for a cosine index)."""
        vector = self._queries(vector)[0]
        if threshold is None:
            rule, threshold, source = self.threshold_for(rule)
        else:
            rule = check_rule(rule or (self.manifest.get("calibration") or {}).get("rule", "prototype"))
            threshold, source = as_threshold(threshold), "given"
        score = verification_score(vector, self.support(label), rule=rule, metric=self.metric)
        return Verification(label=label, accepted=bool(score >= threshold), score=float(score),
                                  threshold=float(threshold), threshold_source=source)

    def info(self) -> dict[str, Any]:
        """Counts, classes, dimension, encoder and calibration of this index."""
        with self.backend.snapshot():
            counts = self.backend.label_counts()
            state = (int(sum(counts.values())), self.backend.version)
        described = self.backend.describe()
        calibrations = {rule: with_staleness(c, *state) for rule, c in self.calibrations.items()}
        return {
            "path": str(self.path),
            "items": int(sum(counts.values())),
            "classes": len(counts),
            "dimension": self.dimension,
            "metric": self.manifest.get("metric", "inner_product"),
            "backend": self.manifest.get("backend", "faiss"),
            "factory": self.manifest.get("factory", "Flat"),
            "search_defaults": self.backend.search_defaults,
            "removed_pending": described["removed_pending"],
            "backend_summary": described["summary"],  # "FAISS Flat", "Milvus HNSW": the index type, named
            "backend_location": described["location"],  # where the items live (None: in this folder)
            "encoder": {
                "fingerprint": self.encoder.fingerprint,
                "backbone": self.encoder.config.backbone,
                "name": self.manifest.get("encoder", {}).get("name", ""),
                "image_size": list(self.encoder.config.preprocessing.size),
                "parameters": self.encoder.parameters,  # its size: 4 bytes each in model.safetensors
                "source": self.encoder.config.pretrained.get("source"),  # hf: backbones: the hub id or folder
                "members": self.encoder.config.members,  # > 1: an ensemble (tools/ensemble.py)
                "whitening": self.encoder.config.whitening,
                "test_time_shift": self.encoder.config.test_time_shift,
                "pair_threshold": self.encoder.config.pair_threshold,  # verify's threshold where none is calibrated
            },
            # The latest calibration (the rule verify uses when given none) and one per rule, each with "stale"
            # (the index changed since it was made) and "items_now"; "calibration_stale": any of them is.
            "calibration": with_staleness(self.manifest.get("calibration"), *state),
            "calibrations": calibrations,
            "calibration_stale": any(c["stale"] for c in calibrations.values()),
            "format_version": self.manifest.get("format_version"),
            "largest_classes": sorted(counts.items(), key=lambda kv: (-kv[1], kv[0]))[:5],
            # What the backend adds about itself (Milvus: uri, lite, collection, index_type), under its name.
            **({described["backend"]: described["details"]} if described["details"] else {}),
        }


def verify_pair(
    image_a: ImageLike,
    image_b: ImageLike,
    encoder: str | os.PathLike | Encoder = DEFAULT_ENCODER,
    threshold: float | None = None,
    device: str = "auto",
) -> Verification:
    """Do two images show the same class? Their score (cosine, or minus the Euclidean distance for a Euclidean
    encoder) against the encoder's calibrated pair threshold."""
    enc = encoder if isinstance(encoder, Encoder) else Encoder.load(encoder, device=device)
    source = "given"
    if threshold is not None:
        threshold = as_threshold(threshold)
    else:
        threshold = enc.config.pair_threshold
        if threshold is None:
            raise NotCalibratedError("this encoder carries no pair threshold; pass one with --threshold")
        source = str(getattr(threshold, "source", "encoder"))  # e.g. "encoder (training pairs)"
    vectors = np.atleast_2d(enc.encode([image_a, image_b]))
    score = float(score_matrix(vectors[:1], vectors[1:], enc.config.metric)[0, 0])  # Euclidean: -distance
    return Verification(
        label=str(image_b), accepted=bool(score >= threshold), score=score, threshold=float(threshold),
        threshold_source=source, query=str(image_a) if isinstance(image_a, (str, os.PathLike)) else None,
    )


__all__ = ["IndexQueries", "verify_pair"]
