"""The result types of search, classification and verification: small, JSON-ready (`to_dict`, `json_default`).

`Hit` (one search result), `SearchResults` (a batch of them, columnar until read), `Prediction` (a classification
and its ranking) and `Verification` (an accept / reject decision and where its threshold came from).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from siamesedb.errors import InvalidInputError
from siamesedb.scoring import Ranking, check_metric


@dataclass
class Hit:
    """One search result: an indexed item and its similarity to the query."""

    id: int
    label: str
    path: str
    score: float
    distance: float | None = None  # Euclidean indexes: the distance (score = -distance); None under cosine

    def to_dict(self) -> dict[str, Any]:
        document = {"id": int(self.id), "label": str(self.label), "path": str(self.path), "score": float(self.score)}
        if self.distance is not None:
            document["distance"] = float(self.distance)
        return document


class SearchResults(Sequence[list[Hit]]):
    """Batched search results: one list of Hits per query, built when first read.

    Columnar underneath, as FAISS returns them: `scores` (nq, k) float32 and `ids` (nq, k) int64, -1 for "no
    result". The labels and paths of every hit are read with one store query (`lookup`) the first time any Hit
    is asked for, so a caller that only needs the arrays pays for the FAISS search alone. A hit whose item is
    gone by then (removed by another writer) is left out, as it would have been at search time.
    """

    def __init__(self, scores: np.ndarray, ids: np.ndarray, lookup: Callable[[np.ndarray], dict[int, tuple[str, str]]],
                 metric: str = "cosine"):
        if scores.shape != ids.shape or scores.ndim != 2:
            raise InvalidInputError(f"scores {scores.shape} and ids {ids.shape} must be the same (nq, k) shape")
        self.scores = scores
        self.ids = ids
        self.metric = check_metric(metric)
        self._lookup = lookup
        self._found: dict[int, tuple[str, str]] | None = None  # id -> (label, path), read once
        self._hits: dict[int, list[Hit]] = {}

    def fetch(self) -> SearchResults:
        """Read every hit's label and path now (one store query); later reads need no store."""
        self._items()
        return self

    @property
    def fetched(self) -> bool:
        return self._found is not None

    def _items(self) -> dict[int, tuple[str, str]]:
        if self._found is None:
            # Two threads may read one lazy result at once: the first to finish sets _found and drops the lookup;
            # the other must neither call a dropped lookup nor overwrite the answer.
            lookup = self._lookup
            if lookup is not None:
                found = lookup(np.unique(self.ids[self.ids >= 0]))
                if self._found is None:
                    self._found = found
            self._lookup = None  # type: ignore[assignment]  # drop the store reference
        return self._found

    def __len__(self) -> int:
        return len(self.ids)

    def _row(self, q: int) -> list[Hit]:
        if q not in self._hits:
            found = self._items()
            euclidean = self.metric == "euclidean"
            self._hits[q] = [
                Hit(id=i, label=found[i][0], path=found[i][1], score=s, distance=-s if euclidean else None)
                for s, i in zip(self.scores[q].tolist(), self.ids[q].tolist())
                if i >= 0 and i in found
            ]
        return self._hits[q]

    def __getitem__(self, q):  # type: ignore[override]
        if isinstance(q, slice):
            return [self._row(r) for r in range(len(self))[q]]
        q = int(q)
        if not -len(self) <= q < len(self):
            raise IndexError(f"query {q} out of range for {len(self)} queries")
        return self._row(q % len(self))

    def __eq__(self, other: object) -> bool:
        if isinstance(other, (SearchResults, list)):
            return list(self) == list(other)
        return NotImplemented

    def __repr__(self) -> str:
        return f"SearchResults({len(self)} queries, k={self.ids.shape[1]})"


@dataclass
class Prediction:
    """A classification: the best label, its score, and every candidate class ranked best first."""

    label: str
    score: float
    ranking: list[tuple[str, float]] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return {
            "label": str(self.label),
            "score": float(self.score),
            "ranking": [{"label": str(label), "score": float(score)} for label, score in self.ranking],
        }


@dataclass
class Verification:
    """A verification decision: accepted when score >= threshold.

    `threshold_source` says where the threshold came from: `index:<rule>:<genuine>/<impostor> pairs` (the index's
    own calibration for that rule; `, stale (<n> items then, <m> now)` follows when the index changed since it was
    calibrated), `encoder` (the pair threshold the encoder carries, used only for rules scored on its scale), or
    `given` (the caller's).
    `query` names the verified image when the caller gave one (a path), else it is None.
    """

    label: str
    accepted: bool
    score: float
    threshold: float
    threshold_source: str = "given"
    query: str | None = None

    def to_dict(self) -> dict[str, Any]:
        return {
            "query": None if self.query is None else str(self.query),
            "label": str(self.label),
            "accepted": bool(self.accepted),
            "score": float(self.score),
            "threshold": float(self.threshold),
            "threshold_source": str(self.threshold_source),
        }


def json_default(obj: Any) -> Any:
    """`json.dumps(results, default=json_default)`: Hits, Predictions, Verifications, SearchResults and numpy
    scalars / arrays become plain JSON types."""
    if isinstance(obj, (Hit, Prediction, Verification)):
        return obj.to_dict()
    if isinstance(obj, SearchResults):
        return [[hit.to_dict() for hit in row] for row in obj]
    if isinstance(obj, Ranking):
        return [list(pair) for pair in obj]
    if isinstance(obj, np.generic):
        return obj.item()
    if isinstance(obj, np.ndarray):
        return obj.tolist()
    raise TypeError(f"{type(obj).__name__} is not JSON serialisable")
