"""Training samplers over integer class labels: genuine / impostor pairs, P x K class-balanced batches, N-way K-shot
episodes. Numpy only; every sampler draws from its own seeded generator, so a seed fixes what it yields."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from siamesedb.errors import InvalidInputError


def _group_by_class(labels: Sequence[int]) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """(labels (n,) int64, order (n,), offsets (C,), counts (C,)): the items of class position c, ascending, are
    order[offsets[c] : offsets[c] + counts[c]] — so a uniform item of class c is one integer draw, no Python loop."""
    labels = np.asarray(labels, dtype=np.int64).reshape(-1)
    _, inverse, counts = np.unique(labels, return_inverse=True, return_counts=True)
    order = np.argsort(inverse, kind="stable")
    offsets = np.concatenate([[0], np.cumsum(counts)[:-1]]).astype(np.int64)
    return labels, order, offsets, counts.astype(np.int64)


def _members(order: np.ndarray, offsets: np.ndarray, counts: np.ndarray) -> list[np.ndarray]:
    return [order[o : o + c] for o, c in zip(offsets, counts)]


class PairSampler:
    """Random genuine / impostor pairs for contrastive and pairwise losses: half same-class, half different.

    Genuine pairs: a class uniformly among those with two or more items, then two different items of it. Impostor
    pairs: two different classes uniformly, one item of each. `forgery_of` maps a forged class to the genuine class it
    imitates (`U01/forged` -> `U01/genuine`). Forged classes never form genuine pairs; a `hard_fraction` of the
    impostor pairs is (genuine item, its skilled forgery), the hardest negatives there are.
    """

    def __init__(self, labels: Sequence[int], seed: int = 0, forgery_of: dict[int, int] | None = None,
                 hard_fraction: float = 0.5):
        self.labels, self.order, self.offsets, self.counts = _group_by_class(labels)
        self.rng = np.random.default_rng(seed)
        classes = np.unique(self.labels)
        position = {int(c): i for i, c in enumerate(classes)}
        self.members = _members(self.order, self.offsets, self.counts)
        # forged class position -> genuine class position, for the classes present in `labels`
        self.forgeries = {position[f]: position[g] for f, g in (forgery_of or {}).items()
                          if f in position and g in position}
        self.pairable = np.asarray([c for c, n in enumerate(self.counts) if n >= 2 and c not in self.forgeries],
                                   dtype=np.int64)
        self.forged_classes = np.asarray(sorted(self.forgeries), dtype=np.int64)
        self.genuine_of = np.full(len(classes), -1, dtype=np.int64)
        for forged, genuine in self.forgeries.items():
            self.genuine_of[forged] = genuine
        self.hard_fraction = float(hard_fraction) if len(self.forged_classes) else 0.0
        if len(classes) < 2 or len(self.pairable) == 0:
            raise InvalidInputError("pairs need at least two classes and one class with two items")

    def _item_of(self, classes: np.ndarray) -> np.ndarray:
        """One uniformly drawn item index of each class position in `classes`."""
        return self.order[self.offsets[classes] + self.rng.integers(0, self.counts[classes])]

    def sample(self, n: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(idx_a (n,) int64, idx_b (n,) int64, same (n,) float32): the first n // 2 genuine, the rest impostor."""
        if n < 0:
            raise InvalidInputError(f"number of pairs must be >= 0, got {n}")
        n_same, n_diff = n // 2, n - n // 2
        # Genuine: positions i != j inside one class (j drawn from the count - 1 others, then shifted past i).
        cls = self.rng.choice(self.pairable, size=n_same)
        i = self.rng.integers(0, self.counts[cls])
        j = self.rng.integers(0, self.counts[cls] - 1)
        j += j >= i
        base = self.offsets[cls]
        same_a, same_b = self.order[base + i], self.order[base + j]
        # Impostor: two different classes (cb drawn from the C - 1 others, then shifted past ca) ...
        n_classes = len(self.counts)
        ca = self.rng.integers(0, n_classes, size=n_diff)
        cb = self.rng.integers(0, n_classes - 1, size=n_diff)
        cb += cb >= ca
        if self.hard_fraction:
            # ... or, for a hard_fraction of them, a genuine class and its own forgeries.
            hard = self.rng.random(n_diff) < self.hard_fraction
            forged = self.rng.choice(self.forged_classes, size=n_diff)
            ca = np.where(hard, self.genuine_of[forged], ca)
            cb = np.where(hard, forged, cb)
        a = np.concatenate([same_a, self._item_of(ca)]).astype(np.int64)
        b = np.concatenate([same_b, self._item_of(cb)]).astype(np.int64)
        same = np.zeros(n, dtype=np.float32)
        same[:n_same] = 1.0
        return a, b, same


class ClassBalancedSampler:
    """P x K batches: P distinct classes, K items each (for triplet mining).

    A class with fewer than K items gives all it has plus repeats (drawn with replacement); others give K distinct.
    """

    def __init__(self, labels: Sequence[int], classes_per_batch: int, per_class: int, seed: int = 0):
        self.labels, order, offsets, counts = _group_by_class(labels)
        self.members = _members(order, offsets, counts)
        if classes_per_batch < 1 or per_class < 1:
            raise InvalidInputError(f"need P >= 1 and K >= 1, got P={classes_per_batch}, K={per_class}")
        if classes_per_batch > len(self.members):
            raise InvalidInputError(f"{classes_per_batch} classes per batch but only {len(self.members)} classes")
        self.p, self.k = classes_per_batch, per_class
        self.rng = np.random.default_rng(seed)

    def sample(self) -> np.ndarray:
        """(P*K,) indices, class-major: K items of the first class, then K of the second..."""
        out = []
        for c in self.rng.choice(len(self.members), size=self.p, replace=False):
            m = self.members[c]
            out.append(self.rng.choice(m, size=self.k, replace=len(m) < self.k))
        return np.concatenate(out).astype(np.int64)


class EpisodeSampler:
    """N-way K-shot episodes for prototypical training and evaluation: disjoint support and query items per class."""

    def __init__(self, labels: Sequence[int], way: int, shot: int, queries: int, seed: int = 0,
                 forgery_of: dict[int, int] | None = None, group_of_class: dict[int, int] | None = None,
                 within_group: float = 0.0):
        """`forgery_of` (forged class label -> genuine class label): an episode that draws a genuine class also draws
        its skilled forgeries as another class, so the loss must tell each writer from their imitators.

        `group_of_class` (class label -> group id, e.g. its alphabet) and `within_group` (a fraction): that share of
        episodes draws all its classes from one group, picked uniformly, at most `way` of them (fewer when the group
        is smaller, so those episodes are narrower): the look-alike rivals of Omniglot's within-alphabet test.
        """
        if way < 1 or shot < 1 or queries < 0:
            raise InvalidInputError(f"need way >= 1, shot >= 1, queries >= 0; got {way}, {shot}, {queries}")
        self.labels, order, offsets, counts = _group_by_class(labels)
        self.members = _members(order, offsets, counts)
        self.eligible = np.asarray([c for c, n in enumerate(counts) if n >= shot + queries], dtype=np.int64)
        if len(self.eligible) < way:
            raise InvalidInputError(f"only {len(self.eligible)} classes have {shot + queries} items; need {way}")
        self.way, self.shot, self.queries = way, shot, queries
        self.rng = np.random.default_rng(seed)
        # Class positions (indices into members): genuine position -> its eligible forged position.
        position = {int(label): c for c, label in enumerate(np.unique(self.labels))}
        eligible = set(self.eligible.tolist())
        self.forged_position = {position[g]: position[f] for f, g in (forgery_of or {}).items()
                                if f in position and g in position and position[f] in eligible}
        if not 0.0 <= within_group <= 1.0:
            raise InvalidInputError(f"within_group must be a fraction in [0, 1], got {within_group}")
        self.within_group = within_group if group_of_class else 0.0
        self.group_members: list[np.ndarray] = []  # per group: its eligible class positions (groups of >= 2 only)
        if self.within_group:
            by_group: dict[int, list[int]] = {}
            for label, c in position.items():
                if c in eligible and label in group_of_class:
                    by_group.setdefault(int(group_of_class[label]), []).append(c)
            self.group_members = [np.asarray(sorted(m), dtype=np.int64) for _, m in sorted(by_group.items()) if len(m) >= 2]
            if not self.group_members:
                raise InvalidInputError("within_group episodes need a group with at least two eligible classes")

    def _classes(self) -> np.ndarray:
        """`way` distinct class positions; with forgeries, each drawn genuine class brings its forged class along."""
        # The coin is only tossed when within-group episodes are asked for, so other runs draw what they always did.
        if self.within_group and self.rng.random() < self.within_group:
            group = self.group_members[self.rng.integers(len(self.group_members))]
            return self.rng.choice(group, size=min(self.way, len(group)), replace=False)
        if not self.forged_position:
            return self.rng.choice(self.eligible, size=self.way, replace=False)
        forged = set(self.forged_position.values())
        chosen: list[int] = []
        for c in self.rng.permutation(self.eligible).tolist():
            if len(chosen) == self.way:
                break
            if c in forged or c in chosen:
                continue  # forged classes come in with their genuine class, or fill the episode at the end
            chosen.append(c)
            if c in self.forged_position and len(chosen) < self.way:
                chosen.append(self.forged_position[c])
        if len(chosen) < self.way:
            spare = [c for c in self.eligible.tolist() if c not in chosen]
            chosen += self.rng.choice(spare, size=self.way - len(chosen), replace=False).tolist()
        return np.asarray(chosen, dtype=np.int64)

    def sample(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(support (w*shot,), query (w*queries,), query episode labels (w*queries,) in 0..w-1), w = `way` (or
        fewer in a within-group episode of a small group: w = len(support) // shot).

        Both index arrays are class-major; the support's episode labels are np.repeat(arange(w), shot).
        """
        support, query = [], []
        classes = self._classes()
        for c in classes:
            picked = self.rng.choice(self.members[c], size=self.shot + self.queries, replace=False)
            support.append(picked[: self.shot])
            query.append(picked[self.shot :])
        return (np.concatenate(support).astype(np.int64), np.concatenate(query).astype(np.int64),
                np.repeat(np.arange(len(classes)), self.queries))

