"""Accuracy on held-apart data: N-way K-shot one-shot episodes with a 95% confidence interval.

Two protocols (README of the Omniglot data; Lake, Salakhutdinov & Tenenbaum, Science 2015):

- unstructured: each episode draws `way` classes from the whole folder and, per class, `shot` support images and
  `queries` query images, all distinct;
- within-group (`within_group=True`, Lake's one-shot task): the `way` classes all come from one group (the first
  component of the label: the alphabet), the support images are all by one drawer and the queries by another.
  The drawer is read from Omniglot's file names (`NNNN_MM.png`, MM = drawer).

Every image is encoded once per run; the episodes then run through the query layer users call
(`query.class_prototypes` + `query.rank_by_prototype`), so the number measures the product, not a side path.
"""

from __future__ import annotations

import re
import time
from collections import defaultdict
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from siamesedb import query
from siamesedb.data import LabelledImage, iter_batches, scan_folder
from siamesedb.encoder import Encoder
from siamesedb.errors import InvalidInputError

_DRAWER = re.compile(r"_(\d+)$")


@dataclass
class OneShotResult:
    """Mean episode accuracy with its 95% confidence half-width (1.96 standard errors)."""

    way: int
    shot: int
    queries: int
    episodes: int
    within_group: bool
    seed: int
    accuracy: float
    ci95: float
    images: int
    classes: int
    skipped: int
    encoder: str
    seconds: float

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def drawer_of(path: str | Path) -> str | None:
    """Omniglot's drawer id from a file name (`0709_17.png` -> '17'); None when the name carries none."""
    match = _DRAWER.search(Path(path).stem)
    return match.group(1) if match else None


def group_of(label: str) -> str:
    """The group of a label is its first path component (`Latin/character07` -> 'Latin')."""
    return label.split("/", 1)[0]


def sample_episode(
    labels: np.ndarray,
    drawers: np.ndarray,
    way: int,
    shot: int,
    queries: int,
    rng: np.random.Generator,
    within_group: bool,
    by_class: dict[str, np.ndarray],
    classes_by_group: dict[str, list[str]],
) -> tuple[np.ndarray, np.ndarray]:
    """One episode: (support indices (way*shot,), query indices (way*queries,)), class-major order."""
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


def episode_accuracies(
    vectors: np.ndarray,
    labels: list[str],
    paths: list[str],
    way: int = 20,
    shot: int = 1,
    queries: int = 1,
    episodes: int = 1000,
    within_group: bool = False,
    seed: int = 0,
) -> np.ndarray:
    """Array-level episodes over (N, D) vectors: the accuracy of each episode, (episodes,) float64."""
    if way < 2 or shot < 1 or queries < 1 or episodes < 1:
        raise InvalidInputError("need way >= 2, shot >= 1, queries >= 1, episodes >= 1")
    label_array = np.asarray(labels, dtype=object)
    drawers = np.asarray([drawer_of(p) for p in paths], dtype=object)
    by_class_lists: dict[str, list[int]] = defaultdict(list)
    for i, label in enumerate(labels):
        by_class_lists[label].append(i)
    by_class = {c: np.asarray(ix) for c, ix in by_class_lists.items() if len(ix) >= shot + queries}
    if len(by_class) < way:
        raise InvalidInputError(f"only {len(by_class)} classes have {shot + queries} images; a {way}-way episode needs {way}")
    classes_by_group: dict[str, list[str]] = defaultdict(list)
    for c in sorted(by_class):
        classes_by_group[group_of(c)].append(c)
    if within_group and not any(len(cs) >= way for cs in classes_by_group.values()):
        raise InvalidInputError(f"no group holds {way} classes with {shot + queries} images each")
    rng = np.random.default_rng(seed)
    accuracies = np.empty(episodes)
    for e in range(episodes):
        support, queried = sample_episode(
            label_array, drawers, way, shot, queries, rng, within_group, by_class, classes_by_group
        )
        names, prototypes = query.class_prototypes(vectors[support], label_array[support].tolist())
        rankings = query.rank_by_prototype(vectors[queried], prototypes, names)
        predicted = np.asarray([ranking[0][0] for ranking in rankings], dtype=object)
        accuracies[e] = float(np.mean(predicted == label_array[queried]))
    return accuracies


def encode_folder(
    folder: str | Path, encoder: Encoder, batch_size: int = 256, progress: bool = False
) -> tuple[np.ndarray, list[LabelledImage], int]:
    """Encode every readable image of a labelled folder once: ((N, D) vectors, their images, skipped count)."""
    from tqdm import tqdm

    images = scan_folder(Path(folder))
    kept_images: list[LabelledImage] = []
    chunks: list[np.ndarray] = []
    skipped = 0
    workers = 2 if len(images) >= 2000 else 0
    with tqdm(total=len(images), unit="img", disable=not progress, desc="encode") as bar:
        for kept, tensor, bad in iter_batches(images, encoder.config.preprocessing, batch_size=batch_size, workers=workers):
            if kept:
                chunks.append(encoder.encode_tensors(tensor))
                kept_images.extend(images[i] for i in kept)
            skipped += len(bad)
            bar.update(len(kept) + len(bad))
    vectors = np.concatenate(chunks) if chunks else np.empty((0, encoder.dimension), dtype=np.float32)
    return vectors, kept_images, skipped


def evaluate_oneshot(
    folder: str | Path,
    encoder: Encoder,
    way: int = 20,
    shot: int = 1,
    queries: int = 1,
    episodes: int = 1000,
    within_group: bool = False,
    seed: int = 0,
    progress: bool = False,
) -> OneShotResult:
    """N-way K-shot accuracy of `encoder` on a labelled folder of classes it was not trained on."""
    started = time.perf_counter()
    vectors, images, skipped = encode_folder(folder, encoder, progress=progress)
    accuracies = episode_accuracies(
        vectors,
        [im.label for im in images],
        [str(im.path) for im in images],
        way=way,
        shot=shot,
        queries=queries,
        episodes=episodes,
        within_group=within_group,
        seed=seed,
    )
    ci95 = 1.96 * accuracies.std(ddof=1) / np.sqrt(episodes) if episodes > 1 else float("nan")
    return OneShotResult(
        way=way,
        shot=shot,
        queries=queries,
        episodes=episodes,
        within_group=within_group,
        seed=seed,
        accuracy=float(accuracies.mean()),
        ci95=float(ci95),
        images=len(images),
        classes=len({im.label for im in images}),
        skipped=skipped,
        encoder=encoder.fingerprint,
        seconds=round(time.perf_counter() - started, 3),
    )
