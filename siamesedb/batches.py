"""Training batches by kind: the sampler each kind of batch draws from, and the `losses.Batch` one draw yields.

A loss's recipe (`losses.LOSS_RECIPES`) names its kind. Each maker takes (training labels (N,), the epoch's seed,
the TrainConfig, forgeries: forged class -> its genuine class, group_of_class: class -> group) and returns a
function drawing one batch.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np

from siamesedb.losses import Batch
from siamesedb.samplers import ClassBalancedSampler, EpisodeSampler, PairSampler

Draw = Callable[[], Batch]


def pair_batches(labels: np.ndarray, seed: int, config: Any, forgeries: dict[int, int],
                 group_of_class: dict[int, int]) -> Draw:
    """`config.batch_size` genuine / impostor pairs a draw, skilled forgeries a share of the impostors."""
    sampler = PairSampler(labels, seed=seed, forgery_of=forgeries, hard_fraction=config.hard_negative_fraction)

    def draw() -> Batch:
        a, b, same = sampler.sample(config.batch_size)
        return Batch(np.concatenate([a, b]), same=same)

    return draw


def class_batches(labels: np.ndarray, seed: int, config: Any, forgeries: dict[int, int],
                  group_of_class: dict[int, int]) -> Draw:
    """P x K batches: about `config.batch_size` items, `config.per_class` of each class (triplet mining)."""
    sampler = ClassBalancedSampler(labels, max(2, config.batch_size // config.per_class), config.per_class, seed=seed)

    def draw() -> Batch:
        indices = sampler.sample()
        return Batch(indices, labels=labels[indices])

    return draw


def episode_batches(labels: np.ndarray, seed: int, config: Any, forgeries: dict[int, int],
                    group_of_class: dict[int, int]) -> Draw:
    """`config.way`-way `config.shot`-shot episodes with `config.queries` queries a class, a `within_group` share
    of them inside one group; with `forgery_episodes`, a genuine class brings its forgeries along."""
    sampler = EpisodeSampler(labels, config.way, config.shot, config.queries, seed=seed,
                             forgery_of=forgeries if config.forgery_episodes else None,
                             group_of_class=group_of_class, within_group=config.within_group)

    def draw() -> Batch:
        support, queried, answer = sampler.sample()
        return Batch(np.concatenate([support, queried]), support=len(support), shot=config.shot, answer=answer)

    return draw


BATCH_KINDS: dict[str, Callable[[np.ndarray, int, Any, dict[int, int], dict[int, int]], Draw]] = {
    "pairs": pair_batches,
    "classes": class_batches,
    "episodes": episode_batches,
}
