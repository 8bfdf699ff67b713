"""Array-level search, classification, verification and threshold calibration: numpy only."""

# Every function works under one of two metrics (`metric=`), and higher is always more similar:
# - "cosine" (the default): L2-normalised float32 vectors, score = inner product = cosine similarity; a class
#   prototype is the normalised mean of its support vectors;
# - "euclidean": raw vectors, score = minus the Euclidean distance (0 for identical vectors); a class prototype is
#   the plain mean of its support vectors (Snell et al. 2017).

from __future__ import annotations

import operator
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from siamesedb.errors import DimensionMismatchError, InvalidInputError

VERIFY_RULES = ("prototype", "max", "mean_top3", "relative")  # the scoring rules of verification_score
_CONSISTENCY_ROWS = 1024  # left-out items per block in _consistencies
_MIN_CONSISTENCY = 0.1  # floor of the reference consistency "relative" divides by (near-orthogonal references)
_BLOCK = 1 << 24  # most similarities held at once by the blocked loops below (~64 MB of float32)
METRICS = ("cosine", "euclidean")  # encoder metrics; an index stores them as "inner_product" / "l2"
_MIN_SPREAD = 1e-6  # floor of the reference spread "relative" divides by under the Euclidean metric


def check_metric(metric: str) -> str:
    if metric not in METRICS:
        raise InvalidInputError(f"unknown metric {metric!r}; choose from {', '.join(METRICS)}")
    return metric


def scores_for(metric: str, queries: np.ndarray, corpus: np.ndarray) -> np.ndarray:
    """(nq, D) queries x (n, D) corpus -> (nq, n) scores, higher = more similar: the inner product (cosine on unit
    vectors), or minus the Euclidean distance (from |q|^2 + |c|^2 - 2 q.c, clamped at 0 against rounding)."""
    products = queries @ corpus.T
    if check_metric(metric) == "cosine":
        return products
    q2 = np.einsum("nd,nd->n", queries, queries)
    c2 = np.einsum("nd,nd->n", corpus, corpus)
    squared = np.maximum(q2[:, None] + c2[None, :] - 2 * products, 0)
    return -np.sqrt(squared, out=squared)


def prototypes_from_sums(metric: str, sums: np.ndarray, counts: np.ndarray) -> np.ndarray:
    """(C, D) class sums and (C,) member counts -> (C, D) float32 prototypes: normalised sums (cosine) or means."""
    if check_metric(metric) == "cosine":
        return normalize(sums)
    return (np.asarray(sums, np.float64) / np.maximum(np.asarray(counts), 1)[:, None]).astype(np.float32)


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
            self._found = self._lookup(np.unique(self.ids[self.ids >= 0]))
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
    own calibration for that rule), `encoder` (the pair threshold the encoder carries), or `given` (the caller's).
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


def normalize(x: np.ndarray) -> np.ndarray:
    """Rows scaled to unit L2 norm, as float32; an all-zero row stays zero instead of becoming NaN."""
    x = np.asarray(x, dtype=np.float32)
    norms = np.linalg.norm(x, axis=-1, keepdims=True)
    return x / np.maximum(norms, np.float32(1e-12))


def _as_vectors(x: np.ndarray, dim: int | None = None, what: str = "vectors") -> np.ndarray:
    """(n, D) float32 from a 2-D array (a single (D,) vector becomes (1, D)); D checked against `dim` if given."""
    array = np.asarray(x)
    if array.ndim == 1:
        array = array[None, :]
    if array.ndim != 2:
        raise InvalidInputError(f"{what} must be a 2-D array (n, d), got shape {array.shape}")
    if not (np.issubdtype(array.dtype, np.floating) or np.issubdtype(array.dtype, np.integer)):
        raise InvalidInputError(f"{what} must be a real-valued numeric array, got dtype {array.dtype}")
    if dim is not None and array.shape[1] != dim:
        raise DimensionMismatchError(f"{what} have dimension {array.shape[1]}, expected {dim}")
    return array.astype(np.float32, copy=False)


def brute_force_search(
    queries: np.ndarray, corpus: np.ndarray, k: int, metric: str = "cosine"
) -> tuple[np.ndarray, np.ndarray]:
    """Exact top-k by score (`scores_for`): (D (nq, k) float32, I (nq, k) int64), padded with -inf / -1 past the corpus.

    I holds row numbers of `corpus`; equal scores are ordered by row number.
    """
    queries = _as_vectors(queries, what="queries")
    corpus = np.asarray(corpus)
    if corpus.size == 0:
        corpus = np.empty((0, queries.shape[1]), np.float32)
    corpus = _as_vectors(corpus, queries.shape[1], "corpus")
    if int(k) != k or k < 1:
        raise InvalidInputError(f"k must be an integer of at least 1, got {k}")
    k = int(k)
    nq, n = len(queries), len(corpus)
    D = np.full((nq, k), -np.inf, dtype=np.float32)
    I = np.full((nq, k), -1, dtype=np.int64)
    if n == 0 or nq == 0:
        return D, I
    take = min(k, n)
    step = max(1, _BLOCK // n)  # queries per block: bounds the (block, n) score matrix
    for start in range(0, nq, step):
        scores = scores_for(metric, queries[start : start + step], corpus)  # (block, n)
        # argpartition then a sort of the k survivors: O(n + k log k) per query.
        if take < n:
            top = np.argpartition(-scores, take - 1, axis=1)[:, :take]
        else:
            top = np.broadcast_to(np.arange(n), scores.shape)
        top_scores = np.take_along_axis(scores, top, axis=1)
        order = np.lexsort((top, -top_scores), axis=1)  # best score first, then lower row number
        I[start : start + step, :take] = np.take_along_axis(top, order, axis=1)
        D[start : start + step, :take] = np.take_along_axis(top_scores, order, axis=1)
    return D, I


def class_prototypes(
    vectors: np.ndarray, labels: Sequence[str], metric: str = "cosine"
) -> tuple[list[str], np.ndarray]:
    """(classes sorted by label, (C, D) prototypes: normalised class means (cosine) or plain means (euclidean))."""
    vectors = _as_vectors(vectors)
    if len(vectors) != len(labels):
        raise InvalidInputError(f"{len(vectors)} vectors but {len(labels)} labels")
    if len(vectors) == 0:
        raise InvalidInputError("no vectors to build class prototypes from")
    classes, inverse = np.unique(np.asarray(labels, dtype=object).astype(str), return_inverse=True)
    sums = np.zeros((len(classes), vectors.shape[1]), dtype=np.float64)  # (C, D), summed in float64
    np.add.at(sums, inverse.reshape(-1), vectors)
    counts = np.bincount(inverse.reshape(-1), minlength=len(classes))
    return [str(c) for c in classes], prototypes_from_sums(metric, sums, counts)


class Ranking(Sequence[tuple[str, float]]):
    """Every candidate class of one query, best first, as (label, score) pairs: built when first read.

    Entry 0, the best class, is known at once (`rank_by_prototype` finds every query's best class with one
    blocked matrix product and an argmax); the other entries are scored and sorted the first time any of them is
    read, so a caller that only wants the label never ranks 100k classes. Reading a prefix (`ranking[:5]`) sorts
    only that many. Ties: class order, except that the best class always comes first. The recomputed scores go
    through the same BLAS matrix kernel as the batch (two rows, never the one-row kernel), so they are the batch's
    own; where a small-matrix kernel rounds a near-tie a few ulps differently, a score is capped at the best
    class's so the ranking stays best first. Compares equal to the list it stands for; pickles as that list.
    """

    __slots__ = ("_best", "_best_score", "_query", "_prototypes", "_classes", "_metric", "_entries")

    def __init__(self, best: int, best_score: float, query: np.ndarray, prototypes: np.ndarray,
                 classes: Sequence[str], metric: str = "cosine"):
        self._best = int(best)
        self._best_score = float(best_score)
        self._query = query  # (D,) float32
        self._prototypes = prototypes  # (C, D) float32, shared by the batch
        self._classes = classes
        self._metric = metric
        self._entries: list[tuple[str, float]] | None = None

    def __len__(self) -> int:
        return len(self._classes)

    def _scores(self) -> np.ndarray:
        s = scores_for(self._metric, np.vstack([self._query, self._query]), self._prototypes)[0]
        s[self._best] = self._best_score
        return np.minimum(s, np.float32(self._best_score), out=s)

    def _order(self, s: np.ndarray, count: int) -> np.ndarray:
        """Class indices of the first `count` entries, from the capped scores `s`."""
        n, best = len(self), self._best
        if count >= n // 8:
            negated = -s
            order = np.argsort(negated)  # introsort, ~3x faster than a stable sort; then each run of equal
            ranked = negated[order]  # scores (float32: a few hundred among 100k classes) back in class order
            tied = np.flatnonzero(ranked[1:] == ranked[:-1])
            for run in np.split(tied, np.flatnonzero(np.diff(tied) != 1) + 1) if len(tied) else ():
                order[run[0] : run[-1] + 2].sort()
            return order if order[0] == best else np.concatenate(([best], order[order != best]))
        kth = s[np.argpartition(-s, count - 1)[:count]].min()
        above, tied = np.flatnonzero(s > kth), np.flatnonzero(s == kth)
        candidates = np.unique(np.concatenate(([best], above, tied[: count - len(above)])))
        keys = (candidates, -s[candidates], candidates != best)  # best first, then by score, then class order
        return candidates[np.lexsort(keys)][:count]

    def _pairs(self, order: np.ndarray, s: np.ndarray) -> list[tuple[str, float]]:
        names = operator.itemgetter(*order.tolist())(self._classes) if len(order) > 1 else [self._classes[order[0]]]
        return list(zip(names, s[order].tolist()))

    def _all(self) -> list[tuple[str, float]]:
        if self._entries is None:
            s = self._scores()
            order = self._order(s, len(self))
            self._entries = self._pairs(order, s)
        return self._entries

    def __getitem__(self, i):  # type: ignore[override]
        if isinstance(i, slice):
            start, stop, step = i.indices(len(self))
            if self._entries is None and step == 1 and start >= stop:
                return []
            if self._entries is None and step == 1 and 0 <= start < stop < len(self) // 8:
                s = self._scores()
                return self._pairs(self._order(s, stop)[start:], s)
            return self._all()[i]
        i = int(i)
        if not -len(self) <= i < len(self):
            raise IndexError(f"ranking index {i} out of range for {len(self)} classes")
        if i in (0, -len(self)):
            return (self._classes[self._best], self._best_score)
        return self._all()[i]

    def __iter__(self):
        return iter(self._all())

    def __eq__(self, other: object) -> bool:
        if isinstance(other, (Ranking, list, tuple)):
            return self._all() == list(other)
        return NotImplemented

    __hash__ = None  # type: ignore[assignment]  # mutable-sequence semantics, like the list it stands for

    def __repr__(self) -> str:
        return repr(self._all())

    def __reduce__(self):
        return (list, (self._all(),))


def _best_prototypes(queries: np.ndarray, prototypes: np.ndarray, metric: str) -> tuple[np.ndarray, np.ndarray]:
    """(best class (nq,) int64, its score (nq,) float32) of each query: blocks of queries through one matrix
    product each (never fewer than two rows: the one-row BLAS kernel rounds differently from the one a lazy
    `Ranking` recomputes with), argmax = the first best class, as a stable sort would rank it. Cosine products go
    into one score buffer reused by every block (a fresh 64 MB array per block spent as long faulting its pages in
    as the product took: measured 1,349 vs 2,208 q/s over 100k classes on the shared 2-core machine)."""
    nq = len(queries)
    best, best_scores = np.zeros(nq, np.int64), np.zeros(nq, np.float32)
    step = max(2, _BLOCK // max(1, len(prototypes)))
    buffer = np.empty((max(2, min(step, nq)), len(prototypes)), np.float32) if metric == "cosine" else None
    for start in range(0, nq, step):
        block = queries[start : start + step]
        rows = len(block)
        block = block if rows > 1 else np.vstack([block, block])
        if buffer is None:
            scores = scores_for(metric, block, prototypes)[:rows]
        else:
            scores = np.matmul(block, prototypes.T, out=buffer[: len(block)])[:rows]  # = scores_for's product
        top = scores.argmax(axis=1)
        best[start : start + rows] = top
        best_scores[start : start + rows] = scores[np.arange(rows), top]
    return best, best_scores


def rank_by_prototype(
    queries: np.ndarray, prototypes: np.ndarray, classes: Sequence[str], metric: str = "cosine"
) -> list[Ranking]:
    """For each query, every class ranked by its score against the class prototype, best first (ties: class order).

    Each ranking is a lazy `Ranking`: the best class of every query is found here; the rest are ranked when read.
    The rankings read `prototypes` again later: a writeable float32 array of the caller's is copied first (a
    read-only one, like the index's class table, is shared).
    """
    given = prototypes
    prototypes = _as_vectors(prototypes, what="prototypes")
    if len(prototypes) == 0:
        raise InvalidInputError("no classes to rank")
    if len(classes) != len(prototypes):
        raise InvalidInputError(f"{len(prototypes)} prototypes but {len(classes)} class names")
    queries = np.array(_as_vectors(queries, prototypes.shape[1], "queries"), dtype=np.float32)  # a private copy
    if prototypes.flags.writeable:
        if isinstance(given, np.ndarray) and np.may_share_memory(prototypes, given):
            prototypes = prototypes.copy()
        prototypes.setflags(write=False)
    metric = check_metric(metric)
    best, best_scores = _best_prototypes(queries, prototypes, metric)
    return [
        Ranking(b, s, q, prototypes, classes, metric)
        for b, s, q in zip(best.tolist(), best_scores.tolist(), queries)
    ]


def rank_by_knn(
    hit_labels: Sequence[Sequence[str | None]], hit_scores: np.ndarray, k: int, metric: str = "cosine"
) -> list[list[tuple[str, float]]]:
    """Score-weighted vote of the top-k hits: a class's score is the sum of its hits' similarities (cosine), or of
    1 / (1 + distance) under the Euclidean metric (a vote must be positive and shrink with the distance; a sum of
    negative distances would rank a class lower for every extra neighbour it has).

    `hit_labels` (nq, >=k) holds each hit's label (None for a missing hit, FAISS id -1); ties in the vote are broken
    by the class's best single similarity. Only classes with at least one hit appear in the ranking.
    """
    hit_scores = np.atleast_2d(np.asarray(hit_scores, dtype=np.float64))  # (nq, >=k)
    if check_metric(metric) == "euclidean":
        hit_scores = 1.0 / (1.0 - hit_scores)  # score = -distance -> 1 / (1 + distance) in (0, 1]; -inf -> 0
    if len(hit_labels) != len(hit_scores):
        raise InvalidInputError(f"{len(hit_labels)} rows of hit labels but {len(hit_scores)} rows of scores")
    if int(k) != k or k < 1:
        raise InvalidInputError(f"k must be an integer of at least 1, got {k}")
    k = int(k)
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


def verification_score(query: np.ndarray, support: np.ndarray, rule: str = "prototype", metric: str = "cosine") -> float:
    """Similarity of one (D,) query to an (M, D) support set under a scoring rule.

    prototype: cosine to the normalised mean; max: the best single reference; mean_top3: mean of the best
    min(3, M) references (less sensitive to one outlier reference than max); relative: the prototype cosine divided
    by the references' own consistency (`reference_consistency`), so a writer whose genuine references vary a lot
    is held to a lower bar than one who signs the same way every time (with one reference: the prototype cosine).
    Under metric="euclidean" every cosine above becomes minus the distance (prototype: to the plain mean), and
    relative divides by the references' spread (`reference_spread`) instead.
    """
    support = np.asarray(support)
    if support.size == 0:
        raise InvalidInputError("empty support set")
    support = _as_vectors(support, what="support")
    query = _as_vectors(query, support.shape[1], "query")
    if len(query) != 1:
        raise InvalidInputError(f"verification_score takes one query vector, got {len(query)}")
    query = query[0]
    if check_metric(metric) == "euclidean":
        # Euclidean: minus the distance to the plain mean; "relative" divides it by the references' own spread
        # (`reference_spread`), the distance counted in units of how far apart the writer's references lie.
        if rule in ("prototype", "relative"):
            score = -float(np.linalg.norm(query.astype(np.float64) - support.mean(axis=0, dtype=np.float64)))
            return score / reference_spread(support) if rule == "relative" else score
        scores = scores_for(metric, query[None, :], support)[0]
    elif rule in ("prototype", "relative"):
        score = float(normalize(support.sum(axis=0)) @ query)
        return score / reference_consistency(support) if rule == "relative" else score
    else:
        scores = support @ query
    if rule == "max":
        return float(scores.max())
    if rule == "mean_top3":
        return float(np.sort(scores)[::-1][: min(3, len(scores))].mean())
    raise InvalidInputError(f"unknown rule {rule!r}; choose from {', '.join(VERIFY_RULES)}")


def reference_consistency(support: np.ndarray) -> float:
    """How alike an (M, D) reference set is: the mean cosine of each reference to the prototype of the others.

    1.0 for a single reference (nothing to compare), floored at 0.1 so near-orthogonal references cannot blow a
    relative score up.
    """
    support = _as_vectors(support, what="support").astype(np.float64)
    if len(support) < 2:
        return 1.0
    others = normalize(support.sum(axis=0) - support)  # (M, D): row j is the prototype without reference j
    return max(float(np.einsum("md,md->m", others, support).mean()), _MIN_CONSISTENCY)


def reference_spread(support: np.ndarray) -> float:
    """The Euclidean counterpart of `reference_consistency`: the mean distance of each of an (M, D) reference set
    to the mean of the others; 1.0 for a single reference, floored at _MIN_SPREAD (identical references)."""
    support = _as_vectors(support, what="support").astype(np.float64)
    m = len(support)
    if m < 2:
        return 1.0
    others = (support.sum(axis=0) - support) / (m - 1)  # (M, D): row j is the mean without reference j
    return max(float(np.linalg.norm(support - others, axis=1).mean()), _MIN_SPREAD)


def _spreads(
    vectors: np.ndarray, inverse: np.ndarray, sizes: np.ndarray, sums: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """(whole (C,), without_item (N,)): `reference_spread` of every class's support set, and of each item's own
    class with that item left out, from dot products as in `_consistencies`. Leaving item i out, the distance of
    member j to the mean of the other m - 2 is |v_j - u / (m - 2)| with u = S - v_i - v_j, where
    v_j.u = s_j - G_ij - G_jj and |u|^2 = |S|^2 + G_ii + G_jj - 2 s_i - 2 s_j + 2 G_ij."""
    v = vectors.astype(np.float64)
    own = sums[inverse]  # (N, D)
    dot_sum = np.einsum("nd,nd->n", v, own)  # s_j
    sq = np.einsum("nd,nd->n", v, v)  # G_jj
    sum_sq = np.einsum("cd,cd->c", sums, sums)  # |S|^2
    m_of = sizes[inverse].astype(np.float64)
    rest = np.maximum(m_of - 1, 1)  # members left beside j
    rest_sq = sum_sq[inverse] - 2 * dot_sum + sq  # |S - v_j|^2
    to_rest = np.sqrt(np.maximum(sq - 2 * (dot_sum - sq) / rest + rest_sq / rest**2, 0))
    whole = np.bincount(inverse, weights=to_rest, minlength=len(sizes)) / np.maximum(sizes, 1)
    whole = np.where(sizes >= 2, np.maximum(whole, _MIN_SPREAD), 1.0)
    without = np.ones(len(v))
    for c in np.flatnonzero(sizes >= 3):
        members = np.flatnonzero(inverse == c)
        m = len(members)
        s, g_diag = dot_sum[members], sq[members]
        for start in range(0, m, _CONSISTENCY_ROWS):
            rows = members[start : start + _CONSISTENCY_ROWS]
            gram = v[rows] @ v[members].T  # (rows, m): G_ij
            i_s, i_sq = dot_sum[rows][:, None], sq[rows][:, None]
            dot_u = s[None, :] - gram - g_diag[None, :]
            u_sq = sum_sq[c] + i_sq + g_diag[None, :] - 2 * i_s - 2 * s[None, :] + 2 * gram
            dist = np.sqrt(np.maximum(g_diag[None, :] - 2 * dot_u / (m - 2) + u_sq / (m - 2) ** 2, 0))
            dist[np.arange(len(rows)), np.arange(start, start + len(rows))] = 0.0  # j = i is not a reference
            without[rows] = np.maximum(dist.sum(axis=1) / (m - 1), _MIN_SPREAD)
    return whole, without


def _consistencies(
    vectors: np.ndarray, inverse: np.ndarray, sizes: np.ndarray, sums: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """(whole (C,), without_item (N,)): `reference_consistency` of every class's full support set, and of each
    item's own class with that item left out (the genuine trials of calibration), in float64. `sums`: the (C, D)
    float64 class sums the caller already has.

    Both from dot products only. With S a class sum, G = M Mᵀ its Gram matrix and s = M S, leaving item i out, the
    cosine of member j to the prototype of the rest is (s_j - G_ij - G_jj) / |S - v_i - v_j|, where
    |S - v_i - v_j|² = |S|² + G_ii + G_jj - 2 s_i - 2 s_j + 2 G_ij: an (m, m) array per class, never (m, m, D).
    """
    v = vectors.astype(np.float64)
    own = sums[inverse]  # (N, D)
    dot_sum = np.einsum("nd,nd->n", v, own)  # s_j
    sq = np.einsum("nd,nd->n", v, v)  # G_jj
    sum_sq = np.einsum("cd,cd->c", sums, sums)  # |S|²
    to_rest = (dot_sum - sq) / np.sqrt(np.maximum(sum_sq[inverse] - 2 * dot_sum + sq, 1e-24))
    whole = np.bincount(inverse, weights=to_rest, minlength=len(sizes)) / np.maximum(sizes, 1)
    whole = np.where(sizes >= 2, np.maximum(whole, _MIN_CONSISTENCY), 1.0)
    without = np.ones(len(v))
    for c in np.flatnonzero(sizes >= 3):
        members = np.flatnonzero(inverse == c)
        m = len(members)
        s, g_diag = dot_sum[members], sq[members]
        for start in range(0, m, _CONSISTENCY_ROWS):  # rows i (left out) in blocks: an (rows, m) array at a time
            rows = members[start : start + _CONSISTENCY_ROWS]
            gram = v[rows] @ v[members].T  # (rows, m): G_ij
            i_s, i_sq = dot_sum[rows][:, None], sq[rows][:, None]
            num = s[None, :] - gram - g_diag[None, :]
            den = np.sqrt(np.maximum(sum_sq[c] + i_sq + g_diag[None, :] - 2 * i_s - 2 * s[None, :] + 2 * gram, 1e-24))
            cos = num / den
            cos[np.arange(len(rows)), np.arange(start, start + len(rows))] = 0.0  # j = i is not a reference
            without[rows] = np.maximum(cos.sum(axis=1) / (m - 1), _MIN_CONSISTENCY)
    return whole, without


def genuine_impostor_scores(
    vectors: np.ndarray, labels: Sequence[str], rule: str = "prototype", metric: str = "cosine",
    require_genuine: bool = True,
) -> tuple[np.ndarray, np.ndarray]:
    """Leave-one-out scores inside a support set: (genuine (G,), impostor (I,)) float64.

    Each item of a class with at least two members is scored against its own class without itself (genuine), and
    every item is scored against every other class's full support set (impostor). Order: item by item, and within an
    item, classes sorted by label. Vectorised: seconds, not hours, for ten thousand items in hundreds of classes.
    With `require_genuine=False` a support set of one item per class gives an empty genuine array instead of an error.
    """
    if rule not in VERIFY_RULES:
        raise InvalidInputError(f"unknown rule {rule!r}; choose from {', '.join(VERIFY_RULES)}")
    vectors = _as_vectors(vectors)
    if len(vectors) != len(labels):
        raise InvalidInputError(f"{len(vectors)} vectors but {len(labels)} labels")
    classes, inverse = np.unique(np.asarray(labels, dtype=object).astype(str), return_inverse=True)
    inverse = inverse.reshape(-1)
    sizes = np.bincount(inverse, minlength=len(classes))
    if require_genuine and not (sizes >= 2).any():  # a one-shot support set has impostor pairs only
        raise InvalidInputError("calibration needs at least one class with two or more items (genuine pairs)")
    n = len(vectors)
    # scores[i, c] = rule(vector i, support set of class c, leaving item i out of its own class): (N, C)
    rows = np.arange(n)
    if rule in ("prototype", "relative"):
        sums = np.zeros((len(classes), vectors.shape[1]), dtype=np.float64)  # (C, D) class sums
        np.add.at(sums, inverse, vectors)
        if check_metric(metric) == "euclidean":
            # Plain means; the item's own class without it: (S - v) / (m - 1) (only used where m >= 2).
            scores = scores_for(metric, vectors.astype(np.float64), sums / sizes[:, None])
            own = (sums[inverse] - vectors) / np.maximum(sizes[inverse] - 1, 1)[:, None]
            scores[rows, inverse] = -np.linalg.norm(vectors - own, axis=1)
        else:
            scores = (vectors @ normalize(sums).T).astype(np.float64)
            own = normalize(sums[inverse] - vectors)  # (N, D) own-class prototype without the item itself
            scores[rows, inverse] = np.einsum("nd,nd->n", own, vectors)
        if rule == "relative":
            spread = _spreads if metric == "euclidean" else _consistencies
            whole, without = spread(vectors, inverse, sizes, sums)
            scores /= whole[None, :]
            scores[rows, inverse] *= whole[inverse] / without  # own class: its consistency without the item
    else:
        scores = _reference_scores(vectors, inverse, sizes, rule, check_metric(metric))
    genuine = scores[rows, inverse][sizes[inverse] >= 2]
    other = np.ones_like(scores, dtype=bool)
    other[rows, inverse] = False
    return genuine, scores[other]  # boolean indexing walks row-major: item by item, classes in label order


def _reference_scores(
    vectors: np.ndarray, inverse: np.ndarray, sizes: np.ndarray, rule: str, metric: str = "cosine"
) -> np.ndarray:
    """(N, C) scores of every item against every class's references ("max" / "mean_top3"), the item left out.

    All N x N similarities are computed in row blocks of one large matrix product (far faster than one thin product
    per class). Columns are grouped by class, classes ordered by size, so the classes of one size m form a single
    (rows, k, m) view and each rule is one reduction per distinct size, not a Python loop over classes.
    """
    n, n_classes = len(vectors), len(sizes)
    class_order = np.lexsort((np.arange(n_classes), sizes))  # by size, then label
    rank = np.empty(n_classes, dtype=np.int64)
    rank[class_order] = np.arange(n_classes)
    order = np.argsort(rank[inverse], kind="stable")  # (N,) items column by column
    column = np.empty(n, dtype=np.int64)
    column[order] = np.arange(n)  # column[i]: where item i sits among the grouped references
    grouped_t = np.ascontiguousarray(vectors[order].T)  # (D, N)
    # One entry per distinct size m: (m, classes of that size in column order, first column).
    groups, first = [], 0
    for m in np.unique(sizes):
        members = class_order[sizes[class_order] == m]
        groups.append((int(m), members, first))
        first += len(members) * int(m)
    slot = np.empty(n_classes, dtype=np.int64)  # slot[c]: index of class c inside its size group
    for _, members, _ in groups:
        slot[members] = np.arange(len(members))
    scores = np.empty((n, n_classes), dtype=np.float64)
    step = max(1, _BLOCK // n)  # rows per block: bounds the (rows, N) similarity matrix
    norms = np.einsum("nd,nd->n", vectors, vectors) if metric == "euclidean" else None  # (N,) |v|^2
    for start in range(0, n, step):
        stop = min(n, start + step)
        sims = vectors[start:stop] @ grouped_t  # (rows, N) float32
        if metric == "euclidean":  # -|a - b| from the same product: |a|^2 + |b|^2 - 2 a.b
            sims = -np.sqrt(np.maximum(norms[start:stop, None] + norms[order][None, :] - 2 * sims, 0))
        local = np.arange(stop - start)
        sims[local, column[start:stop]] = -np.inf  # leave each item itself out of its own class
        own_size = sizes[inverse[start:stop]]
        for m, members, first in groups:
            block = sims[:, first : first + len(members) * m].reshape(stop - start, len(members), m)
            if rule == "max":
                scores[start:stop, members] = block.max(axis=2)
                continue
            t = min(3, m)
            top = -np.sort(-np.partition(block, m - t, axis=2)[..., m - t :], axis=2)  # (rows, k, t) best first
            value = top.mean(axis=2, dtype=np.float64)  # (rows, k)
            mine = np.flatnonzero(own_size == m)
            if 2 <= m <= 3 and len(mine):
                # Own class holds m - 1 references: average the best m - 1 (the left-out item sorts last at -inf).
                where = slot[inverse[start + mine]]
                value[mine, where] = top[mine, where, : m - 1].mean(axis=1, dtype=np.float64)
            scores[start:stop, members] = value
    return scores


def roc_points(genuine: np.ndarray, impostor: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(thresholds ascending, FAR, FRR) at every distinct score; accept when score >= threshold.

    FAR(t) = fraction of impostor scores >= t; FRR(t) = fraction of genuine scores < t. Sorting once and
    searchsorted make it O((G + I) log(G + I)).
    """
    genuine = np.sort(np.asarray(genuine, dtype=np.float64).reshape(-1))
    impostor = np.sort(np.asarray(impostor, dtype=np.float64).reshape(-1))
    if len(genuine) == 0 or len(impostor) == 0:
        raise InvalidInputError("need at least one genuine and one impostor score")
    if np.isnan(genuine).any() or np.isnan(impostor).any():
        raise InvalidInputError("scores contain NaN")
    thresholds = np.unique(np.concatenate([genuine, impostor, [np.inf]]))
    far = 1.0 - np.searchsorted(impostor, thresholds, side="left") / len(impostor)
    frr = np.searchsorted(genuine, thresholds, side="left") / len(genuine)
    return thresholds, far, frr


def eer_threshold(genuine: np.ndarray, impostor: np.ndarray) -> tuple[float, float]:
    """(threshold, equal error rate): the score where FAR and FRR are closest; EER = their mean there.

    Candidates are the distinct scores; among equally close ones the lowest threshold wins.
    """
    thresholds, far, frr = roc_points(genuine, impostor)
    finite = np.isfinite(thresholds)
    gap = np.where(finite, np.abs(far - frr), np.inf)
    best = int(np.argmin(gap))
    return float(thresholds[best]), float((far[best] + frr[best]) / 2)


def far_threshold(impostor: np.ndarray, target_far: float) -> float:
    """The lowest threshold whose false-accept rate on `impostor` is at most `target_far`."""
    if not 0.0 <= target_far <= 1.0:
        raise InvalidInputError(f"target FAR must lie in [0, 1], got {target_far}")
    impostor = np.sort(np.asarray(impostor, dtype=np.float64).reshape(-1))
    if len(impostor) == 0:
        raise InvalidInputError("need at least one impostor score")
    if np.isnan(impostor).any():
        raise InvalidInputError("scores contain NaN")
    candidates = np.unique(impostor)
    far = 1.0 - np.searchsorted(impostor, candidates, side="left") / len(impostor)  # FAR when t = candidates[j]
    ok = np.flatnonzero(far <= target_far + 1e-12)
    if len(ok) and ok[0] == 0:
        return float(candidates[0])  # every impostor may pass: the lowest score itself
    # FAR is constant on (candidates[j - 1], candidates[j]]: the lowest threshold meeting the target sits just above
    # the highest impostor score that must be refused, not at the next impostor score (which would reject every
    # genuine score in between for nothing). Just above = the next float32, the precision scores are computed in.
    below = candidates[ok[0] - 1] if len(ok) else impostor[-1]  # none meets it but "above them all" (FAR 0)
    above = float(np.nextafter(np.float32(below), np.float32(np.inf)))
    if above <= below:  # float32 rounding of a float64 score: step once more
        above = float(np.nextafter(np.float32(above), np.float32(np.inf)))
    return min(above, float(candidates[ok[0]])) if len(ok) else above
