"""The one N-way K-shot episode runner, numpy only: draw episodes with an explicit rng, score them as the product does.

An episode picks `way` classes and, per class, `shot` support items and `queries` query items, all distinct. Each
query is answered by its best class prototype (`class_prototypes` + the same matrix scores a classify uses), so an
episode measures the product, not a side path. Two ways to pick the classes:

- unstructured: `way` classes uniformly among those with `shot + queries` items;
- within-group (`within_group=True`, Lake, Salakhutdinov & Tenenbaum's one-shot task on Omniglot): all `way` classes
  from one group (an alphabet); where every item has a drawer, the support items are by shared drawers and the
  queries by another one, common to every class of the episode.

Training's validation, its final held-out score, distillation's validation and `evaluation`'s protocols all run
through `run_episodes`.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from siamesedb.errors import InvalidInputError
from siamesedb.scoring import check_metric, class_prototypes, score_matrix


@dataclass(frozen=True)
class EpisodeScores:
    """How many queries each episode asked and how many its best prototype answered right: (E,) int64 each."""

    correct: np.ndarray
    asked: np.ndarray

    @property
    def accuracies(self) -> np.ndarray:
        """(E,) float64: the accuracy of each episode."""
        return self.correct / self.asked

    @property
    def pooled(self) -> float:
        """Every query of every episode counted alike: correct answers over all queries asked."""
        return float(self.correct.sum() / self.asked.sum())


def mean_ci95(accuracies: np.ndarray) -> tuple[float, float]:
    """(mean, 95% confidence half-width = 1.96 standard errors) of per-episode accuracies; NaN half-width for one."""
    episodes = len(accuracies)
    ci = 1.96 * accuracies.std(ddof=1) / math.sqrt(episodes) if episodes > 1 else float("nan")
    return float(accuracies.mean()), float(ci)


def index_classes(labels: Sequence[Any], shot: int, queries: int, way: int, within_group: bool = False,
                  groups: Sequence[str] | None = None) -> tuple[dict[Any, np.ndarray], dict[str, list[Any]]]:
    """(class -> its item indices ascending, group -> its classes sorted) over the classes with `shot + queries`
    items, classes in sorted order; InvalidInputError when fewer than `way` classes (or, within groups, no group of
    `way` classes) are eligible. `groups`: the group of each item (by default every class is its own group)."""
    names, inverse = np.unique(np.asarray(labels), return_inverse=True)
    inverse = inverse.reshape(-1)
    order = np.argsort(inverse, kind="stable")
    bounds = np.concatenate([[0], np.cumsum(np.bincount(inverse, minlength=len(names)))])
    needed = shot + queries
    by_class = {names[c]: order[bounds[c]: bounds[c + 1]] for c in range(len(names))
                if bounds[c + 1] - bounds[c] >= needed}
    if len(by_class) < way:
        raise InvalidInputError(f"only {len(by_class)} classes have {needed} images; a {way}-way episode needs {way}")
    classes_by_group: dict[str, list[Any]] = {}
    for name, members in by_class.items():
        classes_by_group.setdefault(groups[members[0]] if groups is not None else name, []).append(name)
    if within_group and not any(len(cs) >= way for cs in classes_by_group.values()):
        raise InvalidInputError(f"no group holds {way} classes with {needed} images each")
    return by_class, classes_by_group


def sample_episode(
    labels: np.ndarray,
    drawers: np.ndarray,
    way: int,
    shot: int,
    queries: int,
    rng: np.random.Generator,
    within_group: bool,
    by_class: dict[Any, np.ndarray],
    classes_by_group: dict[str, list[Any]],
) -> tuple[np.ndarray, np.ndarray]:
    """One episode: (support indices (way*shot,), query indices (way*queries,)), class-major order.

    `by_class` and `classes_by_group` as `index_classes` builds them; `drawers` (N,) object: each item's drawer or
    None (only read within groups). `labels` is not read: the indices of `by_class` say everything.
    """
    if within_group:
        groups = [g for g, cs in classes_by_group.items() if len(cs) >= way]
        group = groups[rng.integers(len(groups))]
        pool = classes_by_group[group]
    else:
        pool = list(by_class)
    chosen = [pool[i] for i in rng.choice(len(pool), size=way, replace=False)]
    support, queried = [], []
    if within_group and all(d is not None for d in drawers[np.concatenate([by_class[c] for c in chosen])]):
        # Lake's protocol: support drawers and the query drawer are shared by every class of the episode.
        common = set.intersection(*(set(drawers[by_class[c]]) for c in chosen))
        if len(common) < shot + queries:
            raise InvalidInputError(f"group {group!r}: only {len(common)} drawers drew all {way} classes")
        order = sorted(common)
        picked = [order[i] for i in rng.choice(len(order), size=shot + queries, replace=False)]
        support_drawers, query_drawers = set(picked[:shot]), picked[shot:]
        for c in chosen:
            members = by_class[c]
            support.extend(members[np.isin(drawers[members], list(support_drawers))][:shot])
            for d in query_drawers:
                queried.extend(members[drawers[members] == d][:1])
    else:
        for c in chosen:
            members = by_class[c]
            picked = rng.choice(len(members), size=shot + queries, replace=False)
            support.extend(members[picked[:shot]])
            queried.extend(members[picked[shot:]])
    return np.asarray(support, dtype=np.int64), np.asarray(queried, dtype=np.int64)


def run_episodes(
    vectors: np.ndarray,
    labels: Sequence[Any],
    way: int,
    shot: int,
    queries: int,
    episodes: int,
    rng: np.random.Generator,
    metric: str = "cosine",
    within_group: bool = False,
    groups: Sequence[str] | None = None,
    drawers: Sequence[str | None] | None = None,
) -> EpisodeScores:
    """`episodes` seeded N-way K-shot episodes over (N, D) `vectors` of `labels` (N,), drawn with `rng`, each query
    answered by its best class prototype under `metric` (cosine: normalised-mean prototypes; euclidean: plain means,
    nearest by distance; ties: the first class in label order). `groups` / `drawers`: each item's group and drawer,
    for within-group episodes."""
    if way < 2 or shot < 1 or queries < 1 or episodes < 1:
        raise InvalidInputError("need way >= 2, shot >= 1, queries >= 1, episodes >= 1")
    check_metric(metric)
    vectors = np.asarray(vectors, dtype=np.float32)
    names = np.asarray(labels, dtype=object).astype(str)  # the class names prototypes are built and compared under
    drawer_array = np.asarray([None] * len(names) if drawers is None else list(drawers), dtype=object)
    by_class, classes_by_group = index_classes(labels, shot, queries, way, within_group, groups)
    correct = np.empty(episodes, dtype=np.int64)
    asked = np.empty(episodes, dtype=np.int64)
    for e in range(episodes):
        support, queried = sample_episode(names, drawer_array, way, shot, queries, rng, within_group, by_class,
                                          classes_by_group)
        classes, prototypes = class_prototypes(vectors[support], names[support].tolist(), metric=metric)
        best = score_matrix(vectors[queried], prototypes, metric).argmax(axis=1)  # (queries,) the first best class
        correct[e] = int(np.sum(np.asarray(classes, dtype=object)[best] == names[queried]))
        asked[e] = len(queried)
    return EpisodeScores(correct, asked)
