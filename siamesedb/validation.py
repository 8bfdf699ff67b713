"""Held-out classes of a training run: the seeded split, and what is measured on them (validation accuracy, the
final held-out score, the pair and look-alike verification thresholds an encoder ships with).

Every episode runs through `episodes.run_episodes` and every pair score through `scoring.pair_scores`: the numbers a
training run reports are the ones `siamesedb eval` and `verify` would give.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from siamesedb.data import FORGED, GENUINE, LabelledImage, forgery_target, group_of
from siamesedb.episodes import EpisodeScores, mean_ci95, run_episodes
from siamesedb.errors import InvalidInputError
from siamesedb.scoring import eer_threshold, far_threshold
from siamesedb.trials import oneshot_verification_trials, rates_at, sampled_pairs

if TYPE_CHECKING:
    from siamesedb.encoder import Encoder


def split_classes(names: list[str], fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(training class indices, held-out class indices): a seeded `fraction` of the classes held out whole, a
    genuine class and its forgeries always on the same side."""
    def base(name: str) -> str:
        head, _, tail = name.rpartition("/")
        return head if head and tail in (GENUINE, FORGED) else name

    bases = sorted({base(n) for n in names})
    order = np.random.default_rng(seed).permutation(len(bases))
    held = {bases[i] for i in order[: int(round(len(bases) * fraction))]}
    val = np.asarray([i for i, n in enumerate(names) if base(n) in held], dtype=np.int64)
    train_ = np.asarray([i for i, n in enumerate(names) if base(n) not in held], dtype=np.int64)
    return train_, val


def held_out_images(images: list[LabelledImage], fraction: float, seed: int) -> list[LabelledImage]:
    """The images of the classes a `train` run with this `val_fraction` and `seed` held out of training (the same
    seeded split as `train`): where thresholds and test-time settings are chosen without touching test classes."""
    names = sorted({image.label for image in images})
    _, held = split_classes(names, fraction, seed)
    held_names = {names[i] for i in held}
    return [image for image in images if image.label in held_names]


def forgery_map(names: list[str]) -> dict[int, int]:
    """Class index of each forged class -> class index of the genuine class it imitates."""
    position = {n: i for i, n in enumerate(names)}
    return {i: position[t] for i, n in enumerate(names) if (t := forgery_target(n, frozenset(position))) is not None}


def one_shot_episodes(encoder: Encoder, images: torch.Tensor, labels: np.ndarray, way: int, episodes: int, seed: int,
                      exclude: set[int] | frozenset[int] = frozenset()) -> EpisodeScores:
    """Unstructured `way`-way 1-shot episodes (1 query a class) over the encoder's vectors of (N, C, H, W) `images`
    of class `labels` (N,), seeded; `way` shrinks to the classes there are. Classes in `exclude` (skilled-forgery
    classes) take no part: they are no class a user would enrol."""
    keep = ~np.isin(labels, list(exclude))
    vectors = encoder.encode_tensors(images[torch.from_numpy(keep)])
    labels = labels[keep]
    return run_episodes(vectors, labels, min(way, len(np.unique(labels))), 1, 1, episodes,
                        np.random.default_rng(seed), encoder.config.metric)


def validation_accuracy(encoder: Encoder, images: torch.Tensor, labels: np.ndarray, way: int, episodes: int,
                        seed: int, exclude: set[int] | frozenset[int] = frozenset()) -> float:
    """N-way 1-shot accuracy over every query of `episodes` seeded episodes of held-out classes: what picks the
    best epoch (the same episodes every epoch, so epochs are compared on equal terms)."""
    return one_shot_episodes(encoder, images, labels, way, episodes, seed, exclude).pooled


def held_out_score(encoder: Encoder, images: torch.Tensor, labels: np.ndarray, way: int, episodes: int, seed: int,
                   exclude: set[int] | frozenset[int] = frozenset()) -> tuple[float, float]:
    """(mean, 95% CI half-width; 0 for one episode) of N-way 1-shot accuracy over `episodes` seeded episodes of
    held-out classes."""
    mean, ci = mean_ci95(one_shot_episodes(encoder, images, labels, way, episodes, seed, exclude).accuracies)
    return mean, ci if episodes > 1 else 0.0


def lookalike_threshold(encoder: Encoder, images: torch.Tensor, labels: np.ndarray, names: list[str],
                        forgery_of: dict[int, int], seed: int, target_far: float = 0.05) -> dict[str, Any]:
    """The threshold `verify` uses on an uncalibrated index: the lowest with FAR <= `target_far` on one-shot trials
    of held-out classes (one random reference each) against look-alike impostors -- the other held-out classes of
    the same group where groups hold several (alphabets; a writer's skilled forgeries), else any other class.
    {} when the held-out classes are too few to say anything."""
    class_names = [names[i] for i in labels.tolist()]
    counts = np.bincount(labels)
    if (counts[counts > 0] < 2).any() or len(set(class_names)) < 2:
        return {}
    forged = {names[i] for i in forgery_of if i < len(names)}  # held-out labels are never rotated / mirrored copies
    groups = [group_of(name) for name in set(class_names) - forged]
    same_group = len(groups) != len(set(groups)) or bool(forged)
    vectors = encoder.encode_tensors(images)
    try:
        genuine, impostor = oneshot_verification_trials(vectors, class_names, 1, "group" if same_group else "any",
                                                        seed, getattr(encoder.config, "metric", "cosine"), forged)
    except InvalidInputError:
        return {}
    threshold = far_threshold(impostor, target_far)
    far, frr = rates_at(genuine, impostor, threshold)
    return {"threshold": threshold, "target_far": target_far, "far": far, "frr": frr, "references": 1,
            "impostors": "other classes of the same group" if same_group else "any other class",
            "measured_on": f"{len(set(class_names))} held-out classes, {len(genuine)} genuine / {len(impostor)} "
                           "impostor trials", "chosen_by": "siamesedb train"}


def pair_threshold(encoder: Encoder, images: torch.Tensor, labels: np.ndarray, seed: int, pairs: int = 4000,
                   forgery_of: dict[int, int] | None = None) -> dict[str, float]:
    """Equal-error threshold for `verify IMAGE_A IMAGE_B` from genuine / impostor pairs of held-out classes, with
    the 95% interval of the EER from 200 seeded bootstrap resamples of the pairs."""
    vectors = encoder.encode_tensors(images)
    scores, same = sampled_pairs(vectors, labels, pairs, seed, encoder.config.metric, forgery_of)
    threshold, eer = eer_threshold(scores[same == 1], scores[same == 0])
    rng = np.random.default_rng(seed)
    resampled = []
    for _ in range(200):
        pick = rng.integers(0, len(scores), len(scores))
        genuine, impostor = scores[pick][same[pick] == 1], scores[pick][same[pick] == 0]
        if len(genuine) and len(impostor):
            resampled.append(eer_threshold(genuine, impostor)[1])
    ci = float((np.percentile(resampled, 97.5) - np.percentile(resampled, 2.5)) / 2) if resampled else 0.0
    return {"pair_threshold": threshold, "pair_eer": eer, "pair_eer_ci95": ci, "pair_count": pairs}
