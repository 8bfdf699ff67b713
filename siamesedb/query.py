"""Array-level search, classification, verification and threshold calibration: numpy only.

Every function works on L2-normalised float32 vectors, where the inner product is the cosine similarity and
**higher is always more similar**. A class prototype is the normalised mean of its support vectors.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from siamesedb.errors import InvalidInputError

VERIFY_RULES = ("prototype", "max", "mean_top3")


@dataclass
class Hit:
    """One search result: an indexed item and its similarity to the query."""

    id: int
    label: str
    path: str
    score: float

    def to_dict(self) -> dict[str, Any]:
        return {"id": int(self.id), "label": str(self.label), "path": str(self.path), "score": float(self.score)}


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
    """A verification decision: accepted when score >= threshold."""

    label: str
    accepted: bool
    score: float
    threshold: float

    def to_dict(self) -> dict[str, Any]:
        return {
            "label": str(self.label),
            "accepted": bool(self.accepted),
            "score": float(self.score),
            "threshold": float(self.threshold),
        }


def normalize(x: np.ndarray) -> np.ndarray:
    """Rows scaled to unit L2 norm, as float32; an all-zero row stays zero instead of becoming NaN."""
    x = np.asarray(x, dtype=np.float32)
    norms = np.linalg.norm(x, axis=-1, keepdims=True)
    return x / np.maximum(norms, np.float32(1e-12))


def brute_force_search(queries: np.ndarray, corpus: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Exact top-k by inner product: (D (nq, k) float32, I (nq, k) int64), padded with -inf / -1 past the corpus."""
    queries = np.atleast_2d(np.asarray(queries, dtype=np.float32))
    corpus = np.asarray(corpus, dtype=np.float32).reshape(-1, queries.shape[1])
    if k < 1:
        raise InvalidInputError(f"k must be at least 1, got {k}")
    nq, n = len(queries), len(corpus)
    D = np.full((nq, k), -np.inf, dtype=np.float32)
    I = np.full((nq, k), -1, dtype=np.int64)
    if n == 0:
        return D, I
    scores = queries @ corpus.T  # (nq, n)
    take = min(k, n)
    # argpartition then a sort of the k survivors: O(n + k log k) per query; stable order for equal scores.
    top = np.argpartition(-scores, take - 1, axis=1)[:, :take] if take < n else np.tile(np.arange(n), (nq, 1))
    top_scores = np.take_along_axis(scores, top, axis=1)
    order = np.lexsort((top, -top_scores), axis=1)
    I[:, :take] = np.take_along_axis(top, order, axis=1)
    D[:, :take] = np.take_along_axis(top_scores, order, axis=1)
    return D, I


def class_prototypes(vectors: np.ndarray, labels: Sequence[str]) -> tuple[list[str], np.ndarray]:
    """(classes sorted by label, (C, D) normalised class means)."""
    vectors = np.asarray(vectors, dtype=np.float32)
    if len(vectors) != len(labels):
        raise InvalidInputError(f"{len(vectors)} vectors but {len(labels)} labels")
    classes, inverse = np.unique(np.asarray(labels, dtype=object).astype(str), return_inverse=True)
    sums = np.zeros((len(classes), vectors.shape[1]), dtype=np.float64)
    np.add.at(sums, inverse, vectors)
    return [str(c) for c in classes], normalize(sums)


def _rank(scores: np.ndarray, classes: Sequence[str]) -> list[list[tuple[str, float]]]:
    order = np.argsort(-scores, axis=1, kind="stable")
    return [[(classes[j], float(row[j])) for j in idx] for row, idx in zip(scores, order)]


def rank_by_prototype(
    queries: np.ndarray, prototypes: np.ndarray, classes: Sequence[str]
) -> list[list[tuple[str, float]]]:
    """For each query, every class ranked by cosine similarity to its prototype, best first."""
    queries = np.atleast_2d(np.asarray(queries, dtype=np.float32))
    if len(prototypes) == 0:
        raise InvalidInputError("no classes to rank")
    return _rank(queries @ np.asarray(prototypes, dtype=np.float32).T, classes)


def rank_by_knn(hit_labels: Sequence[Sequence[str | None]], hit_scores: np.ndarray, k: int) -> list[list[tuple[str, float]]]:
    """Score-weighted vote of the top-k hits: a class's score is the sum of its hits' similarities.

    `hit_labels` (nq, >=k) holds each hit's label (None for a missing hit, FAISS id -1); ties in the vote are broken
    by the class's best single similarity. Only classes with at least one hit appear in the ranking.
    """
    hit_scores = np.atleast_2d(np.asarray(hit_scores, dtype=np.float64))
    rankings = []
    for labels, scores in zip(hit_labels, hit_scores):
        votes: dict[str, float] = {}
        best: dict[str, float] = {}
        for label, score in list(zip(labels, scores))[:k]:
            if label is None or not np.isfinite(score):
                continue
            votes[label] = votes.get(label, 0.0) + float(score)
            best[label] = max(best.get(label, -np.inf), float(score))
        ranked = sorted(votes, key=lambda c: (-votes[c], -best[c], c))
        rankings.append([(c, votes[c]) for c in ranked])
    if any(not r for r in rankings):
        raise InvalidInputError("a query has no neighbours to vote")
    return rankings


def verification_score(query: np.ndarray, support: np.ndarray, rule: str = "prototype") -> float:
    """Similarity of one (D,) query to an (M, D) support set under a scoring rule.

    prototype: cosine to the normalised mean; max: the best single reference; mean_top3: mean of the best
    min(3, M) references (less sensitive to one outlier reference than max).
    """
    query = np.asarray(query, dtype=np.float32).reshape(-1)
    support = np.atleast_2d(np.asarray(support, dtype=np.float32))
    if len(support) == 0:
        raise InvalidInputError("empty support set")
    if rule == "prototype":
        return float(normalize(support.sum(axis=0)) @ query)
    scores = support @ query
    if rule == "max":
        return float(scores.max())
    if rule == "mean_top3":
        return float(np.sort(scores)[::-1][: min(3, len(scores))].mean())
    raise InvalidInputError(f"unknown rule {rule!r}; choose from {', '.join(VERIFY_RULES)}")


def genuine_impostor_scores(
    vectors: np.ndarray, labels: Sequence[str], rule: str = "prototype"
) -> tuple[np.ndarray, np.ndarray]:
    """Leave-one-out scores inside a support set: (genuine (G,), impostor (I,)) float64.

    Each item of a class with at least two members is scored against its own class without itself (genuine) and
    against every other class's full support set (impostor).
    """
    vectors = np.asarray(vectors, dtype=np.float32)
    labels = np.asarray(labels, dtype=object).astype(str)
    classes = np.unique(labels)
    members = {c: np.flatnonzero(labels == c) for c in classes}
    if not any(len(ix) >= 2 for ix in members.values()):
        raise InvalidInputError("calibration needs at least one class with two or more items (genuine pairs)")
    genuine, impostor = [], []
    if rule == "prototype":
        # Vectorised: class sums once, then remove the item itself from its own class's sum.
        sums = np.stack([vectors[members[c]].sum(axis=0) for c in classes])  # (C, D)
        protos = normalize(sums)
        all_scores = vectors @ protos.T  # (N, C)
        own = np.searchsorted(classes, labels)
        for i in range(len(vectors)):
            c = own[i]
            if len(members[classes[c]]) >= 2:
                genuine.append(float(normalize(sums[c] - vectors[i]) @ vectors[i]))
            others = np.delete(all_scores[i], c)
            impostor.extend(others.tolist())
        return np.asarray(genuine), np.asarray(impostor)
    for i in range(len(vectors)):
        for c in classes:
            ix = members[c]
            if c == labels[i]:
                rest = ix[ix != i]
                if len(rest):
                    genuine.append(verification_score(vectors[i], vectors[rest], rule))
            else:
                impostor.append(verification_score(vectors[i], vectors[ix], rule))
    return np.asarray(genuine), np.asarray(impostor)


def roc_points(genuine: np.ndarray, impostor: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(thresholds ascending, FAR, FRR) at every distinct score; accept when score >= threshold.

    FAR(t) = fraction of impostor scores >= t; FRR(t) = fraction of genuine scores < t. Sorting once and
    searchsorted make it O((G + I) log(G + I)).
    """
    genuine = np.sort(np.asarray(genuine, dtype=np.float64))
    impostor = np.sort(np.asarray(impostor, dtype=np.float64))
    if len(genuine) == 0 or len(impostor) == 0:
        raise InvalidInputError("need at least one genuine and one impostor score")
    thresholds = np.unique(np.concatenate([genuine, impostor, [np.inf]]))
    far = 1.0 - np.searchsorted(impostor, thresholds, side="left") / len(impostor)
    frr = np.searchsorted(genuine, thresholds, side="left") / len(genuine)
    return thresholds, far, frr


def eer_threshold(genuine: np.ndarray, impostor: np.ndarray) -> tuple[float, float]:
    """(threshold, equal error rate): the threshold where FAR and FRR are closest; EER = their mean there."""
    thresholds, far, frr = roc_points(genuine, impostor)
    finite = np.isfinite(thresholds)
    gap = np.where(finite, np.abs(far - frr), np.inf)
    best = int(np.argmin(gap))
    return float(thresholds[best]), float((far[best] + frr[best]) / 2)


def far_threshold(impostor: np.ndarray, target_far: float) -> float:
    """The lowest threshold whose false-accept rate on `impostor` is at most `target_far`."""
    if not 0.0 <= target_far <= 1.0:
        raise InvalidInputError(f"target FAR must lie in [0, 1], got {target_far}")
    impostor = np.sort(np.asarray(impostor, dtype=np.float64))
    if len(impostor) == 0:
        raise InvalidInputError("need at least one impostor score")
    candidates = np.unique(impostor)
    far = 1.0 - np.searchsorted(impostor, candidates, side="left") / len(impostor)
    ok = np.flatnonzero(far <= target_far + 1e-12)
    if len(ok):
        return float(candidates[ok[0]])
    # Even the highest impostor score lets too many through: sit just above it (FAR 0).
    return float(np.nextafter(impostor[-1], np.inf))
