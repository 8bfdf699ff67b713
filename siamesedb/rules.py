"""The verification rules: a registry of how one query scores against a class's support set, and the
leave-one-out genuine / impostor scores a rule's threshold is calibrated on. numpy only.

A new rule is one `VerifyRule` in `REGISTRY`: its score of one query, and its (N, C) leave-one-out scores of a
labelled support set (vectorised: calibration scores every item against every class). The CLI choices, the HTTP
API's and every check read the registry.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import partial

import numpy as np

from siamesedb.errors import InvalidInputError
from siamesedb.scoring import _as_vectors, check_metric, normalize, score_matrix

DEFAULT_RULE = "prototype"  # the rule of `calibrate`, and of `verify` on an index calibrated for none
_CONSISTENCY_ROWS = 1024  # left-out items per block in _consistencies / _spreads
_MIN_CONSISTENCY = 0.1  # floor of the reference consistency "relative" divides by (near-orthogonal references)
_MIN_SPREAD = 1e-6  # floor of the reference spread "relative" divides by under the Euclidean metric
_BLOCK = 1 << 24  # most similarities held at once by _reference_scores (~64 MB of float32)


@dataclass(frozen=True)
class VerifyRule:
    """One verification rule: `score(query (D,), support (M, D), metric) -> float`, and `left_out(vectors (N, D),
    inverse (N,) class codes, sizes (C,), metric) -> (N, C) float64`: every item scored against every class's
    support set, itself left out of its own class."""

    name: str
    description: str  # one line, for help texts
    score: Callable[[np.ndarray, np.ndarray, str], float]
    left_out: Callable[[np.ndarray, np.ndarray, np.ndarray, str], np.ndarray]
    # Whether the rule's score is a pair score (a cosine, or minus a distance, to references): then the encoder's
    # pair threshold is on its scale and serves where the index holds no calibration of the rule. "relative"
    # divides by the references' consistency, another scale: it needs a calibration of its own.
    pair_scale: bool = True


def check_rule(rule: str) -> str:
    """`rule` itself when the registry holds it, else InvalidInputError naming the choices."""
    if rule not in VERIFY_RULES:
        raise InvalidInputError(f"unknown rule {rule!r}; choose from {', '.join(VERIFY_RULES)}")
    return rule


def get_rule(rule: str) -> VerifyRule:
    """The registered rule named `rule` (checked by `check_rule`)."""
    return REGISTRY[check_rule(rule)]


def verification_score(query: np.ndarray, support: np.ndarray, rule: str = DEFAULT_RULE, metric: str = "cosine") -> float:
    """Similarity of one (D,) query to an (M, D) support set under a rule of the registry (see each rule's
    description); under metric="euclidean" every cosine becomes minus a distance."""
    support = np.asarray(support)
    if support.size == 0:
        raise InvalidInputError("empty support set")
    support = _as_vectors(support, what="support")
    query = _as_vectors(query, support.shape[1], "query")
    if len(query) != 1:
        raise InvalidInputError(f"verification_score takes one query vector, got {len(query)}")
    metric = check_metric(metric)
    return get_rule(rule).score(query[0], support, metric)


# ------------------------------------------------------------------------------------- one query against its support


def _prototype_score(query: np.ndarray, support: np.ndarray, metric: str) -> float:
    """Cosine to the normalised sum of the references; Euclidean: minus the distance to their plain mean."""
    if metric == "euclidean":
        return -float(np.linalg.norm(query.astype(np.float64) - support.mean(axis=0, dtype=np.float64)))
    return float(normalize(support.sum(axis=0)) @ query)


def _relative_score(query: np.ndarray, support: np.ndarray, metric: str) -> float:
    """The prototype score in units of how alike the references are: divided by their consistency (cosine) or
    spread (Euclidean), so a writer whose genuine references vary a lot is held to a lower bar."""
    spread = reference_spread(support) if metric == "euclidean" else reference_consistency(support)
    return _prototype_score(query, support, metric) / spread


def _best_of_score(query: np.ndarray, support: np.ndarray, metric: str, best_of: int) -> float:
    """The mean score of the best min(`best_of`, M) single references."""
    scores = score_matrix(query[None, :], support, metric)[0] if metric == "euclidean" else support @ query
    if best_of == 1:
        return float(scores.max())
    return float(np.sort(scores)[::-1][: min(best_of, len(scores))].mean())


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


# ------------------------------------------------------------------------------ leave-one-out scores (calibration)


def genuine_impostor_scores(
    vectors: np.ndarray, labels: Sequence[str], rule: str = DEFAULT_RULE, metric: str = "cosine",
    require_genuine: bool = True,
) -> tuple[np.ndarray, np.ndarray]:
    """Leave-one-out scores inside a support set: (genuine (G,), impostor (I,)) float64.

    Each item of a class with at least two members is scored against its own class without itself (genuine), and
    every item is scored against every other class's full support set (impostor). Order: item by item, and within an
    item, classes sorted by label. Vectorised: seconds, not hours, for ten thousand items in hundreds of classes.
    With `require_genuine=False` a support set of one item per class gives an empty genuine array instead of an error.
    """
    left_out = get_rule(rule).left_out
    vectors = _as_vectors(vectors)
    if len(vectors) != len(labels):
        raise InvalidInputError(f"{len(vectors)} vectors but {len(labels)} labels")
    classes, inverse = np.unique(np.asarray(labels, dtype=object).astype(str), return_inverse=True)
    inverse = inverse.reshape(-1)
    sizes = np.bincount(inverse, minlength=len(classes))
    if require_genuine and not (sizes >= 2).any():  # a one-shot support set has impostor pairs only
        raise InvalidInputError("calibration needs at least one class with two or more items (genuine pairs)")
    rows = np.arange(len(vectors))
    scores = left_out(vectors, inverse, sizes, check_metric(metric))  # (N, C), item i left out of its own class
    genuine = scores[rows, inverse][sizes[inverse] >= 2]
    other = np.ones_like(scores, dtype=bool)
    other[rows, inverse] = False
    return genuine, scores[other]  # boolean indexing walks row-major: item by item, classes in label order


def _prototype_table(
    vectors: np.ndarray, inverse: np.ndarray, sizes: np.ndarray, metric: str
) -> tuple[np.ndarray, np.ndarray]:
    """((N, C) "prototype" scores with each item left out of its own class, (C, D) float64 class sums)."""
    rows = np.arange(len(vectors))
    sums = np.zeros((len(sizes), vectors.shape[1]), dtype=np.float64)  # (C, D) class sums
    np.add.at(sums, inverse, vectors)
    if metric == "euclidean":
        # Plain means; the item's own class without it: (S - v) / (m - 1) (only used where m >= 2).
        scores = score_matrix(vectors.astype(np.float64), sums / sizes[:, None], metric)
        own = (sums[inverse] - vectors) / np.maximum(sizes[inverse] - 1, 1)[:, None]
        scores[rows, inverse] = -np.linalg.norm(vectors - own, axis=1)
    else:
        scores = (vectors @ normalize(sums).T).astype(np.float64)
        own = normalize(sums[inverse] - vectors)  # (N, D) own-class prototype without the item itself
        scores[rows, inverse] = np.einsum("nd,nd->n", own, vectors)
    return scores, sums


def _left_out_prototype(vectors: np.ndarray, inverse: np.ndarray, sizes: np.ndarray, metric: str) -> np.ndarray:
    return _prototype_table(vectors, inverse, sizes, metric)[0]


def _left_out_relative(vectors: np.ndarray, inverse: np.ndarray, sizes: np.ndarray, metric: str) -> np.ndarray:
    """The prototype scores divided by each class's consistency (spread); an item's own class: its consistency
    without the item."""
    scores, sums = _prototype_table(vectors, inverse, sizes, metric)
    whole, without = (_spreads if metric == "euclidean" else _consistencies)(vectors, inverse, sizes, sums)
    rows = np.arange(len(vectors))
    scores /= whole[None, :]
    scores[rows, inverse] *= whole[inverse] / without
    return scores


def _reference_scores(
    vectors: np.ndarray, inverse: np.ndarray, sizes: np.ndarray, metric: str, best_of: int
) -> np.ndarray:
    """(N, C) scores of every item against every class's references, the item left out: the mean of the best
    min(`best_of`, m) of a class's m references (best_of 1: the best one, "max"; 3: "mean_top3").

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
            if best_of == 1:
                scores[start:stop, members] = block.max(axis=2)
                continue
            t = min(best_of, m)
            top = -np.sort(-np.partition(block, m - t, axis=2)[..., m - t :], axis=2)  # (rows, k, t) best first
            value = top.mean(axis=2, dtype=np.float64)  # (rows, k)
            mine = np.flatnonzero(own_size == m)
            if 2 <= m <= best_of and len(mine):
                # Own class holds m - 1 references: average the best m - 1 (the left-out item sorts last at -inf).
                where = slot[inverse[start + mine]]
                value[mine, where] = top[mine, where, : m - 1].mean(axis=1, dtype=np.float64)
            scores[start:stop, members] = value
    return scores


REGISTRY: dict[str, VerifyRule] = {
    rule.name: rule
    for rule in (
        VerifyRule("prototype", "cosine to the normalised mean of the references (Euclidean: minus the distance "
                   "to their mean)", _prototype_score, _left_out_prototype),
        VerifyRule("max", "the best single reference", partial(_best_of_score, best_of=1),
                   partial(_reference_scores, best_of=1)),
        VerifyRule("mean_top3", "the mean of the best three references (less swayed by one outlier than max)",
                   partial(_best_of_score, best_of=3), partial(_reference_scores, best_of=3)),
        VerifyRule("relative", "the prototype score divided by the references' own consistency (Euclidean: "
                   "their spread)", _relative_score, _left_out_relative, pair_scale=False),
    )
}
VERIFY_RULES = tuple(REGISTRY)  # the rule names, in the registry's order (CLI choices, HTTP API)
