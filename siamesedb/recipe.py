"""Look at a labelled folder, then choose a training recipe for it, with a stated reason for every choice.

`inspect_folder` reads a sample of the images (sizes, aspect, colour, background polarity, how much of the image is
background) and counts classes, images per class, groups and skilled-forgery classes. `choose_recipe` turns that
profile into TrainConfig settings. The rules follow what BENCHMARKS.md measured on this project:

- glyphs (sparse strokes on a plain background, about square): the shipped default's first stage, Conv-4 at 28x28,
  inverted grey input, prototypical 60-way 5-shot 5-query episodes, affine augmentation ("Training ablation");
- signatures (skilled-forgery folders, or wide sparse strokes): the signature member recipe, signet width 16 at
  64x128 with the aspect kept, inverted, 16-way episodes, at most 6 x 100 steps (longer overfits 24 writers);
- photos (anything else, colour or grey): a small residual net, square input (the native size when small, else 64),
  no inversion, flips and colour jitter on top of the affine distortions.

The prototypical loss everywhere: it beat contrastive and triplet at equal steps and tied triplet at equal images.
Every choice can be overridden: `choose_recipe(profile, overrides)` keeps what the caller set and fits the rest
(e.g. the episode's queries to the class sizes and the shot the caller chose).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from siamesedb.data import (
    FORGED,
    GENUINE,
    forgery_target,
    group_of,
    scan_folder,
    select_groups,
)
from siamesedb.errors import FolderError, ImageLoadError
from siamesedb.images import load_image

DEFAULT_TIME_BUDGET = 600.0  # seconds: 10 minutes, about 13 x 100 Conv-4 glyph steps on the project's 2-core CPU
SAMPLE_IMAGES = 200
# Per domain: the most epochs of 100 steps worth running (the budget may allow fewer, never more).
EPOCH_CAPS = {"glyph": 30, "signature": 6, "photo": 30}


@dataclass
class FolderProfile:
    """What `inspect_folder` saw: counts over the whole folder, image statistics over a sample."""

    images: int
    classes: int
    groups: int
    per_class_min: int
    per_class_median: float
    forgery_classes: int  # X/forged classes beside an X/genuine class
    sampled: int
    median_height: float
    median_width: float
    median_aspect: float  # width / height
    colour_share: float  # of the sampled images, the share with real chroma (not grey stored as RGB)
    light_background_share: float  # of the sampled images, the share whose border is light (ink on paper)
    background_share: float  # median share of pixels within 0.15 of the border's median value (sparse strokes: high)
    binary_share: float  # median share of pixels near pure black or white

    def to_dict(self) -> dict[str, Any]:
        return {k: (round(v, 4) if isinstance(v, float) else v) for k, v in self.__dict__.items()}


@dataclass
class Recipe:
    """Chosen TrainConfig settings, why each was chosen, the domain and the epoch cap for a time budget."""

    domain: str
    settings: dict[str, Any] = field(default_factory=dict)
    reasons: dict[str, str] = field(default_factory=dict)
    max_epochs: int = 30

    def choose(self, key: str, value: Any, reason: str) -> None:
        self.settings[key] = value
        self.reasons[key] = reason

    def lines(self) -> list[str]:
        """One printable line per choice: `name = value  (reason)`."""
        return [f"  {key} = {self.settings[key]}  ({reason})" for key, reason in self.reasons.items()]


def _image_statistics(image: Any) -> tuple[int, int, bool, bool, float, float]:
    """A PIL image -> (height, width, has colour, light border, background share, binary share)."""
    height, width = image.height, image.width
    small = image.copy()
    small.thumbnail((64, 64))  # statistics need no detail; keeps a sample of big photos cheap
    rgb = np.asarray(small.convert("RGB"), dtype=np.float32) / 255.0  # (h, w, 3) in [0, 1]
    chroma = float((rgb.max(axis=2) - rgb.min(axis=2)).mean())  # 0 for grey stored as RGB
    grey = rgb.mean(axis=2)
    frame = max(1, min(grey.shape) // 10)
    border = np.concatenate([grey[:frame].ravel(), grey[-frame:].ravel(), grey[:, :frame].ravel(), grey[:, -frame:].ravel()])
    level = float(np.median(border))
    background = float((np.abs(grey - level) < 0.15).mean())
    binary = float(((grey < 0.1) | (grey > 0.9)).mean())
    return height, width, chroma > 0.04, level > 0.5, background, binary


def inspect_folder(folder: str | Path, groups: str | None = None, sample: int = SAMPLE_IMAGES,
                   seed: int = 0) -> FolderProfile:
    """Count the folder's classes and read up to `sample` of its images (spread over classes at random)."""
    images = select_groups(scan_folder(folder), groups)
    labels = [im.label for im in images]
    names, counts = np.unique(np.asarray(labels, dtype=object).astype(str), return_counts=True)
    name_set = frozenset(names.tolist())
    forged = sum(1 for n in names if forgery_target(n, name_set) is not None)
    rng = np.random.default_rng(seed)
    order = rng.permutation(len(images))
    stats = []
    for i in order:
        if len(stats) >= sample:
            break
        try:
            stats.append(_image_statistics(load_image(images[i].path)))
        except ImageLoadError:
            continue  # training skips unreadable files too; they say nothing about the rest
    if not stats:
        raise FolderError(f"{folder}: none of the sampled images could be read")
    table = np.asarray(stats, dtype=np.float64)  # (n, 6)
    return FolderProfile(
        images=len(images), classes=len(names), groups=len({group_of(n) for n in names}),
        per_class_min=int(counts.min()), per_class_median=float(np.median(counts)), forgery_classes=forged,
        sampled=len(stats), median_height=float(np.median(table[:, 0])), median_width=float(np.median(table[:, 1])),
        median_aspect=float(np.median(table[:, 1] / table[:, 0])), colour_share=float(table[:, 2].mean()),
        light_background_share=float(table[:, 3].mean()), background_share=float(np.median(table[:, 4])),
        binary_share=float(np.median(table[:, 5])),
    )


def classify_domain(profile: FolderProfile) -> tuple[str, str]:
    """(glyph | signature | photo, the reason)."""
    # Ink or chalk: most pixels are plain background, and nearly all are near pure black or white (photos, even on
    # a plain backdrop, are full of mid-tones).
    sparse = profile.background_share >= 0.75 and profile.binary_share >= 0.75 and profile.colour_share < 0.2
    if profile.forgery_classes:
        return "signature", f"{profile.forgery_classes} skilled-forgery classes (X/{FORGED} beside X/{GENUINE})"
    if sparse and profile.median_aspect >= 1.6:
        return "signature", (f"sparse strokes ({profile.background_share:.0%} background) on wide images "
                             f"(median aspect {profile.median_aspect:.1f})")
    if sparse:
        return "glyph", (f"sparse strokes on a plain background ({profile.background_share:.0%} of pixels), about "
                         f"square (median aspect {profile.median_aspect:.1f})")
    colour = "colour" if profile.colour_share >= 0.2 else "grey"
    return "photo", (f"{colour} images with filled content ({profile.background_share:.0%} plain background, "
                     f"{profile.binary_share:.0%} of pixels near black or white)")


def _base_classes(profile: FolderProfile) -> int:
    """Classes a validation split can hold out: a genuine class and its forgeries count once."""
    return profile.classes - profile.forgery_classes


def choose_recipe(profile: FolderProfile, overrides: dict[str, Any] | None = None) -> Recipe:
    """Settings for TrainConfig, each with its reason; `overrides` (flags the user gave) win and are marked so."""
    overrides = {k: v for k, v in (overrides or {}).items() if v is not None}
    domain, why = classify_domain(profile)
    recipe = Recipe(domain=domain, max_epochs=EPOCH_CAPS[domain])
    recipe.reasons["domain"] = why
    recipe.settings["domain"] = domain
    grey = profile.colour_share < 0.2
    light = profile.light_background_share >= 0.5

    if domain == "glyph":
        recipe.choose("image_size", 28, "small glyphs: 28x28, the shipped default's input (40x40 measured about 1 "
                                        "point better at twice the cost, BENCHMARKS 'Training ablation')")
        recipe.choose("image_width", None, "square")
        recipe.choose("keep_aspect", False, "glyphs are about square")
        recipe.choose("backbone", "conv4", "Conv-4 for small glyphs (the shipped default's backbone)")
        recipe.choose("width", 64, "64 channels: width 128 tied it at convergence for 3.3x the cost")
    elif domain == "signature":
        recipe.choose("image_size", 64, "signatures: 64x128, the measured signature recipe (96x192 no better)")
        recipe.choose("image_width", 128, "wide signatures keep their left-to-right layout")
        recipe.choose("keep_aspect", True, "fit inside 64x128 and pad, so a short name is not stretched")
        recipe.choose("backbone", "signet", "the small SigNet-style net of the signature recipe")
        recipe.choose("width", 16, "width 16: width 32 measured no better for 2.3x the cost")
    else:
        side = int(min(profile.median_height, profile.median_width))
        size = max(16, side - side % 4) if side <= 64 else 64
        recipe.choose("image_size", size, f"photos: square input, {'their native ' + str(side) + ' px' if side <= 64 else '64 px (a 2-core CPU budget; larger costs quadratically)'}")
        recipe.choose("image_width", None, "square")
        recipe.choose("keep_aspect", False, f"median aspect {profile.median_aspect:.2f}: resized to the square")
        recipe.choose("backbone", "resnet", "a small residual net for photos")
        recipe.choose("width", 16, "width 16 (4 stages of 16-128 channels): affordable on a CPU")
    recipe.choose("embedding_dim", 64, "64-d vectors, as the shipped default")
    recipe.choose("channels", 1 if grey or domain != "photo" else 3,
                  f"{profile.colour_share:.0%} of sampled images carry colour" + ("" if grey else ": RGB input"))
    invert = domain in ("glyph", "signature") and light
    recipe.choose("invert", invert, "dark ink on light paper: inverted so the background is zero" if invert else
                  ("light strokes on a dark background: kept as they are" if domain != "photo" else
                   "photos are not inverted"))

    recipe.choose("loss", "proto", "prototypical: beat contrastive and triplet at equal steps (BENCHMARKS ablation)")
    classes = _base_classes(profile)
    # Groups worth holding out whole (Omniglot's alphabets): several of them, each of several classes. A flat folder
    # has one group per class; a forgery folder's groups are its writers (validated by verification instead).
    grouped = (not profile.forgery_classes and classes >= 40 and profile.groups >= 3
               and classes >= 4 * profile.groups)
    # What validation measures (validation.plan_validation): held-out writers' verification EER on a forgery
    # folder; N-way over >= 8 held-out classes; with fewer classes, held-out images of every class.
    if profile.forgery_classes:
        val_fraction = round(max(2, classes * 0.15) / classes, 3) if classes >= 8 else 0.2
        why = (f"{classes} writers with skilled forgeries: hold out {val_fraction:.0%} of them, epochs chosen by their "
               "verification EER" if classes >= 8 else f"{classes} writers: too few to hold writers out, so 20% of "
               "each writer's images are held out instead")
    elif classes >= 40:
        val_fraction = round(max(0.1, 8 / classes), 3)
        why = (f"{classes} classes in {profile.groups} groups: hold out whole groups holding {val_fraction:.0%} of the "
               "classes (at least 8, at least 2 groups), epochs chosen by 1-shot accuracy within each held-out group "
               "(as many ways as it holds), best epoch kept, early stop" if grouped else
               f"{classes} classes: hold out {val_fraction:.0%} of them (at least 8), epochs chosen by N-way 1-shot "
               "over all of them, best epoch kept, early stop")
    else:
        val_fraction = 0.2
        why = (f"{classes} classes: too few to hold 8 whole classes out and still train, so 20% of each class's "
               "images are held out instead (a score on seen classes, optimistic for new ones)")
    recipe.choose("val_fraction", val_fraction, why)
    if grouped:
        recipe.choose("hold_out_groups", True, f"{profile.groups} groups of about {classes / profile.groups:.0f} "
                                               "classes: validation meets groups training never saw, as the test does")
    recipe.choose("val_way", 100, "validation episodes as wide as the held-out classes allow (at most 100-way)")
    held = float(overrides.get("val_fraction", val_fraction))  # the episode must fit the split that will really run
    few = classes < (8 if profile.forgery_classes else 40) or (not profile.forgery_classes and classes * held < 7.5)
    if few and "val_fraction" not in overrides:  # (a --val-fraction flag holds out classes, however few: cli_train)
        held = 0.0  # held-out images, not classes: every class trains
    train_classes = classes - int(round(classes * held)) + profile.forgery_classes
    way_cap = {"glyph": 60, "signature": 16, "photo": 20}[domain]
    recipe.choose("way", max(2, min(way_cap, train_classes)),
                  f"{train_classes} training classes; at most {way_cap} per episode ("
                  + {"glyph": "Snell et al.'s 60-way", "signature": "the signature recipe's 16-way",
                     "photo": "20-way tied 60-way at equal images and costs less a step"}[domain] + ")")
    smallest = profile.per_class_min
    if held == 0.0 and val_fraction and smallest >= 4:  # held-out images leave the smallest class this many to train
        smallest -= max(2, int(round(smallest * val_fraction)))
    shot = int(overrides.get("shot", 5 if smallest >= 10 else max(1, smallest // 2)))
    recipe.choose("shot", shot, f"smallest class holds {smallest} images")
    queries = max(1, min(5, smallest - shot))
    recipe.choose("queries", queries, f"{shot} support + {queries} query images fit the smallest class ({smallest})")

    recipe.choose("augment", True, "affine distortions: worth 1-2 points on glyphs, 2.5 EER points on signatures")
    recipe.choose("augment_strength", 1.0, "strength 1 measured best on signatures (0 and 2 worse)")
    photo = domain == "photo"
    recipe.choose("flip", photo, "left-right flips: " + ("a mirrored photo shows the same thing" if photo else
                                                          "off, a mirrored character or signature is another one"))
    recipe.choose("color_jitter", 0.2 if photo else 0.0,
                  "brightness/contrast jitter for photos" if photo else "off for ink on paper")
    recipe.choose("precision", "auto", "bfloat16 autocast where the CPU has it and the step measured faster")
    recipe.choose("patience", 4, "stop after 4 epochs without a better validation score")
    if domain == "signature":
        recipe.choose("members", 3, "3 short members in the budget, then a member or the members joined, whitened "
                                    "on the training writers or not, and the rule, as held-out writers' EER "
                                    "chooses (by hand: one member 20.8-24.7%, nine joined + whitened 16.1%)")
    recipe.reasons["steps"] = (f"epochs of 100 steps fitted to the time budget after timing the first steps, at most "
                               f"{recipe.max_epochs}" + (" (longer training overfitted 24 signature writers)"
                                                         if domain == "signature" else ""))
    recipe.settings["steps"] = "budget"

    for key, value in overrides.items():  # the user's flags win
        if key in recipe.settings or key in ("shot",):
            recipe.settings[key] = value
            recipe.reasons[key] = "set by flag"
    if "shot" in overrides or "queries" not in overrides:
        # keep the episode inside the smallest class whatever shot was chosen
        recipe.settings["queries"] = max(1, min(recipe.settings["queries"], smallest - recipe.settings["shot"]))
    return recipe


def train_settings(recipe: Recipe) -> dict[str, Any]:
    """The recipe's settings that are TrainConfig fields (domain and steps are descriptions, not fields)."""
    return {k: v for k, v in recipe.settings.items() if k not in ("domain", "steps")}
