"""The classes of an index at one version: one snapshot (ids, codes, names, prototypes), and their verification
thresholds (calibrations, per rule).

Everything here is derived from a backend's items at one version (SiameseDB caches a ClassTable per backend version)
or from the manifest (calibrations); nothing here writes. Ranking goes through `scoring` (numpy), rules through the
registry of `rules`.
"""

from __future__ import annotations

import bisect
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from siamesedb.checks import as_target_far
from siamesedb.errors import CorruptIndexError, EmptyIndexError, InvalidInputError, NotCalibratedError, UnknownLabelError
from siamesedb.item_table import appends_after
from siamesedb.rules import DEFAULT_RULE, check_rule, genuine_impostor_scores, get_rule
from siamesedb.scoring import brute_force_search, eer_threshold, far_threshold

__all__ = ["CLASSIFY_METHODS", "ClassTable", "calibrate_items", "calibration_record", "calibrations_of", "check_rule",
           "default_rule", "is_stale", "read_class_table", "threshold_for", "with_staleness"]

CLASSIFY_METHODS = ("prototype", "knn")
# Fewer pairs than these and a calibration says how thin it is: with 2 genuine pairs an "equal-error" threshold is
# whatever the two scores happen to be (issue 16 saw 1.0000 from two copies of one file).
MIN_GENUINE_PAIRS = 20
MIN_IMPOSTOR_PAIRS = 100
_ROWS = 16384  # rows read at a time while summing prototypes
# A table this small keeps its float64 class sums, so that an add can update it instead of rereading every item:
# each add copies the (C, D) arrays (readers share the old ones), which beyond this costs more than it saves.
FOLLOW_MAX_CELLS = 1 << 20  # classes x dimension
FOLLOW_MAX_ITEMS = 1 << 21


@dataclass
class ClassTable:
    """Classes of an index at one backend version: sorted names, (C, D) prototypes, and each item's class code."""

    version: int
    names: list[str]
    prototypes: np.ndarray  # (C, D) float32 class means (L2-normalised for a cosine index), row c = names[c]
    ids: np.ndarray  # (N,) int64, ascending
    codes: np.ndarray  # (N,) int32, codes[i] = class of item ids[i]
    metric: str = "cosine"  # the scoring metric of the prototypes ("cosine" / "euclidean")
    sums: np.ndarray | None = None  # (C, D) float64 sums of the class members' vectors, kept by small tables
    counts: np.ndarray | None = None  # (C,) int64 members per class, with `sums`

    def with_added(self, version: int, ids: np.ndarray, labels: Sequence[str], vectors: np.ndarray) -> ClassTable | None:
        """The table after one add of (n,) new `ids` with their labels and (n, D) vectors (as stored: unit length
        for a cosine index), at the backend's new `version`; None where only a fresh read can say (no sums kept, a
        new class, ids not after the held ones): the caller then rebuilds it from the backend.

        Copy on write: rankings being read share this table's arrays, so the new table has its own."""
        ids = np.asarray(ids, dtype=np.int64)
        if self.sums is None or self.counts is None or not len(ids):
            return None
        codes = np.empty(len(labels), dtype=np.int32)
        for n, label in enumerate(labels):
            r = bisect.bisect_left(self.names, label)
            if r == len(self.names) or self.names[r] != label:
                return None  # a new class moves every later code
            codes[n] = r
        if not appends_after(self.ids, ids):
            return None  # the id column must stay ascending
        sums, counts = self.sums.copy(), self.counts.copy()
        np.add.at(sums, codes, np.asarray(vectors, dtype=np.float64))
        np.add.at(counts, codes, 1)
        touched = np.unique(codes)
        prototypes = self.prototypes.copy()
        prototypes[touched] = _prototypes_of(sums[touched], counts[touched], self.metric)
        prototypes.setflags(write=False)
        return ClassTable(version=version, names=self.names, prototypes=prototypes,
                          ids=np.concatenate([self.ids, ids]), codes=np.concatenate([self.codes, codes]),
                          metric=self.metric, sums=sums, counts=counts)

    def labels_of_hits(self, I: np.ndarray) -> list[list[str | None]]:
        """Labels of a search's (nq, k) hit ids through the sorted id column: no store query, no per-item objects.
        None for -1 padding and for ids this table does not hold."""
        if not len(self.ids):
            return [[None] * I.shape[1] for _ in range(len(I))]
        where = np.clip(np.searchsorted(self.ids, I), 0, len(self.ids) - 1)
        known = (I >= 0) & (self.ids[where] == I)
        codes = np.where(known, self.codes[where], -1)
        return [[self.names[c] if c >= 0 else None for c in row] for row in codes.tolist()]

    def select(self, classes: Sequence[str] | None, where: object) -> tuple[list[str], np.ndarray]:
        """(names, (C', D) prototypes) of `classes` in the order given, or of every class; UnknownLabelError names
        the first class the index lacks."""
        if classes is None:
            return self.names, self.prototypes
        rows = []
        for c in classes:
            r = bisect.bisect_left(self.names, c)
            if r == len(self.names) or self.names[r] != c:
                raise UnknownLabelError(f"{where}: no class {c!r}")
            rows.append(r)
        return [self.names[r] for r in rows], self.prototypes[rows]

    def rank_top(self, vectors: np.ndarray, top: int, index_metric: str | None = None) -> list[list[tuple[str, float]]]:
        """The `top` nearest prototypes of each (nq, D) query: an exact search over the (C, D) prototypes in query
        blocks (`scoring.brute_force_search`), never the whole (queries, classes) score matrix. Ties: class order.
        `index_metric` is the caller's old third argument; the table's own `metric` scores."""
        D, I = brute_force_search(vectors, self.prototypes, min(top, len(self.names)), metric=self.metric)
        return [[(self.names[c], s) for c, s in zip(row_i, row_d)] for row_i, row_d in zip(I.tolist(), D.tolist())]


def read_class_table(backend: Any, metric: str, where: object) -> ClassTable:
    """Per-class prototypes and each item's class code, computed in one streamed pass over the backend's items.

    Call inside `backend.snapshot()` (labels and vectors of one committed state). Bounded memory at any size:
    vectors are read 16k rows at a time and summed per class code (grouped, then added into a (C, D) float64
    array); no per-item Python objects are kept.
    """
    version = backend.version
    dim = backend.dimension
    names = sorted(backend.label_counts())  # one GROUP BY: the (C, D) sums are allocated once, exactly
    if not names:
        raise EmptyIndexError(f"{where}: the index holds no items")
    code_of = {name: code for code, name in enumerate(names)}
    sums = np.zeros((len(names), dim), dtype=np.float64)
    id_chunks, code_chunks = [], []
    for ids, rows in backend.iter_rows("label, vector", chunk=_ROWS):
        try:
            codes = np.fromiter((code_of[r[0]] for r in rows), dtype=np.int32, count=len(rows))
        except KeyError:  # a label appeared between the two reads: another process wrote meanwhile
            raise CorruptIndexError(f"{where}: changed while being read; try again") from None
        blob = b"".join(r[1] for r in rows)
        del rows
        if len(blob) != len(codes) * dim * 4:
            raise CorruptIndexError(f"{where}: a stored vector does not hold {dim} float32 values")
        vectors = np.frombuffer(blob, dtype="<f4").reshape(len(codes), dim)
        # Per-class sums of this chunk: rows grouped by code, then one reduceat in float64 (a (rows, D) float32
        # gather and a (classes in chunk, D) float64 result; np.add.at would cast every row to float64 and is slow).
        order = np.argsort(codes, kind="stable")
        present, starts = np.unique(codes[order], return_index=True)
        sums[present] += np.add.reduceat(vectors[order], starts, axis=0, dtype=np.float64)
        del blob, vectors, order
        id_chunks.append(ids)
        code_chunks.append(codes)
    all_codes = np.concatenate(code_chunks)
    counts = np.bincount(all_codes, minlength=len(names)).astype(np.int64)
    follow = sums.size <= FOLLOW_MAX_CELLS and len(all_codes) <= FOLLOW_MAX_ITEMS
    prototypes = _prototypes_of(sums, counts, metric, in_place=not follow)
    prototypes.setflags(write=False)  # shared, not copied, by every lazy scoring.Ranking read from it
    return ClassTable(
        version=version,
        names=names,
        prototypes=prototypes,
        ids=np.concatenate(id_chunks),
        codes=all_codes,
        metric=metric,
        sums=sums if follow else None,
        counts=counts if follow else None,
    )


def _prototypes_of(sums: np.ndarray, counts: np.ndarray, metric: str, in_place: bool = False) -> np.ndarray:
    """(C, D) float32 prototypes from float64 class sums: unit length for cosine, the mean for Euclidean.
    `in_place` divides `sums` itself (a large table keeps no second (C, D) float64 array). Row norms by einsum:
    np.linalg.norm(axis=1) would square into a second (C, D) float64 array first."""
    out = sums if in_place else sums.copy()
    if metric == "cosine":
        out /= np.maximum(np.sqrt(np.einsum("ij,ij->i", out, out)), 1e-12)[:, None]
    else:
        out /= counts[:, None]
    return out.astype(np.float32)


# ---------------------------------------------------------------------------------------- verification thresholds


def default_rule(manifest: dict[str, Any]) -> str:
    """The rule `verify` uses when given none: the rule calibrated last, else rules.DEFAULT_RULE."""
    return (manifest.get("calibration") or {}).get("rule", DEFAULT_RULE)


def calibrations_of(manifest: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """The verification thresholds a manifest holds, one per rule (manifest "calibrations"; an index calibrated
    before there was one per rule holds its single one under "calibration")."""
    found = dict(manifest.get("calibrations") or {})
    legacy = manifest.get("calibration")
    if legacy and legacy.get("rule") not in found:
        found[legacy["rule"]] = legacy
    return found


def is_stale(calibration: dict[str, Any], items_now: int, version_now: int | None) -> bool:
    """Whether the index changed since `calibration` was made: its backend version moved (any add, remove or
    reroot), or, for a calibration made before versions were recorded, its item count differs."""
    if calibration.get("store_version") is not None and version_now is not None:
        return int(calibration["store_version"]) != int(version_now)
    return calibration.get("items") is not None and int(calibration["items"]) != int(items_now)


def with_staleness(calibration: dict[str, Any] | None, items_now: int, version_now: int | None) -> dict[str, Any] | None:
    """A copy of `calibration` with "stale" (is_stale) and "items_now" (the items held now), for `info`."""
    if not calibration:
        return calibration
    return {**calibration, "stale": is_stale(calibration, items_now, version_now), "items_now": int(items_now)}


def threshold_for(manifest: dict[str, Any], encoder_threshold: float | None, rule: str | None,
                  where: object, state: Callable[[], tuple[int, int | None]] | None = None,
                  encoder_rule: str | None = None) -> tuple[str, float, str]:
    """(rule, threshold, source) that `verify` uses when no threshold is passed; `rule` None means
    `default_rule(manifest)`. The source always names where the threshold came from:

    - the index's calibration for the rule: `index:<rule>:<genuine>/<impostor> pairs`, with `, stale (<n> items
      then, <m> now)` appended when the index changed since (`state()` gives (items held, backend version) now);
    - else the encoder's pair threshold, `encoder`, for a rule whose score is on a pair score's scale
      (rules.VerifyRule.pair_scale) or the rule the encoder's threshold was measured for (`encoder_rule`);
    - else NotCalibratedError naming the rule and the command that calibrates it: a threshold on another rule's
      scale ("relative" divides by the references' consistency) would accept or refuse for no reason.
    """
    calibrations = calibrations_of(manifest)
    if rule is None:
        rule = default_rule(manifest)
    check_rule(rule)
    calibration = calibrations.get(rule)
    if calibration:
        source = f"index:{rule}:{calibration['genuine_pairs']}/{calibration['impostor_pairs']} pairs"
        if state is not None:
            items_now, version_now = state()
            if is_stale(calibration, items_now, version_now):
                source += f", stale ({calibration.get('items')} items then, {items_now} now)"
        return rule, float(calibration["threshold"]), source
    command = f"run `siamesedb calibrate --index {where} --rule {rule}` or pass --threshold"
    if encoder_threshold is None:
        raise NotCalibratedError(
            f"{where}: no threshold for rule {rule!r}: the index is not calibrated for it and its encoder "
            f"carries none; {command}"
        )
    if not get_rule(rule).pair_scale and rule != encoder_rule:
        raise NotCalibratedError(
            f"{where}: no threshold for rule {rule!r}: the index is not calibrated for it, and the encoder's "
            f"threshold is a pair score, not on {rule!r}'s scale; {command}"
        )
    # the encoder's threshold says where it was measured (encoder.EncoderThreshold): "encoder (training pairs)"...
    return rule, float(encoder_threshold), str(getattr(encoder_threshold, "source", "encoder"))


def calibration_record(genuine: np.ndarray, impostor: np.ndarray, rule: str, target_far: float | None, items: int,
                       where: object) -> dict[str, Any]:
    """The threshold for `rule` from genuine / impostor pair scores: at the equal-error point (target_far None;
    needs genuine pairs) or at the lowest threshold whose false-accept rate is at most `target_far`. Carries a
    "warning" when it rests on fewer than MIN_GENUINE_PAIRS genuine or MIN_IMPOSTOR_PAIRS impostor pairs."""
    if target_far is None:
        if len(genuine) == 0:
            raise InvalidInputError(
                f"{where}: every class holds one item, so there are no genuine pairs for an equal-error "
                "threshold; calibrate with --target-far F (impostor pairs alone fix it), or verify with the "
                "encoder's own threshold (the default) or --threshold"
            )
        threshold, eer = eer_threshold(genuine, impostor)
        method = "eer"
    else:
        threshold = far_threshold(impostor, target_far)
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
        "items": int(items),
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
    return calibration


def calibrate_items(backend: Any, rule: str, target_far: float | None, metric: str, where: object) -> dict[str, Any]:
    """`calibration_record` from every genuine / impostor pair of the backend's items (one committed state)."""
    check_rule(rule)
    if target_far is not None:
        as_target_far(target_far)
    with backend.snapshot():
        version = backend.version
        ids, vectors = backend.vectors()
        labels = backend.labels_of(ids)
    if len(ids) == 0:
        raise EmptyIndexError(f"{where}: the index holds no items to calibrate on")
    if len(set(labels)) < 2:
        raise InvalidInputError(f"{where}: calibration needs at least two classes (impostor pairs)")
    genuine, impostor = genuine_impostor_scores(vectors, labels, rule=rule, require_genuine=False, metric=metric)
    # "store_version": the backend version it was made at, so `info` and `verify` can say when it went stale.
    return {**calibration_record(genuine, impostor, rule, target_far, len(ids), where), "store_version": int(version)}
