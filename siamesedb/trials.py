"""Genuine / impostor verification trials over (N, D) vectors: skilled-forgery reference sets, image pairs, one-shot
reference sets, and the ROC AUC of their scores. Array level: `evaluation` encodes folders and reports on these.

Every score is the product's own (`scoring`: pair scores, matrix scores, class prototypes; `rules.verification_score`
for the verification rules), so a trial measures what `verify` would answer.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np

from siamesedb.errors import InvalidInputError
from siamesedb.data import FORGED, GENUINE, group_of
from siamesedb.rules import verification_score
from siamesedb.samplers import PairSampler
from siamesedb.scoring import check_metric, class_prototypes, score_matrix
from siamesedb.scoring import pair_scores as row_pair_scores


def roc_auc(genuine: np.ndarray, impostor: np.ndarray) -> float:
    """Area under the ROC curve: P(genuine score > impostor score) + half P(equal) (Mann-Whitney U / (G * I))."""
    genuine = np.asarray(genuine, dtype=np.float64)
    impostor = np.sort(np.asarray(impostor, dtype=np.float64))
    if len(genuine) == 0 or len(impostor) == 0:
        raise InvalidInputError("AUC needs genuine and impostor scores")
    below = np.searchsorted(impostor, genuine, side="left")
    equal = np.searchsorted(impostor, genuine, side="right") - below
    return float((below + 0.5 * equal).sum() / (len(genuine) * len(impostor)))


def rates_at(genuine: np.ndarray, impostor: np.ndarray, threshold: float) -> tuple[float, float]:
    """(false-accept rate, false-reject rate) when `verify` accepts every score >= `threshold`."""
    return float(np.mean(impostor >= threshold)), float(np.mean(genuine < threshold))


def reference_trials(
    vectors: np.ndarray,
    labels: list[str],
    groups: list[str],
    references: int,
    repeats: int,
    rng: np.random.Generator,
    rule: str = "prototype",
    metric: str = "cosine",
) -> tuple[np.ndarray, np.ndarray]:
    """Scores of (genuine queries, skilled forgeries) against `references` random genuine items of their own group.

    Each group needs classes `<group>/genuine` and `<group>/forged`; `repeats` draws of the reference set per group.
    """
    genuine_scores: list[float] = []
    forged_scores: list[float] = []
    for _, refs, others, forged in reference_draws(labels, groups, references, repeats, rng):
        support = vectors[refs]
        genuine_scores.extend(verification_score(vectors[i], support, rule, metric) for i in others)
        forged_scores.extend(verification_score(vectors[i], support, rule, metric) for i in forged)
    return np.asarray(genuine_scores), np.asarray(forged_scores)


def reference_draws(labels: list[str], groups: list[str], references: int, repeats: int,
                    rng: np.random.Generator) -> Iterator[tuple[str, np.ndarray, np.ndarray, np.ndarray]]:
    """(group, reference indices, the group's other genuine indices, its forged indices): `repeats` draws of
    `references` genuine items per group, in group order, consuming `rng` one permutation a draw."""
    label_array = np.asarray(labels, dtype=object)
    for group in groups:
        genuine = np.flatnonzero(label_array == f"{group}/{GENUINE}")
        forged = np.flatnonzero(label_array == f"{group}/{FORGED}")
        if len(genuine) <= references:
            raise InvalidInputError(f"group {group!r} has {len(genuine)} genuine items; {references} references leave none to query")
        for _ in range(repeats):
            chosen = rng.permutation(genuine)
            yield group, chosen[:references], chosen[references:], forged


def pair_scores(vectors: np.ndarray, a: np.ndarray, b: np.ndarray, metric: str) -> np.ndarray:
    """(n,) scores of the pairs (vectors[a[i]], vectors[b[i]]): cosine, or minus the Euclidean distance."""
    return row_pair_scores(vectors[a], vectors[b], check_metric(metric))


def sampled_pairs(vectors: np.ndarray, codes: np.ndarray, pairs: int, seed: int, metric: str,
                  forgery_of: dict[int, int] | None = None) -> tuple[np.ndarray, np.ndarray]:
    """(scores (pairs,), same (pairs,) 1 genuine / 0 impostor) of `pairs` seeded `PairSampler` pairs (half each) of
    items with integer class `codes` (N,), in drawing order; `forgery_of` (forged class -> genuine class) makes
    skilled forgeries part of the impostors."""
    a, b, same = PairSampler(codes, seed=seed, forgery_of=forgery_of).sample(pairs)
    return pair_scores(vectors, a, b, metric), same


def group_pair_trials(vectors: np.ndarray, labels: list[str], groups: set[str], pairs: int, seed: int,
                      metric: str) -> tuple[np.ndarray, np.ndarray]:
    """(genuine scores, impostor scores) of `sampled_pairs` among the images whose label's group (first component)
    is one of `groups`."""
    rows = np.flatnonzero([group_of(label) in groups for label in labels])
    _, codes = np.unique(np.asarray(labels, dtype=object)[rows].astype(str), return_inverse=True)
    scores, same = sampled_pairs(vectors[rows], codes.reshape(-1), pairs, seed, metric)
    return scores[same == 1], scores[same == 0]


def oneshot_verification_trials(
    vectors: np.ndarray,
    labels: Sequence[Any],
    references: int = 1,
    impostors: str = "group",
    seed: int = 0,
    metric: str = "cosine",
    skip: frozenset[str] | set[str] = frozenset(),
) -> tuple[np.ndarray, np.ndarray]:
    """Scores of (genuine (G,), impostor (I,)) verification trials against per-class reference sets.

    Classes named in `skip` get no reference set (no trials of their own) but their items still serve as
    impostors: skilled-forgery classes `X/forged`, which are impostors of `X/genuine` and never a claimed identity.

    Every class gets `references` random items of its own as its reference set (its prototype: the normalised mean,
    or the plain mean for Euclidean encoders). Genuine trials: the class's other items against it. Impostor trials:
    every item of every other class of the same group (first label component: the same alphabet, the look-alikes a
    user must tell apart) with `impostors="group"`, or of every other class with `impostors="any"`.
    Scored through `scoring.score_matrix`, the product's own scoring, in (items, classes) row blocks.
    """
    if impostors not in ("group", "any"):
        raise InvalidInputError(f"impostors must be 'group' or 'any', got {impostors!r}")
    if references < 1:
        raise InvalidInputError(f"references must be at least 1, got {references}")
    label_array = np.asarray(labels, dtype=object).astype(str)
    classes, inverse = np.unique(label_array, return_inverse=True)
    inverse = inverse.reshape(-1)
    rng = np.random.default_rng(seed)
    is_reference = np.zeros(len(label_array), dtype=bool)
    prototypes = np.empty((len(classes), vectors.shape[1]), dtype=np.float32)
    claimable = np.asarray([name not in skip for name in classes])
    for c in range(len(classes)):
        members = np.flatnonzero(inverse == c)
        if not claimable[c]:
            prototypes[c] = 0.0
            continue
        if len(members) <= references:
            raise InvalidInputError(f"class {classes[c]!r} has {len(members)} items; {references} references leave none to verify")
        chosen = rng.choice(members, size=references, replace=False)
        is_reference[chosen] = True
        prototypes[c] = class_prototypes(vectors[chosen], [classes[c]] * references, metric=metric)[1][0]
    group_of_class = np.asarray([group_of(name) for name in classes], dtype=object)
    group_codes = np.unique(group_of_class, return_inverse=True)[1].reshape(-1)
    item_group = group_codes[inverse]
    genuine, impostor = [], []
    for start in range(0, len(vectors), 4096):
        rows = np.arange(start, min(start + 4096, len(vectors)))
        scores = score_matrix(vectors[rows].astype(np.float32), prototypes, metric)  # (rows, C)
        own = inverse[rows]
        keep = ~is_reference[rows] & claimable[own]
        genuine.append(scores[np.arange(len(rows)), own][keep])
        other = np.ones_like(scores, dtype=bool)
        other[np.arange(len(rows)), own] = False
        other &= claimable[None, :]
        if impostors == "group":
            other &= item_group[rows][:, None] == group_codes[None, :]
        impostor.append(scores[other])
    impostor_scores = np.concatenate(impostor).astype(np.float64)
    if len(impostor_scores) == 0:
        raise InvalidInputError("no two classes share a group (first label component), so there are no same-group "
                                "impostors; use impostors='any' (--impostors any)")
    return np.concatenate(genuine).astype(np.float64), impostor_scores
