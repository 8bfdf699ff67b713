"""Array-level maths, numpy only: scores under one metric vocabulary, top-k search, prototypes, lazy rankings,
ROC / EER / FAR thresholds.

Every function works under one of two metrics (`metric=`), and higher is always more similar:
- "cosine" (the default): L2-normalised float32 vectors, score = inner product = cosine similarity; a class
  prototype is the normalised mean of its support vectors;
- "euclidean": raw vectors, score = minus the Euclidean distance (0 for identical vectors); a class prototype is
  the plain mean of its support vectors (Snell et al. 2017).

The verification rules and their leave-one-out calibration scores live beside this, in `rules.py`.
"""

from __future__ import annotations

import operator
from collections.abc import Sequence

import numpy as np

from siamesedb.checks import as_target_far
from siamesedb.errors import DimensionMismatchError, InvalidInputError

METRICS = ("cosine", "euclidean")  # encoder metrics; a FAISS index stores them as "inner_product" / "l2"
_BLOCK = 1 << 24  # most scores held at once by the blocked loops below (~64 MB of float32)
_GROUP = 16  # columns per group of _best_columns' group maxima


def check_metric(metric: str) -> str:
    """`metric` itself when it is one of METRICS, else InvalidInputError."""
    if metric not in METRICS:
        raise InvalidInputError(f"unknown metric {metric!r}; choose from {', '.join(METRICS)}")
    return metric


def score_matrix(queries: np.ndarray, vectors: np.ndarray, metric: str) -> np.ndarray:
    """(nq, D) queries x (n, D) vectors -> (nq, n) scores in the inputs' dtype: the inner product (cosine on unit
    vectors), or minus the Euclidean distance (from |q|^2 + |v|^2 - 2 q.v, clamped at 0 against rounding).

    Summed in float64 and rounded once, so a query's scores do not depend on which other queries share the
    product: float32 BLAS kernels sum a row's D products in an order set by the row's place in the batch
    (OpenBLAS's Haswell kernel takes rows in panels of four and the rest through narrower kernels), and the same
    query scored an ulp apart from one batch to the next.
    """
    dtype = np.result_type(queries, vectors)
    queries = np.asarray(queries, dtype=np.float64)
    vectors = np.asarray(vectors, dtype=np.float64)
    products = queries @ vectors.T
    if check_metric(metric) == "euclidean":
        q2 = np.einsum("nd,nd->n", queries, queries)
        v2 = np.einsum("nd,nd->n", vectors, vectors)
        squared = np.maximum(q2[:, None] + v2[None, :] - 2 * products, 0)
        products = np.subtract(0, np.sqrt(squared, out=squared), out=squared)  # 0 - d: a match scores 0, not -0
    return products.astype(dtype, copy=False)


def pair_scores(a: np.ndarray, b: np.ndarray, metric: str) -> np.ndarray:
    """Row-wise scores of the pairs (a[i], b[i]) of two (n, D) arrays -> (n,) float32: `score_matrix`'s own
    formula, pair by pair (float64, rounded once), so identical vectors score exactly 1 / 0 as they do there."""
    a = np.asarray(a, dtype=np.float64)
    b = np.asarray(b, dtype=np.float64)
    products = np.einsum("nd,nd->n", a, b)
    if check_metric(metric) == "euclidean":
        squared = np.maximum(np.einsum("nd,nd->n", a, a) + np.einsum("nd,nd->n", b, b) - 2 * products, 0)
        products = np.subtract(0, np.sqrt(squared))
    return products.astype(np.float32)


def prototypes_from_sums(metric: str, sums: np.ndarray, counts: np.ndarray) -> np.ndarray:
    """(C, D) class sums and (C,) member counts -> (C, D) float32 prototypes: normalised sums (cosine) or means."""
    if check_metric(metric) == "cosine":
        return normalize(sums)
    return (np.asarray(sums, np.float64) / np.maximum(np.asarray(counts), 1)[:, None]).astype(np.float32)


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


def _as_count(k: int) -> int:
    """k as an int: an integral number of at least 1 (2.0 passes; 2.5, None and "3" do not)."""
    try:
        integral = not isinstance(k, (str, bytes)) and int(k) == k
    except (TypeError, ValueError, OverflowError):
        integral = False
    if not integral or k < 1:
        raise InvalidInputError(f"k must be an integer of at least 1, got {k!r}")
    return int(k)


def _best_columns(scores: np.ndarray, take: int) -> np.ndarray:
    """(rows, take) int64 column numbers of each row's `take` highest scores, best first, ties: lower column.

    When `take` is small against the n columns, the candidates come from group maxima: columns in _GROUP strided
    groups (j, j + n / _GROUP, ...), one elementwise max over the groups, then only the groups whose maximum reaches
    the take-th largest maximum (every score that can be among the best lies in one) are sorted: about a third of
    the time of an argpartition over all n. Otherwise (or with NaN scores): argpartition, O(n + take log take).
    """
    rows, n = scores.shape
    width = n // _GROUP
    if take >= n:
        top = np.broadcast_to(np.arange(n), scores.shape)
    else:
        if width >= 4 * take:
            maxima = scores[:, : width * _GROUP].reshape(rows, _GROUP, width).max(axis=1)  # (rows, width)
            if not np.isnan(maxima).any():
                kth = np.partition(maxima, width - take, axis=1)[:, width - take]  # the take-th largest maximum
                spread, tail = np.arange(_GROUP) * width, np.arange(width * _GROUP, n)
                best = np.empty((rows, take), np.int64)
                for r in range(rows):
                    groups = np.flatnonzero(maxima[r] >= kth[r])
                    columns = np.concatenate(((groups[:, None] + spread).ravel(), tail))
                    best[r] = columns[np.lexsort((columns, -scores[r, columns]))[:take]]
                return best
        top = np.argpartition(-scores, take - 1, axis=1)[:, :take]
    top_scores = np.take_along_axis(scores, top, axis=1)
    order = np.lexsort((top, -top_scores), axis=1)  # best score first, then lower column
    return np.take_along_axis(top, order, axis=1).astype(np.int64, copy=False)


def brute_force_search(
    queries: np.ndarray, corpus: np.ndarray, k: int, metric: str = "cosine"
) -> tuple[np.ndarray, np.ndarray]:
    """Exact top-k by score (`score_matrix`): (D (nq, w) float32, I (nq, w) int64) with w = min(k, corpus rows):
    a k beyond the corpus returns what there is (memory bounded by the answer, never by k).

    I holds row numbers of `corpus`; equal scores are ordered by row number.
    """
    queries = _as_vectors(queries, what="queries")
    corpus = np.asarray(corpus)
    if corpus.size == 0:
        corpus = np.empty((0, queries.shape[1]), np.float32)
    corpus = _as_vectors(corpus, queries.shape[1], "corpus")
    nq, n = len(queries), len(corpus)
    take = min(_as_count(k), n)
    D = np.full((nq, take), -np.inf, dtype=np.float32)
    I = np.full((nq, take), -1, dtype=np.int64)
    if take == 0 or nq == 0:
        return D, I
    step = max(1, _BLOCK // n)  # queries per block: bounds the (block, n) score matrix
    # Cosine scores go into one buffer reused by every block (a fresh array per block faults its pages in again).
    buffer = np.empty((min(step, nq), n), np.float32) if check_metric(metric) == "cosine" else None
    for start in range(0, nq, step):
        block = queries[start : start + step]
        if buffer is None:
            scores = score_matrix(block, corpus, metric)  # (block, n)
        else:
            scores = np.matmul(block, corpus.T, out=buffer[: len(block)])  # = score_matrix's product
        top = _best_columns(scores, take)
        I[start : start + step, :take] = top
        D[start : start + step, :take] = np.take_along_axis(scores, top, axis=1)
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
    only that many. Ties: class order, except that the best class always comes first. Every score is
    `score_matrix`'s (float64, rounded once: the same whatever batch the query came in); where the float32 argmax
    that chose the best class split a near-tie the other way, a score is capped at the best class's so the ranking
    stays best first. Compares equal to the list it stands for; pickles as that list.
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
        s = score_matrix(self._query[None, :], self._prototypes, self._metric)[0]
        s[self._best] = self._best_score
        return np.minimum(s, np.float32(self._best_score), out=s)

    def _prefix_scores(self, count: int) -> np.ndarray:
        """(C,) scores enough to rank the first `count` entries: `_scores`' value for every class that float32
        rounding could put among them, -inf for the rest. One float32 product finds those classes without the
        float64 copy of all (C, D) prototypes that `score_matrix` makes (5x faster for a top-5 over 100k classes)."""
        prototypes, query = self._prototypes, self._query
        rough = prototypes @ query  # (C,) float32; Euclidean: 2 q.p - |p|^2 orders classes as minus the distance
        squared = np.einsum("cd,cd->c", prototypes, prototypes)
        if self._metric == "euclidean":
            rough = 2 * rough - squared
        # A float32 sum of D products errs by at most D * eps * sum |q_i p_i| <= D * eps * |q| |p| (plus |p|^2 for
        # the Euclidean form): a class outside the margin cannot overtake the count-th best once scored exactly.
        norm = float(np.sqrt(squared.max(initial=0.0)))
        scale = float(np.linalg.norm(query)) * norm * (2 if self._metric == "euclidean" else 1) + (
            norm * norm if self._metric == "euclidean" else 0.0)
        margin = 4 * len(query) * float(np.finfo(np.float32).eps) * max(scale, 1e-30)
        kth = np.partition(rough, len(rough) - count)[len(rough) - count]
        near = np.flatnonzero(rough >= kth - margin)
        s = np.full(len(rough), -np.inf, np.float32)
        s[near] = score_matrix(query[None, :], prototypes[near], self._metric)[0]
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
                s = self._prefix_scores(stop)
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
    """(best class (nq,) int64, its score (nq,) float32) of each query.

    The best class: blocks of queries through one float32 matrix product each, argmax = the first best class, as a
    stable sort would rank it (Euclidean: the argmax of 2 q.p - |p|^2, the same order as minus the distance). Its
    score: `pair_scores`, the float64 formula of `score_matrix`, so entry 0 of a `Ranking` is on the scale of the
    rest. The products go into one buffer reused by every block (a fresh 64 MB array per block spent as long
    faulting its pages in as the product took: measured 1,349 vs 2,208 q/s over 100k classes on the shared 2-core
    machine).
    """
    nq = len(queries)
    best = np.zeros(nq, np.int64)
    step = max(1, _BLOCK // max(1, len(prototypes)))
    buffer = np.empty((max(1, min(step, nq)), len(prototypes)), np.float32)
    squared_norms = np.einsum("cd,cd->c", prototypes, prototypes) if metric == "euclidean" else None
    for start in range(0, nq, step):
        block = queries[start : start + step]
        products = np.matmul(block, prototypes.T, out=buffer[: len(block)])
        if squared_norms is not None:
            products *= 2
            products -= squared_norms
        best[start : start + len(block)] = products.argmax(axis=1)
    return best, pair_scores(queries, prototypes[best], metric)


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


KNN_SCORES = ("vote", "mean")  # what rank_by_knn reports per class: the vote itself, or the mean similarity


def rank_by_knn(
    hit_labels: Sequence[Sequence[str | None]], hit_scores: np.ndarray, k: int, metric: str = "cosine",
    scores: str = "vote",
) -> list[list[tuple[str, float]]]:
    """Score-weighted vote of the top-k hits: a class's vote is the sum of its hits' similarities (cosine), or of
    1 / (1 + distance) under the Euclidean metric (a vote must be positive and shrink with the distance; a sum of
    negative distances would rank a class lower for every extra neighbour it has).

    `hit_labels` (nq, >=k) holds each hit's label (None for a missing hit, FAISS id -1); ties in the vote are broken
    by the class's best single similarity. Only classes with at least one hit appear in the ranking. Classes are
    always ranked by the vote; `scores` says what each entry carries: "vote" (the vote itself) or "mean" (the mean
    score of the class's hits among the k, on the index's own scale: a cosine, or minus a distance; what
    `classify --method knn` reports).
    """
    if scores not in KNN_SCORES:
        raise InvalidInputError(f"unknown kNN scores {scores!r}; choose from {', '.join(KNN_SCORES)}")
    similarities = np.atleast_2d(np.asarray(hit_scores, dtype=np.float64))  # (nq, >=k), the index's scale
    hit_scores = similarities
    if check_metric(metric) == "euclidean":
        hit_scores = 1.0 / (1.0 - hit_scores)  # score = -distance -> 1 / (1 + distance) in (0, 1]; -inf -> 0
    if len(hit_labels) != len(hit_scores):
        raise InvalidInputError(f"{len(hit_labels)} rows of hit labels but {len(hit_scores)} rows of scores")
    k = _as_count(k)
    rankings = []
    for labels, weights, sims in zip(hit_labels, hit_scores, similarities):
        votes: dict[str, float] = {}
        best: dict[str, float] = {}
        sums: dict[str, float] = {}
        counts: dict[str, int] = {}
        for label, weight, sim in list(zip(labels, weights, sims))[:k]:
            if label is None or not np.isfinite(weight):
                continue
            votes[label] = votes.get(label, 0.0) + float(weight)
            best[label] = max(best.get(label, -np.inf), float(weight))
            sums[label] = sums.get(label, 0.0) + float(sim)
            counts[label] = counts.get(label, 0) + 1
        ranked = sorted(votes, key=lambda c: (-votes[c], -best[c], c))
        if scores == "mean":
            rankings.append([(c, sums[c] / counts[c]) for c in ranked])
        else:
            rankings.append([(c, votes[c]) for c in ranked])
    if any(not r for r in rankings):
        raise InvalidInputError("a query has no neighbours to vote")
    return rankings


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
    as_target_far(target_far)
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
