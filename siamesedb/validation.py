"""Held-out classes of a training run: the seeded split, and what is measured on them (validation accuracy, the
final held-out score, the pair and look-alike verification thresholds an encoder ships with).

Every episode runs through `episodes.run_episodes` and every pair score through `scoring.pair_scores`: the numbers a
training run reports are the ones `siamesedb eval` and `verify` would give.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from siamesedb.data import FORGED, GENUINE, LabelledImage, forgery_target, group_of
from siamesedb.episodes import EpisodeScores, mean_ci95, run_episodes
from siamesedb.errors import InvalidInputError
from siamesedb.scoring import eer_threshold, far_threshold, score_matrix
from siamesedb.trials import oneshot_verification_trials, rates_at, sampled_pairs

if TYPE_CHECKING:
    from siamesedb.encoder import Encoder

MIN_HELD_OUT_CLASSES = 8  # fewer held-out classes than this choose nothing: a 3-way score is near 100% whatever
VERIFY_REFERENCES = 5  # references per held-out writer, as an index of signatures is enrolled (BENCHMARKS R = 5)


def split_classes(names: list[str], fraction: float, seed: int, by_group: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """(training class indices, held-out class indices): a seeded `fraction` of the classes held out whole, a
    genuine class and its forgeries always on the same side. `by_group`: whole groups (alphabets) held out instead,
    in seeded order until they hold `fraction` of the classes (at least MIN_HELD_OUT_CLASSES, at least 2 groups),
    so validation meets new groups as the test will (the class split when fewer than 3 groups exist)."""
    def base(name: str) -> str:
        head, _, tail = name.rpartition("/")
        return head if head and tail in (GENUINE, FORGED) else name

    bases = sorted({base(n) for n in names})
    rng = np.random.default_rng(seed)
    group_names = sorted({group_of(b) for b in bases})
    if by_group and fraction > 0 and len(group_names) >= 3:
        target = max(int(round(len(bases) * fraction)), MIN_HELD_OUT_CLASSES)
        held: set[str] = set()
        for taken, g in enumerate(group_names[i] for i in rng.permutation(len(group_names))):
            if (len(held) >= target and taken >= 2) or taken == len(group_names) - 1:
                break  # enough held out, and at least one group always trains
            held.update(b for b in bases if group_of(b) == g)
    else:
        order = rng.permutation(len(bases))
        held = {bases[i] for i in order[: int(round(len(bases) * fraction))]}
    val = np.asarray([i for i, n in enumerate(names) if base(n) in held], dtype=np.int64)
    train_ = np.asarray([i for i, n in enumerate(names) if base(n) not in held], dtype=np.int64)
    return train_, val


def held_out_images(images: list[LabelledImage], fraction: float, seed: int,
                    by_group: bool = False) -> list[LabelledImage]:
    """The images of the classes a `train` run with this `val_fraction`, `seed` and `hold_out_groups` held out of
    training (the same seeded split as `train`): where thresholds and test-time settings are chosen without touching
    test classes."""
    names = sorted({image.label for image in images})
    _, held = split_classes(names, fraction, seed, by_group)
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


def within_group_episodes(encoder: Encoder, images: torch.Tensor, labels: np.ndarray, names: list[str], way: int,
                          episodes: int, seed: int) -> EpisodeScores:
    """1-shot episodes inside one held-out group at a time (Lake's within-alphabet task): every group with two or
    more classes gets an equal share of `episodes` (at least one), each as many ways as the group holds, at most
    `way`. Pooled over the groups, every query counted alike; per-episode accuracies give the interval."""
    vectors = encoder.encode_tensors(images)
    group = np.asarray([group_of(names[c]) for c in labels.tolist()], dtype=object)
    groups = [g for g in sorted(set(group.tolist())) if len(np.unique(labels[group == g])) >= 2]
    if not groups:
        raise InvalidInputError("no held-out group holds two classes")
    rng = np.random.default_rng(seed)
    share = max(1, episodes // len(groups))
    parts = []
    for g in groups:
        members = group == g
        parts.append(run_episodes(vectors[members], labels[members], min(way, len(np.unique(labels[members]))), 1, 1,
                                  share, rng, encoder.config.metric))
    return EpisodeScores(np.concatenate([p.correct for p in parts]), np.concatenate([p.asked for p in parts]))


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


# ------------------------------------------------------------------------- what a run validates on (issue 27)


@dataclass
class ValidationPlan:
    """What a training run measures to pick its epoch (and members, rule), and why, in one line.

    task: "verification" (held-out writers: genuine vs their own skilled forgeries and other writers, EER with
    `references` references), "groups" (whole groups held out: 1-shot within each held-out group, as many ways as it
    holds), "classes" (N-way 1-shot over every held-out class), "images" (too few classes to hold
    any out: held-out images of the training classes, N-way 1-shot; optimistic for new classes) or "none"."""

    task: str
    reason: str
    references: int = 0

    @property
    def lower_is_better(self) -> bool:
        return self.task == "verification"


def plan_validation(names: list[str], forgeries: dict[int, int], val_classes: np.ndarray, val_fraction: float,
                    labels: np.ndarray, by_group: bool = False) -> ValidationPlan:
    """Choose the validation task from the class split: verification where held-out writers have skilled
    forgeries, else (with `by_group`, whole groups held out) within-group 1-shot when two or more held-out groups
    hold two or more classes, else N-way over held-out classes when at least MIN_HELD_OUT_CLASSES are held out,
    else held-out images. `labels` (N,): every image's class index (the genuine counts fix the references)."""
    if val_fraction <= 0:
        return ValidationPlan("none", "no validation (--val-fraction 0): the last epoch is kept")
    held = set(val_classes.tolist())
    writers = [g for f, g in forgeries.items() if f in held and g in held]
    if len(writers) >= 2:
        fewest = int(min(np.sum(labels == g) for g in writers))
        refs = max(1, min(VERIFY_REFERENCES, fewest - 1))
        return ValidationPlan("verification", f"skilled forgeries: epochs chosen by the verification EER of {len(writers)}"
                              f" held-out writers ({refs} references each; impostors their own forgeries and the other "
                              "writers)", refs)
    enrollable = len(held - set(forgeries))
    per_group = Counter(group_of(names[c]) for c in held - set(forgeries))
    several = sum(1 for n in per_group.values() if n >= 2)
    if by_group and enrollable >= MIN_HELD_OUT_CLASSES and several >= 2:
        return ValidationPlan("groups", f"{len(per_group)} whole groups held out ({enrollable} classes): epochs chosen "
                              "by 1-shot accuracy within each held-out group, as many ways as the group holds (the "
                              "within-group test: look-alike rivals of one group, groups training never saw)")
    if enrollable >= MIN_HELD_OUT_CLASSES:
        return ValidationPlan("classes", f"epochs chosen by {enrollable}-way 1-shot accuracy on {enrollable} held-out "
                              "classes (all of them, the hardest task they support)")
    return ValidationPlan("images", f"only {enrollable} classes could be held out (fewer than {MIN_HELD_OUT_CLASSES}): "
                          "too few to choose by, so images of every class are held out instead (the score is on "
                          "classes training saw: optimistic for new ones)")


def split_images(labels: np.ndarray, fraction: float, seed: int) -> np.ndarray:
    """(N,) bool, True for held-out images: of each class with at least 4 images, max(2, fraction of them) chosen
    at random (seeded), so a held-out 1-shot episode has a support and a query in every class."""
    rng = np.random.default_rng(seed)
    held = np.zeros(len(labels), dtype=bool)
    for c in np.unique(labels):
        members = np.flatnonzero(labels == c)
        if len(members) >= 4:
            held[rng.choice(members, size=max(2, int(round(len(members) * fraction))), replace=False)] = True
    return held


def writer_trials(vectors: np.ndarray, labels: np.ndarray, forgery_of: dict[int, int], references: int, repeats: int,
                  seed: int, rule: str = "prototype", metric: str = "cosine") -> tuple[np.ndarray, np.ndarray]:
    """(genuine (G,), impostor (I,)) scores over the writers whose genuine class and forgeries are both present:
    `repeats` random sets of `references` genuine items per writer; genuine trials its other genuine items;
    impostor trials its skilled forgeries and as many genuine items of the other writers (drawn at random)."""
    from siamesedb.rules import verification_score

    rng = np.random.default_rng(seed)
    present = set(np.unique(labels).tolist())
    writers = sorted(g for f, g in forgery_of.items() if f in present and g in present)
    forged_of = {g: f for f, g in forgery_of.items()}
    genuine, impostor = [], []
    for g in writers:
        own, forged = np.flatnonzero(labels == g), np.flatnonzero(labels == forged_of[g])
        others = np.flatnonzero(np.isin(labels, [w for w in writers if w != g]))
        if len(own) <= references:
            continue
        for _ in range(repeats):
            chosen = rng.permutation(own)
            support = vectors[chosen[:references]]
            strangers = rng.choice(others, size=min(len(others), len(forged)), replace=False) if len(others) else []
            genuine.extend(verification_score(vectors[i], support, rule, metric) for i in chosen[references:])
            impostor.extend(verification_score(vectors[i], support, rule, metric)
                            for i in np.concatenate([forged, np.asarray(strangers, dtype=np.int64)]))
    if not genuine or not impostor:
        raise InvalidInputError("no held-out writer has both genuine items beyond its references and forgeries")
    return np.asarray(genuine), np.asarray(impostor)


def eer_interval(genuine: np.ndarray, impostor: np.ndarray, seed: int, resamples: int = 200) -> float:
    """Half-width of the 95% bootstrap interval of the EER (genuine and impostor scores resampled apart)."""
    rng = np.random.default_rng(seed)
    eers = [eer_threshold(rng.choice(genuine, len(genuine)), rng.choice(impostor, len(impostor)))[1]
            for _ in range(resamples)]
    return float((np.percentile(eers, 97.5) - np.percentile(eers, 2.5)) / 2)


def writer_eer(encoder: Encoder, images: torch.Tensor, labels: np.ndarray, forgery_of: dict[int, int],
               references: int, seed: int, repeats: int = 5, rule: str = "prototype",
               vectors: np.ndarray | None = None) -> dict[str, Any]:
    """Held-out writer verification: {"eer", "threshold", "genuine", "impostor", "rule", "references"} (see
    `writer_trials`); `vectors` spares encoding `images` again."""
    vectors = encoder.encode_tensors(images) if vectors is None else vectors
    genuine, impostor = writer_trials(vectors, labels, forgery_of, references, repeats, seed, rule,
                                      encoder.config.metric)
    threshold, eer = eer_threshold(genuine, impostor)
    return {"eer": float(eer), "threshold": float(threshold), "genuine": len(genuine), "impostor": len(impostor),
            "rule": rule, "references": references}


# ----------------------------------------------------------------------------------- the end of a training run

CAVEATS = {
    "held-out classes": "",
    "held-out images": "measured on held-out images of the training classes: new classes may score lower",
    "training pairs": "no images were held out, so measured on the training images themselves: genuine scores run "
                      "high there, expect more false rejects on new classes; calibrate the index (siamesedb calibrate)",
    "folder pairs, nothing trained": "nothing was trained (--epochs 0) and no images were held out, so measured on "
                                     "the folder's own images: unseen by the model, but of the folder's classes",
}


def ensure_threshold(final: Encoder, notes: dict[str, Any], x_val: torch.Tensor, y_val: np.ndarray,
                     x_fit: torch.Tensor, y_fit: np.ndarray, names: list[str], forgeries: dict[int, int], seed: int,
                     held_source: str) -> str:
    """Give `final` its verify threshold (pair_calibration), never none: look-alike FAR 5% one-shot trials of
    held-out images where there are any, else of the training images (x_fit, y_fit); an equal-error pair
    threshold when one-shot trials cannot run; impostor pairs alone (FAR 5%) as the last resort. Returns the
    source ("held-out classes", "held-out images" or "training pairs"), recorded with its caveat."""
    # an encoder that trained nothing (an hf: backbone with --epochs 0) has not learned from the folder's images
    fit_source = "folder pairs, nothing trained" if notes.get("epochs_run") == 0 else "training pairs"
    for images, labels, source in ((x_val, y_val, held_source), (x_fit, y_fit, fit_source)):
        if len(labels) < 2 or len(np.unique(labels)) < 2:
            continue
        record: dict[str, Any] = lookalike_threshold(final, images, labels, names, forgeries, seed=seed)
        if not record:
            try:
                pairs = pair_threshold(final, images, labels, seed=seed, forgery_of=forgeries)
                record = {"threshold": pairs["pair_threshold"], "eer": pairs["pair_eer"], "references": 1,
                          "impostors": "any other class", "chosen_by": "siamesedb train",
                          "measured_on": f"{pairs['pair_count']} pairs, equal-error point"}
            except (InvalidInputError, ValueError, IndexError):
                record = {}
        if record:
            record.update(source=source, **({"caveat": CAVEATS[source]} if CAVEATS[source] else {}))
            final.config.pair_calibration = record
            return source
    vectors = final.encode_tensors(x_fit)  # every class a single image: impostor pairs alone fix a FAR threshold
    scores = score_matrix(vectors, vectors, final.config.metric) if len(vectors) > 1 else np.zeros((1, 1))
    impostor = scores[~np.eye(len(scores), dtype=bool)] if len(scores) > 1 else np.asarray([0.5])
    final.config.pair_calibration = {"threshold": far_threshold(impostor, 0.05), "target_far": 0.05, "references": 1,
                                     "impostors": "any other image", "chosen_by": "siamesedb train",
                                     "source": fit_source, "caveat": CAVEATS[fit_source]}
    return fit_source


def verification_report(final: Encoder, data: Any, plan: ValidationPlan, seed: int, log: Any,
                        chose: str = "the best epoch") -> dict[str, Any]:
    """The lead figure of a forgery folder: held-out writer EER with its interval, under both rules; the rule
    validation favours is recorded (notes["verify_rule"])."""
    vectors = final.encode_tensors(data.x_val)
    by_rule = {}
    for rule in ("prototype", "relative") if plan.references >= 3 else ("prototype",):
        genuine, impostor = writer_trials(vectors, data.y_val, data.forgeries, plan.references, 20, seed, rule,
                                          final.config.metric)
        by_rule[rule] = (eer_threshold(genuine, impostor)[1], eer_interval(genuine, impostor, seed), len(genuine),
                         len(impostor))
    rule = min(by_rule, key=lambda r: by_rule[r][0])
    eer, ci, g, i = by_rule[rule]
    writers = len({data.forgeries[f] for f in data.forgeries if f in set(data.y_val.tolist())})
    log(f"held-out verification EER: {eer:.2%} ± {ci:.2%} (95% bootstrap CI; {writers} held-out writers, "
        f"{plan.references} references, {g} genuine / {i} impostor trials: own skilled forgeries and other writers; "
        f"rule {rule}; it chose {chose})")
    if len(by_rule) > 1:
        log("  rules on the held-out writers: " + ", ".join(f"{r} {v[0]:.2%}" for r, v in by_rule.items())
            + f" -> verify with --rule {rule}")
    return {"task": "verification", "eer": float(eer), "ci95": ci, "references": plan.references, "rule": rule,
            "writers": writers, "genuine_trials": g, "impostor_trials": i,
            "by_rule": {r: round(float(v[0]), 5) for r, v in by_rule.items()}}


def within_group_report(final: Encoder, data: Any, way: int, episodes: int, seed: int, chose: bool,
                        log: Any) -> dict[str, Any]:
    """The lead figure of a folder whose held-out split is whole groups: 1-shot within each held-out group."""
    scores = within_group_episodes(final, data.x_val, data.y_val, data.names, way, episodes, seed)
    mean, ci = mean_ci95(scores.accuracies)
    held = np.unique(data.y_val).tolist()
    groups = sorted({group_of(data.names[c]) for c in held})
    log(f"held-out score: within-group 1-shot {mean:.2%} ± {ci:.2%} (95% CI, {len(scores.asked)} episodes over "
        f"{len(groups)} held-out groups of {len(held)} classes, as many ways as each group holds, at most {way}"
        + (", which also chose the best epoch)" if chose else ")"))
    return {"task": "groups", "accuracy": mean, "ci95": ci, "episodes": int(len(scores.asked)), "shot": 1,
            "max_way": way, "groups": len(groups), "classes": len(held)}


def finish_run(final: Encoder, folder: Any, out: Any, config: Any, data: Any, state: dict[str, Any], bf16: bool,
               log: Any, budget: dict[str, Any] | None = None, used: Any = None) -> None:
    """Score the best epoch's encoder on what validation held out (the lead figure with its interval), give it its
    verify threshold (never none), its notes, and write it with the run's config, history and loss curve."""
    import json
    from pathlib import Path

    from siamesedb.data import image_profile, scan_folder
    from siamesedb.plots import loss_curve

    forgeries, val_way, plan = data.forgeries, data.val_way, data.plan
    notes: dict[str, Any] = {"trained_on": str(folder), "train_config": config.to_dict(),
                             "best_epoch": state.get("best_epoch"), "val_accuracy": state.get("best_val"),
                             "epochs_run": state["epoch"], "stopped": state.get("stopped"),
                             "precision": "bf16" if bf16 else "fp32",
                             "validation": {"task": plan.task, "reason": plan.reason}}
    if plan.task == "verification":
        notes["val_accuracy"] = None
        notes["val_eer"] = (state.get("best_record") or {}).get("val_eer")
        notes["held_out"] = verification_report(final, data, plan, config.seed + 1, log)
        notes["verify_rule"] = notes["held_out"]["rule"]
    if plan.task == "groups":
        notes["held_out"] = within_group_report(final, data, val_way, config.final_episodes, config.seed + 1,
                                                bool(state["epoch"]), log)
    if data.has_val and val_way >= 2:
        accuracy, ci = held_out_score(final, data.x_val, data.y_val, val_way, config.final_episodes,
                                      seed=config.seed + 1, exclude=set(forgeries))
        held = len(set(np.unique(data.y_val).tolist()) - set(forgeries))
        where = "held-out images of the training classes" if plan.task == "images" else "held-out classes"
        score = {"way": val_way, "shot": 1, "accuracy": accuracy, "ci95": ci, "episodes": config.final_episodes,
                 "classes": held}
        second = plan.task in ("verification", "groups")  # the lead figure is the EER / the within-group score
        if plan.task == "verification":
            notes["held_out"]["identification"] = score
        elif plan.task == "groups":
            notes["held_out"]["unstructured"] = score
        else:
            notes["held_out"] = {"task": plan.task, **score}
        label = {"verification": "  writer identification", "groups": "  all held-out classes at once"}
        log(f"{label.get(plan.task, 'held-out score')}: {val_way}-way 1-shot "
            f"{accuracy:.2%} ± {ci:.2%} (95% CI, {config.final_episodes} episodes on the "
            + (f"held-out images of the {held} training classes" if plan.task == "images" else f"{held} {where}")
            + (", which also chose the best epoch)" if state["epoch"] and not second else ")"))
    if data.has_val:
        notes.update(pair_threshold(final, data.x_val, data.y_val, seed=config.seed, forgery_of=forgeries))
        if forgeries and plan.task != "verification":
            log(f"held-out pair EER (impostors half skilled forgeries): {notes['pair_eer']:.2%} ± "
                f"{notes.get('pair_eer_ci95', 0.0):.2%} (95% bootstrap CI, {notes['pair_count']} pairs)")
    final.config.notes = notes
    held_source = "held-out images" if plan.task == "images" else "held-out classes"
    source = ensure_threshold(final, notes, data.x_val, data.y_val, data.x_train[:data.originals],
                              data.y_train[:data.originals], data.names, forgeries, config.seed, held_source)
    cal = final.config.pair_calibration
    log(f"verify threshold {cal['threshold']:.4f} from {source}" + (f": FAR {cal['far']:.2%} / FRR {cal['frr']:.2%}, "
        f"one reference each, impostors: {cal['impostors']}" if "far" in cal else "")
        + (f" ({cal['caveat']})" if cal.get("caveat") else ""))
    if budget is not None:
        budget["used_s"] = round(float(used()), 1) if used else None
        notes["budget"] = budget
        over = budget["used_s"] - budget["budget_s"] if budget["used_s"] is not None else 0
        log(f"run took {budget['used_s'] / 60:.2f} min of its {budget['budget_s'] / 60:.2f}-minute budget"
            + (f" ({over:.0f} s over)" if over > 1 else "") + f", {budget['steps']} training steps")
    final.config.data_profile = image_profile([image.path for image in scan_folder(folder)], limit=64)
    final.config.name = final.config.name or Path(out).name
    final._fingerprint = None
    final.save(out)
    (Path(out) / "train_config.json").write_text(json.dumps(config.to_dict(), indent=2) + "\n")
    (Path(out) / "history.json").write_text(json.dumps(state["history"], indent=2) + "\n")
    loss_curve(state["history"], Path(out) / "loss_curve.png")
