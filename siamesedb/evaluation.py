"""Accuracy on held-apart data: the protocols `siamesedb eval` runs, each encoding a folder once and reporting a
result (N-way K-shot episodes with a 95% confidence interval; skilled-forgery, pair and one-shot verification).

One-shot episodes (README of the Omniglot data; Lake, Salakhutdinov & Tenenbaum, Science 2015):

- unstructured: each episode draws `way` classes from the whole folder and, per class, `shot` support images and
  `queries` query images, all distinct;
- within-group (`within_group=True`, Lake's one-shot task): the `way` classes all come from one group (the first
  component of the label: the alphabet), the support images are all by one drawer and the queries by another.
  The drawer is read from Omniglot's file names (`NNNN_MM.png`, MM = drawer).

The episodes run through `episodes.run_episodes` and the verification trials through `trials`, both on the
product's own scoring (`scoring`), so the numbers measure the product, not a side path. The array-level names
that lived here (sample_episode, roc_auc, reference_trials, pair_scores, oneshot_verification_trials,
plot_verification) stay importable from here.
"""

from __future__ import annotations

import re
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from siamesedb.data import GENUINE, LabelledImage, group_of, iter_batches, parse_groups, scan_folder, select_groups
from siamesedb.checks import as_threshold
from siamesedb.encoder import Encoder
from siamesedb.episodes import mean_ci95, run_episodes, sample_episode  # noqa: F401  (sample_episode: its old home)
from siamesedb.errors import InvalidInputError
from siamesedb.plots import verification_plots
from siamesedb.rules import DEFAULT_RULE
from siamesedb.scoring import eer_threshold, far_threshold
from siamesedb.trials import (  # noqa: F401  (pair_scores, oneshot_verification_trials: their old home)
    group_pair_trials,
    oneshot_verification_trials,
    pair_scores,
    rates_at,
    reference_trials,
    roc_auc,
)

plot_verification = verification_plots  # its old name

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
    plots: dict[str, str] = field(default_factory=dict)  # name -> PNG written (with `plots=FOLDER`)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def drawer_of(path: str | Path) -> str | None:
    """Omniglot's drawer id from a file name (`0709_17.png` -> '17'); None when the name carries none."""
    match = _DRAWER.search(Path(path).stem)
    return match.group(1) if match else None


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
    metric: str = "cosine",
) -> np.ndarray:
    """Array-level episodes over (N, D) vectors: the accuracy of each episode, (episodes,) float64. `metric`: the
    encoder's (cosine: normalised-mean prototypes; euclidean: plain means, nearest by distance). `paths` give the
    drawers of within-group episodes."""
    return run_episodes(vectors, labels, way, shot, queries, episodes, np.random.default_rng(seed), metric,
                        within_group, groups=[group_of(label) for label in labels],
                        drawers=[drawer_of(path) for path in paths]).accuracies


def encode_folder(
    folder: str | Path, encoder: Encoder, batch_size: int = 256, progress: bool = False
) -> tuple[np.ndarray, list[LabelledImage], int]:
    """Encode every readable image of a labelled folder once: ((N, D) vectors, their images, skipped count)."""
    return encode_images(scan_folder(Path(folder)), encoder, batch_size, progress)


def encode_images(
    images: list[LabelledImage], encoder: Encoder, batch_size: int = 256, progress: bool = False
) -> tuple[np.ndarray, list[LabelledImage], int]:
    """Encode labelled images once: ((N, D) vectors of the readable ones, those images, skipped count)."""
    from tqdm import tqdm

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
    plots: str | Path | None = None,
) -> OneShotResult:
    """N-way K-shot accuracy of `encoder` on a labelled folder of classes it was not trained on.

    `plots`: a folder to write oneshot.png into (episode accuracy histogram and running mean with its 95% interval).
    """
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
        metric=encoder.config.metric,
    )
    accuracy, ci95 = mean_ci95(accuracies)
    written = {}
    if plots is not None:
        from siamesedb.plots import oneshot_accuracy

        written["oneshot"] = str(oneshot_accuracy(accuracies, way, shot, Path(plots) / "oneshot.png"))
    return OneShotResult(
        way=way,
        shot=shot,
        queries=queries,
        episodes=episodes,
        within_group=within_group,
        seed=seed,
        accuracy=accuracy,
        ci95=ci95,
        images=len(images),
        classes=len({im.label for im in images}),
        skipped=skipped,
        encoder=encoder.fingerprint,
        seconds=round(time.perf_counter() - started, 3),
        plots=written,
    )


# ---------------------------------------------------------------------------------------------- verification


@dataclass
class VerificationResult:
    """Writer-independent verification: reference sets of `references` genuine items per test group, queried with
    the group's other genuine items and its skilled forgeries; threshold calibrated on other groups."""

    references: int
    rule: str
    repeats: int
    seed: int
    test_groups: list[str]
    calibration_groups: list[str]
    auc: float
    eer: float
    threshold: float
    far: float
    frr: float
    accuracy: float
    genuine_trials: int
    forgery_trials: int
    calibration_eer: float
    encoder: str
    seconds: float
    plots: dict[str, str]

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _groups_with_forgeries(labels: list[str], selection: str | None) -> list[str]:
    present = sorted({label.rsplit("/", 1)[0] for label in labels if label.endswith(f"/{GENUINE}")})
    wanted = parse_groups(selection)
    chosen = [g for g in present if wanted is None or g in wanted]
    if not chosen:
        raise InvalidInputError(f"no groups with <group>/genuine images match {selection!r}")
    return chosen


def evaluate_verification(
    folder: str | Path,
    encoder: Encoder,
    references: int = 5,
    test_groups: str | None = "U31-U40",
    calibration_groups: str | None = "U01-U30",
    rule: str = DEFAULT_RULE,
    repeats: int = 10,
    seed: int = 0,
    plots: str | Path | None = None,
    progress: bool = False,
) -> VerificationResult:
    """Skilled-forgery verification on unseen groups, thresholded at the EER point of the calibration groups.

    The threshold never sees the test groups' answers: it is the equal-error threshold of the same protocol run on
    `calibration_groups` (the training writers). AUC and EER on the test groups are threshold-free.
    """
    started = time.perf_counter()
    vectors, images, _ = encode_folder(folder, encoder, progress=progress)
    labels = [im.label for im in images]
    tests = _groups_with_forgeries(labels, test_groups)
    calibration = _groups_with_forgeries(labels, calibration_groups)
    if set(tests) & set(calibration):
        raise InvalidInputError("test and calibration groups overlap")
    rng = np.random.default_rng(seed)
    metric = encoder.config.metric
    cal_genuine, cal_forged = reference_trials(vectors, labels, calibration, references, repeats, rng, rule, metric)
    threshold, calibration_eer = eer_threshold(cal_genuine, cal_forged)
    genuine, forged = reference_trials(vectors, labels, tests, references, repeats, rng, rule, metric)
    _, eer = eer_threshold(genuine, forged)
    far, frr = rates_at(genuine, forged, threshold)
    accuracy = float((np.sum(genuine >= threshold) + np.sum(forged < threshold)) / (len(genuine) + len(forged)))
    written: dict[str, str] = {}
    if plots is not None:
        title = f"{len(tests)} unseen writers, {references} references, rule {rule}"
        written = verification_plots(genuine, forged, threshold, title, Path(plots))
    return VerificationResult(
        references=references, rule=rule, repeats=repeats, seed=seed, test_groups=tests,
        calibration_groups=calibration, auc=roc_auc(genuine, forged), eer=eer, threshold=threshold, far=far, frr=frr,
        accuracy=accuracy, genuine_trials=len(genuine), forgery_trials=len(forged),
        calibration_eer=calibration_eer, encoder=encoder.fingerprint,
        seconds=round(time.perf_counter() - started, 3), plots=written,
    )


# ---------------------------------------------------------------------------------------------- pair verification


@dataclass
class PairResult:
    """Two-image verification on unseen classes ("same class or not?", the reference Siamese twins' task): the
    threshold is the equal-error point of pairs from `calibration_groups`, applied to pairs of `test_groups`."""

    pairs: int
    seed: int
    metric: str
    test_groups: list[str]
    calibration_groups: list[str]
    accuracy: float  # of the test pairs (half genuine, half impostor) at the calibrated threshold
    far: float
    frr: float
    threshold: float
    eer: float  # threshold-free, on the test pairs
    auc: float
    calibration_eer: float
    encoder: str
    seconds: float

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def evaluate_pairs(folder: str | Path, encoder: Encoder, test_groups: str, calibration_groups: str,
                   pairs: int = 4000, seed: int = 0, progress: bool = False) -> PairResult:
    """Pair verification accuracy on the classes of `test_groups` at the threshold calibrated (equal error rate) on
    pairs of `calibration_groups` (the training classes, seen through other images): the test answers never set it.
    Groups are first label components (a class name in a flat folder such as Fashion-MNIST's)."""
    started = time.perf_counter()
    vectors, images, _ = encode_folder(folder, encoder, progress=progress)
    labels = [im.label for im in images]
    present = {group_of(label) for label in labels}
    tests, calibration = parse_groups(test_groups) or set(), parse_groups(calibration_groups) or set()
    for name, chosen in (("test", tests), ("calibration", calibration)):
        if not chosen & present:
            raise InvalidInputError(f"{folder}: no images in the {name} groups {sorted(chosen)}")
    if tests & calibration:
        raise InvalidInputError("test and calibration groups overlap")
    metric = encoder.config.metric
    cal_genuine, cal_impostor = group_pair_trials(vectors, labels, calibration, pairs, seed, metric)
    threshold, calibration_eer = eer_threshold(cal_genuine, cal_impostor)
    genuine, impostor = group_pair_trials(vectors, labels, tests, pairs, seed + 1, metric)
    _, eer = eer_threshold(genuine, impostor)
    correct = np.sum(genuine >= threshold) + np.sum(impostor < threshold)
    far, frr = rates_at(genuine, impostor, threshold)
    return PairResult(
        pairs=pairs, seed=seed, metric=metric, test_groups=sorted(tests & present),
        calibration_groups=sorted(calibration & present), accuracy=float(correct / (len(genuine) + len(impostor))),
        far=far, frr=frr, threshold=float(threshold),
        eer=float(eer), auc=roc_auc(genuine, impostor), calibration_eer=float(calibration_eer),
        encoder=encoder.fingerprint, seconds=round(time.perf_counter() - started, 3),
    )


# ---------------------------------------------------------------------------------------------- one-shot verification


@dataclass
class OneShotVerificationResult:
    """One-shot verification on held-apart classes: ROC AUC, EER, and FAR / FRR at one threshold."""

    references: int
    impostors: str
    threshold: float
    threshold_source: str
    far: float
    frr: float
    auc: float
    eer: float
    genuine_trials: int
    impostor_trials: int
    classes: int
    images: int
    encoder: str
    seed: int
    far_threshold: dict[str, float] = field(default_factory=dict)  # with target_far: the threshold meeting it

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def evaluate_oneshot_verification(
    folder: str | Path,
    encoder: Encoder,
    references: int = 1,
    impostors: str = "group",
    threshold: float | None = None,
    target_far: float | None = None,
    groups: str | None = None,
    seed: int = 0,
    progress: bool = False,
) -> OneShotVerificationResult:
    """Encode a labelled folder of classes the encoder never trained on and run `oneshot_verification_trials`.

    FAR / FRR are read at `threshold`, by default the encoder's own (`verify`'s fallback: what a one-reference
    index uses before any calibration). With `target_far`, also reports the lowest threshold meeting that
    false-accept rate on these trials and its FRR (a measurement, not a threshold to ship: it saw the answers).
    """
    images = select_groups(scan_folder(Path(folder)), groups)
    threshold = as_threshold(threshold) if threshold is not None else None  # a NaN refused before encoding
    vectors, kept, _ = encode_images(images, encoder, progress=progress)
    labels = [image.label for image in kept]
    metric = getattr(encoder.config, "metric", "cosine")
    genuine, impostor = oneshot_verification_trials(vectors, labels, references, impostors, seed, metric)
    source = "given"
    if threshold is None:
        threshold, source = encoder.config.pair_threshold, "encoder"
        if threshold is None:
            raise InvalidInputError("this encoder carries no threshold; pass --threshold")
    _, eer = eer_threshold(genuine, impostor)
    far, frr = rates_at(genuine, impostor, threshold)
    at_far: dict[str, float] = {}
    if target_far is not None:
        t = far_threshold(impostor, target_far)
        far_at_t, frr_at_t = rates_at(genuine, impostor, t)
        at_far = {"target_far": target_far, "threshold": t, "far": far_at_t, "frr": frr_at_t}
    return OneShotVerificationResult(
        references=references, impostors=impostors, threshold=float(threshold), threshold_source=source,
        far=far, frr=frr, auc=roc_auc(genuine, impostor), eer=float(eer), genuine_trials=len(genuine), impostor_trials=len(impostor),
        classes=len(set(labels)), images=len(kept), encoder=encoder.fingerprint, seed=seed, far_threshold=at_far,
    )

