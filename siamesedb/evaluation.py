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
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from siamesedb import query
from siamesedb.data import (
    FORGED,
    GENUINE,
    LabelledImage,
    group_of,
    iter_batches,
    parse_groups,
    scan_folder,
    select_groups,
)
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
    plots: dict[str, str] = field(default_factory=dict)  # name -> PNG written (with `plots=FOLDER`)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def drawer_of(path: str | Path) -> str | None:
    """Omniglot's drawer id from a file name (`0709_17.png` -> '17'); None when the name carries none."""
    match = _DRAWER.search(Path(path).stem)
    return match.group(1) if match else None


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
    metric: str = "cosine",
) -> np.ndarray:
    """Array-level episodes over (N, D) vectors: the accuracy of each episode, (episodes,) float64. `metric`: the
    encoder's (cosine: normalised-mean prototypes; euclidean: plain means, nearest by distance)."""
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
        names, prototypes = query.class_prototypes(vectors[support], label_array[support].tolist(), metric=metric)
        rankings = query.rank_by_prototype(vectors[queried], prototypes, names, metric=metric)
        predicted = np.asarray([ranking[0][0] for ranking in rankings], dtype=object)
        accuracies[e] = float(np.mean(predicted == label_array[queried]))
    return accuracies


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
    ci95 = 1.96 * accuracies.std(ddof=1) / np.sqrt(episodes) if episodes > 1 else float("nan")
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
        accuracy=float(accuracies.mean()),
        ci95=float(ci95),
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


def roc_auc(genuine: np.ndarray, impostor: np.ndarray) -> float:
    """Area under the ROC curve: P(genuine score > impostor score) + half P(equal) (Mann-Whitney U / (G * I))."""
    genuine = np.asarray(genuine, dtype=np.float64)
    impostor = np.sort(np.asarray(impostor, dtype=np.float64))
    if len(genuine) == 0 or len(impostor) == 0:
        raise InvalidInputError("AUC needs genuine and impostor scores")
    below = np.searchsorted(impostor, genuine, side="left")
    equal = np.searchsorted(impostor, genuine, side="right") - below
    return float((below + 0.5 * equal).sum() / (len(genuine) * len(impostor)))


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
    label_array = np.asarray(labels, dtype=object)
    genuine_scores: list[float] = []
    forged_scores: list[float] = []
    for group in groups:
        genuine = np.flatnonzero(label_array == f"{group}/{GENUINE}")
        forged = np.flatnonzero(label_array == f"{group}/{FORGED}")
        if len(genuine) <= references:
            raise InvalidInputError(f"group {group!r} has {len(genuine)} genuine items; {references} references leave none to query")
        for _ in range(repeats):
            chosen = rng.permutation(genuine)
            refs, others = chosen[:references], chosen[references:]
            support = vectors[refs]
            genuine_scores.extend(query.verification_score(vectors[i], support, rule, metric) for i in others)
            forged_scores.extend(query.verification_score(vectors[i], support, rule, metric) for i in forged)
    return np.asarray(genuine_scores), np.asarray(forged_scores)


def _groups_with_forgeries(labels: list[str], selection: str | None) -> list[str]:
    present = sorted({label.rsplit("/", 1)[0] for label in labels if label.endswith(f"/{GENUINE}")})
    wanted = parse_groups(selection)
    chosen = [g for g in present if wanted is None or g in wanted]
    if not chosen:
        raise InvalidInputError(f"no groups with <group>/genuine images match {selection!r}")
    return chosen


def plot_verification(genuine: np.ndarray, forged: np.ndarray, threshold: float, title: str, folder: Path) -> dict[str, str]:
    """Write roc.png (false accepts vs true accepts) and scores.png (genuine vs forged histograms) into `folder`."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    folder.mkdir(parents=True, exist_ok=True)
    _, far, frr = query.roc_points(genuine, forged)
    fig, ax = plt.subplots(figsize=(4.5, 4.5), dpi=100)
    ax.plot(far, 1 - frr, color="tab:blue", label=f"AUC {roc_auc(genuine, forged):.3f}")
    ax.plot([0, 1], [0, 1], ":", color="grey")
    at = (float(np.mean(forged >= threshold)), float(np.mean(genuine >= threshold)))
    ax.plot(*at, "o", color="tab:red", label=f"calibrated threshold {threshold:.3f}")
    ax.set_xlabel("false accept rate (skilled forgeries accepted)")
    ax.set_ylabel("true accept rate (genuine accepted)")
    ax.set_title(title, fontsize=9)
    ax.legend(loc="lower right", fontsize=8)
    fig.tight_layout()
    fig.savefig(folder / "roc.png")
    plt.close(fig)
    fig, ax = plt.subplots(figsize=(6, 3.5), dpi=100)
    bins = np.linspace(min(genuine.min(), forged.min()), max(genuine.max(), forged.max()), 40)
    ax.hist(genuine, bins=bins, alpha=0.6, color="tab:green", label=f"genuine ({len(genuine)})")
    ax.hist(forged, bins=bins, alpha=0.6, color="tab:red", label=f"skilled forgeries ({len(forged)})")
    ax.axvline(threshold, color="black", linestyle="--", label="calibrated threshold")
    ax.set_xlabel("similarity to the reference set")
    ax.set_ylabel("trials")
    ax.set_title(title, fontsize=9)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(folder / "scores.png")
    plt.close(fig)
    return {"roc": str(folder / "roc.png"), "scores": str(folder / "scores.png")}


def evaluate_verification(
    folder: str | Path,
    encoder: Encoder,
    references: int = 5,
    test_groups: str | None = "U31-U40",
    calibration_groups: str | None = "U01-U30",
    rule: str = "prototype",
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
    threshold, calibration_eer = query.eer_threshold(cal_genuine, cal_forged)
    genuine, forged = reference_trials(vectors, labels, tests, references, repeats, rng, rule, metric)
    _, eer = query.eer_threshold(genuine, forged)
    far = float(np.mean(forged >= threshold))
    frr = float(np.mean(genuine < threshold))
    accuracy = float((np.sum(genuine >= threshold) + np.sum(forged < threshold)) / (len(genuine) + len(forged)))
    written: dict[str, str] = {}
    if plots is not None:
        title = f"{len(tests)} unseen writers, {references} references, rule {rule}"
        written = plot_verification(genuine, forged, threshold, title, Path(plots))
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


def pair_scores(vectors: np.ndarray, a: np.ndarray, b: np.ndarray, metric: str) -> np.ndarray:
    """(n,) scores of the pairs (vectors[a[i]], vectors[b[i]]): cosine, or minus the Euclidean distance."""
    if query.check_metric(metric) == "euclidean":
        return -np.linalg.norm(vectors[a].astype(np.float64) - vectors[b], axis=1)
    return np.einsum("nd,nd->n", vectors[a].astype(np.float64), vectors[b])


def _sample_pairs(vectors: np.ndarray, labels: list[str], groups: set[str], pairs: int, seed: int,
                  metric: str) -> tuple[np.ndarray, np.ndarray]:
    """(genuine scores, impostor scores) of `pairs` seeded pairs (half each) among the images of `groups`."""
    from siamesedb.data import PairSampler

    rows = np.flatnonzero([group_of(label) in groups for label in labels])
    _, codes = np.unique(np.asarray(labels, dtype=object)[rows].astype(str), return_inverse=True)
    a, b, same = PairSampler(codes.reshape(-1), seed=seed).sample(pairs)
    scores = pair_scores(vectors, rows[a], rows[b], metric)
    return scores[same == 1], scores[same == 0]


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
    cal_genuine, cal_impostor = _sample_pairs(vectors, labels, calibration, pairs, seed, metric)
    threshold, calibration_eer = query.eer_threshold(cal_genuine, cal_impostor)
    genuine, impostor = _sample_pairs(vectors, labels, tests, pairs, seed + 1, metric)
    _, eer = query.eer_threshold(genuine, impostor)
    correct = np.sum(genuine >= threshold) + np.sum(impostor < threshold)
    return PairResult(
        pairs=pairs, seed=seed, metric=metric, test_groups=sorted(tests & present),
        calibration_groups=sorted(calibration & present), accuracy=float(correct / (len(genuine) + len(impostor))),
        far=float(np.mean(impostor >= threshold)), frr=float(np.mean(genuine < threshold)), threshold=float(threshold),
        eer=float(eer), auc=roc_auc(genuine, impostor), calibration_eer=float(calibration_eer),
        encoder=encoder.fingerprint, seconds=round(time.perf_counter() - started, 3),
    )


# ---------------------------------------------------------------------------------------------- one-shot verification


def oneshot_verification_trials(
    vectors: np.ndarray,
    labels: list[str],
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
    Scored through `query.scores_for`, the product's own scoring, in (items, classes) row blocks.
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
        prototypes[c] = query.class_prototypes(vectors[chosen], [classes[c]] * references, metric=metric)[1][0]
    group_of_class = np.asarray([group_of(name) for name in classes], dtype=object)
    group_codes = np.unique(group_of_class, return_inverse=True)[1].reshape(-1)
    item_group = group_codes[inverse]
    genuine, impostor = [], []
    for start in range(0, len(vectors), 4096):
        rows = np.arange(start, min(start + 4096, len(vectors)))
        scores = query.scores_for(metric, vectors[rows].astype(np.float32), prototypes)  # (rows, C)
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
    vectors, kept, _ = encode_images(images, encoder, progress=progress)
    labels = [image.label for image in kept]
    metric = getattr(encoder.config, "metric", "cosine")
    genuine, impostor = oneshot_verification_trials(vectors, labels, references, impostors, seed, metric)
    source = "given"
    if threshold is None:
        threshold, source = encoder.config.pair_threshold, "encoder"
        if threshold is None:
            raise InvalidInputError("this encoder carries no threshold; pass --threshold")
    _, eer = query.eer_threshold(genuine, impostor)
    at_far: dict[str, float] = {}
    if target_far is not None:
        t = query.far_threshold(impostor, target_far)
        at_far = {"target_far": target_far, "threshold": t, "far": float(np.mean(impostor >= t)),
                  "frr": float(np.mean(genuine < t))}
    return OneShotVerificationResult(
        references=references, impostors=impostors, threshold=float(threshold), threshold_source=source,
        far=float(np.mean(impostor >= threshold)), frr=float(np.mean(genuine < threshold)),
        auc=roc_auc(genuine, impostor), eer=float(eer), genuine_trials=len(genuine), impostor_trials=len(impostor),
        classes=len(set(labels)), images=len(kept), encoder=encoder.fingerprint, seed=seed, far_threshold=at_far,
    )

