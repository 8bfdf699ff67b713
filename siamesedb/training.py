"""The training loop: a Siamese encoder (one network applied to both sides of every pair) trained on a labelled folder."""

from __future__ import annotations

import copy
import json
import math
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, fields, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file, save_file
from torch.nn import functional as F

from siamesedb import query
from siamesedb.data import (
    FORGED,
    GENUINE,
    ClassBalancedSampler,
    LabelledImage,
    EpisodeSampler,
    PairSampler,
    Preprocessing,
    forgery_target,
    group_of,
    image_profile,
    iter_batches,
    scan_folder,
    select_groups,
)
from siamesedb.encoder import Encoder, EncoderConfig, Whitened, resolve_device
from siamesedb.errors import InvalidInputError
from siamesedb.losses import ContrastiveLoss, PairwiseBCELoss, PrototypicalLoss, TripletLoss

LOSSES = ("contrastive", "triplet", "bce", "proto")
PRECISIONS = ("auto", "fp32", "bf16")
CHECKPOINT_DIR = "checkpoint"


def cpu_supports_bf16() -> bool:
    """True when the CPU has native bfloat16 arithmetic (x86 flags avx512_bf16 or amx_bf16, Linux /proc/cpuinfo)."""
    try:
        with open("/proc/cpuinfo") as handle:
            for line in handle:
                if line.startswith("flags"):
                    flags = set(line.split(":", 1)[1].split())
                    return bool({"avx512_bf16", "amx_bf16"} & flags)
    except OSError:
        pass
    return False


@dataclass
class TrainConfig:
    """Every knob of a training run; saved as train_config.json beside the trained encoder."""

    loss: str = "contrastive"
    epochs: int = 10
    steps_per_epoch: int = 200
    batch_size: int = 128  # pairs per step (contrastive, bce) or items per step (triplet); proto uses way/shot/queries
    lr: float = 1e-3
    weight_decay: float = 0.0
    margin: float | None = None  # None: 0.75 for contrastive, 0.2 for triplet
    mining: str = "batch_hard"
    per_class: int = 4  # K of the P x K triplet batches
    way: int = 60  # proto episodes: classes, support and query items per class (Snell et al. trained 60-way)
    shot: int = 5
    queries: int = 5
    proto_scale: float = 10.0  # logit scale of the prototypical loss on unit vectors (see losses.PrototypicalLoss)
    normalize_train: bool = True  # False: losses see raw embeddings (Snell et al.'s Euclidean head); search stays cosine
    backbone: str = "conv4"
    embedding_dim: int = 64
    width: int = 64
    image_size: int = 28  # input height (and width, unless image_width is set)
    image_width: int | None = None
    channels: int = 1
    invert: bool = True
    keep_aspect: bool = False
    augment: bool = True
    augment_strength: float = 1.0  # scales every affine range of `augment` (1: rotation 10 deg, scale 0.9-1.1, ...)
    rotate_classes: bool = False  # add 90/180/270-degree copies of every training class as new classes (Vinyals et al. 2016)
    mirror_classes: bool = False  # add a left-right mirror copy of every training class (of every rotation) as a new class
    seed: int = 0
    device: str = "auto"
    val_fraction: float = 0.1  # of the classes, held out whole for validation
    val_episodes: int = 200
    val_way: int = 20
    workers: int = 2  # decoding processes while loading the folder
    groups: str | None = None  # train only on these groups (first label component): "U01-U30", "Latin,Greek"
    hard_negative_fraction: float = 0.5  # of impostor pairs drawn as (genuine, its skilled forgery) where forgeries exist
    forgery_episodes: bool = False  # proto: an episode with a genuine class also holds its forgeries (measured worse on SVC2004)
    init: str | None = None  # start from this encoder's weights (name or folder): fine-tuning, e.g. after pretraining
    within_group: float = 0.0  # proto: this share of episodes takes all its classes from one group (alphabet)
    # "cosine": unit vectors, searched by inner product; "euclidean": raw embeddings, losses on (squared) Euclidean
    # distances (contrastive margin in distance units; proto on -d^2 with scale 1, as Snell et al.), searched by L2.
    metric: str = "cosine"
    hidden: list[int] | None = None  # mlp backbone: hidden layer sizes (None: 128, 64, 32)
    dropout: float | None = None  # mlp backbone: dropout after the hidden layers (None: 0.1)
    flip: bool = False  # augmentation: random left-right flips (photos; never glyphs or signatures)
    color_jitter: float = 0.0  # augmentation: brightness and contrast scaled by up to +-this (photos)
    precision: str = "auto"  # auto: bfloat16 autocast on CUDA, and on CPUs with native bf16 for BF16_FASTER backbones
    time_budget: float | None = None  # seconds for the whole run: epochs fitted after timing the first steps
    patience: int | None = None  # stop after this many epochs without a better validation score (None: never)
    final_episodes: int = 1000  # episodes of the final held-out score (with its 95% interval)
    recipe: dict[str, Any] | None = None  # what siamesedb.recipe saw and chose, with a reason per choice (record only)

    def __post_init__(self) -> None:
        if self.loss not in LOSSES:
            raise InvalidInputError(f"unknown loss {self.loss!r}; choose from {', '.join(LOSSES)}")
        if self.epochs < 1 or self.steps_per_epoch < 1 or self.batch_size < 2:
            raise InvalidInputError("epochs and steps per epoch must be >= 1, batch size >= 2")
        if self.rotate_classes and self.image_width not in (None, self.image_size):
            raise InvalidInputError("rotate_classes needs square inputs (image_width equal to image_size)")
        if not 0.0 <= self.within_group <= 1.0:
            raise InvalidInputError(f"within_group must be a fraction in [0, 1], got {self.within_group}")
        if not 0.0 <= self.augment_strength <= 3.0:
            raise InvalidInputError(f"augment_strength must lie in [0, 3], got {self.augment_strength}")
        if self.metric not in ("cosine", "euclidean"):
            raise InvalidInputError(f"unknown metric {self.metric!r}; choose from cosine, euclidean")
        if (self.hidden is not None or self.dropout is not None) and self.backbone != "mlp":
            raise InvalidInputError(f"--hidden and --dropout apply to the mlp backbone, not {self.backbone!r}")
        if not 0.0 <= self.val_fraction < 1.0:
            raise InvalidInputError(f"val_fraction must lie in [0, 1), got {self.val_fraction}")
        if self.precision not in PRECISIONS:
            raise InvalidInputError(f"unknown precision {self.precision!r}; choose from {', '.join(PRECISIONS)}")
        if self.time_budget is not None and not self.time_budget > 0:
            raise InvalidInputError(f"time budget must be positive, got {self.time_budget}")
        if self.patience is not None and self.patience < 1:
            raise InvalidInputError(f"patience must be >= 1 epoch, got {self.patience}")
        if not 0.0 <= self.color_jitter < 1.0:
            raise InvalidInputError(f"color_jitter must lie in [0, 1), got {self.color_jitter}")

    @property
    def effective_margin(self) -> float:
        if self.margin is not None:
            return self.margin
        return 0.75 if self.loss == "contrastive" else 0.2

    def preprocessing(self) -> Preprocessing:
        return Preprocessing(size=(self.image_size, self.image_width or self.image_size), channels=self.channels,
                             invert=self.invert,
                             keep_aspect=self.keep_aspect)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> TrainConfig:
        names = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in names})


def augment(batch: torch.Tensor, generator: torch.Generator, strength: float = 1.0, background_zero: bool = True) -> torch.Tensor:
    """Small random affine distortions, batched on the batch's device (Koch et al. 2015 used affine distortions).

    (N, C, H, W) -> (N, C, H, W): rotation up to 10 degrees, scale 0.9-1.1, shear up to 0.15, translation up to 2 px,
    each scaled by `strength` (0 gives the identity).
    """
    n, _, h, w = batch.shape
    rand = torch.rand((n, 6), generator=generator).to(batch.device) * 2 - 1  # uniform in [-1, 1]
    angle = rand[:, 0] * math.radians(10) * strength
    scale = 1 + rand[:, 1] * 0.1 * strength
    shear = rand[:, 2] * 0.15 * strength
    tx = rand[:, 3] * (2.0 / (w / 2)) * strength  # 2 px in affine_grid's [-1, 1] coordinates
    ty = rand[:, 4] * (2.0 / (h / 2)) * strength
    cos, sin = torch.cos(angle), torch.sin(angle)
    theta = torch.stack(
        [
            torch.stack([cos / scale, (-sin + shear) / scale, tx], dim=1),
            torch.stack([sin / scale, cos / scale, ty], dim=1),
        ],
        dim=1,
    )  # (N, 2, 3)
    grid = F.affine_grid(theta, list(batch.shape), align_corners=False)
    return F.grid_sample(batch, grid, mode="bilinear", padding_mode="zeros" if background_zero else "border", align_corners=False)


def photometric(batch: torch.Tensor, generator: torch.Generator, flip: bool, jitter: float) -> torch.Tensor:
    """Photo augmentation on (N, C, H, W) in [0, 1]: random left-right flips, brightness and contrast jitter.

    Brightness multiplies by 1 + U(-jitter, jitter); contrast blends each image with its own mean grey by another
    such factor. Values are clamped back into [0, 1].
    """
    n = batch.shape[0]
    if flip:
        flipped = torch.rand(n, generator=generator) < 0.5
        batch = torch.where(flipped.to(batch.device)[:, None, None, None], torch.flip(batch, dims=(3,)), batch)
    if jitter:
        factors = (1 + (torch.rand((n, 2), generator=generator) * 2 - 1) * jitter).to(batch.device)  # (N, 2)
        mean = batch.mean(dim=(1, 2, 3), keepdim=True)
        batch = (batch - mean) * factors[:, 1, None, None, None] + mean * factors[:, 0, None, None, None]
        batch = batch.clamp(0, 1)
    return batch


# Backbones whose training step measured faster under CPU bfloat16 autocast (tools/bench_train_bf16.py, BENCHMARKS.md)
BF16_FASTER_BACKBONES = frozenset({"conv4", "conv4map", "resnet", "signet"})


def use_bf16(precision: str, device: torch.device, backbone: str) -> bool:
    """Whether training autocasts to bfloat16: always on CUDA under auto; on CPU only with native bf16 support."""
    if precision == "fp32":
        return False
    if device.type == "cuda":
        return True
    if precision == "bf16":
        return True
    return device.type == "cpu" and backbone in BF16_FASTER_BACKBONES and cpu_supports_bf16()


def parse_duration(text: str) -> float:
    """'10m', '90s', '1.5h', '600' (seconds) -> seconds."""
    units = {"s": 1.0, "m": 60.0, "h": 3600.0}
    spec = str(text).strip().lower()
    scale = units.get(spec[-1:], None)
    number = spec[:-1] if scale else spec
    try:
        value = float(number) * (scale or 1.0)
    except ValueError:
        raise InvalidInputError(f"time budget {text!r}: give seconds or a number with s, m or h (e.g. 10m)") from None
    if not value > 0:
        raise InvalidInputError(f"time budget {text!r} must be positive")
    return value


def fit_schedule(budget_left: float, step_seconds: float, val_seconds: float, steps_per_epoch: int,
                 max_epochs: int) -> tuple[int, int]:
    """(epochs, steps per epoch) that fill `budget_left` seconds, each epoch costing its steps plus one validation.

    Whole epochs of `steps_per_epoch` up to `max_epochs`; when fewer than 3 such epochs fit, 3 shorter ones (or as
    few steps as fit, never under 1), so validation still gets to pick a best epoch.
    """
    epoch_seconds = steps_per_epoch * step_seconds + val_seconds
    epochs = int(budget_left // epoch_seconds)
    if epochs >= 3:
        return min(epochs, max_epochs), steps_per_epoch
    epochs = 3 if budget_left > 3 * (val_seconds + 10 * step_seconds) else 1
    steps = int((budget_left / epochs - val_seconds) // step_seconds)
    return epochs, max(1, min(steps, steps_per_epoch))


def held_out_score(encoder: Encoder, images: torch.Tensor, labels: np.ndarray, way: int, episodes: int, seed: int,
                   exclude: set[int] | frozenset[int] = frozenset()) -> tuple[float, float]:
    """(mean, 95% CI half-width) of N-way 1-shot accuracy over `episodes` seeded episodes of held-out classes."""
    keep = ~np.isin(labels, list(exclude))
    vectors = encoder.encode_tensors(images[torch.from_numpy(keep)])
    labels = labels[keep]
    sampler = EpisodeSampler(labels, way=min(way, len(np.unique(labels))), shot=1, queries=1, seed=seed)
    accuracies = np.empty(episodes)
    for e in range(episodes):
        support, queried, answer = sampler.sample()
        scores = query.scores_for(encoder.config.metric, vectors[queried], vectors[support])
        accuracies[e] = float((scores.argmax(axis=1) == answer).mean())
    ci = 1.96 * accuracies.std(ddof=1) / math.sqrt(episodes) if episodes > 1 else 0.0
    return float(accuracies.mean()), float(ci)


def _load_folder(folder: Path, config: TrainConfig, log: Callable[[str], None]) -> tuple[torch.Tensor, np.ndarray, list[str]]:
    """Every readable image of the folder: ((N, C, H, W) float32, class index (N,), class names)."""
    images = select_groups(scan_folder(folder), config.groups)
    chunks, kept_labels, skipped = [], [], 0
    for kept, tensor, bad in iter_batches(images, config.preprocessing(), batch_size=512, workers=config.workers):
        chunks.append(tensor)
        kept_labels.extend(images[i].label for i in kept)
        skipped += len(bad)
    if skipped:
        log(f"skipped {skipped} unreadable files")
    names, index = np.unique(np.asarray(kept_labels, dtype=object).astype(str), return_inverse=True)
    return torch.cat(chunks), index.astype(np.int64), [str(n) for n in names]


def _split_classes(names: list[str], fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Hold out a fraction of the classes, keeping a genuine class and its forgeries on the same side."""
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
    _, held = _split_classes(names, fraction, seed)
    held_names = {names[i] for i in held}
    return [image for image in images if image.label in held_names]


def forgery_map(names: list[str]) -> dict[int, int]:
    """Class index of each forged class -> class index of the genuine class it imitates."""
    position = {n: i for i, n in enumerate(names)}
    return {i: position[t] for i, n in enumerate(names) if (t := forgery_target(n, frozenset(position))) is not None}


def validation_accuracy(encoder: Encoder, images: torch.Tensor, labels: np.ndarray, way: int, episodes: int,
                        seed: int, exclude: set[int] | frozenset[int] = frozenset()) -> float:
    """Mean N-way 1-shot accuracy over seeded episodes of held-out classes (prototype = the single support vector).

    Classes in `exclude` (skilled-forgery classes) take no part: they are no class a user would enrol.
    """
    keep = ~np.isin(labels, list(exclude))
    vectors = encoder.encode_tensors(images[torch.from_numpy(keep)])
    labels = labels[keep]
    sampler = EpisodeSampler(labels, way=min(way, len(np.unique(labels))), shot=1, queries=1, seed=seed)
    correct = 0
    for _ in range(episodes):
        support, queried, answer = sampler.sample()
        # (way, way): support is class-major with shot 1
        scores = query.scores_for(encoder.config.metric, vectors[queried], vectors[support])
        correct += int((scores.argmax(axis=1) == answer).sum())
    return correct / (episodes * sampler.way)


def _load_initial_weights(encoder: Encoder, source: str) -> None:
    """Copy the weights of encoder `source` into `encoder`: the same backbone, width, dimension and input size."""
    start = Encoder.load(source, device=encoder.device)
    ours, theirs = encoder.config, start.config
    if theirs.members > 1 or theirs.whitening:
        raise InvalidInputError(f"--init {source}: an ensemble or whitened encoder cannot seed a training run")
    mine = (ours.backbone, ours.width, ours.embedding_dim, ours.preprocessing.size, ours.preprocessing.channels)
    given = (theirs.backbone, theirs.width, theirs.embedding_dim, theirs.preprocessing.size, theirs.preprocessing.channels)
    if mine != given:
        raise InvalidInputError(
            f"--init {source}: its (backbone, width, dim, input size, channels) {given} differ from this run's {mine}"
        )
    encoder.net.load_state_dict(start.net.state_dict())


def within_class_whitening(vectors: np.ndarray, labels: Sequence[Any], ridge: float = 0.03) -> np.ndarray:
    """(N, D) unit vectors and their class labels -> the (D, D) symmetric map A^(-1/2), A = Sw + ridge * mean
    eigenvalue of Sw * I, where Sw is the mean over classes (each class weighted alike) of the class's own
    covariance. Multiplying vectors by it flattens the directions along which items of one class already spread.

    Classes with fewer than two items carry no spread and are skipped; the ridge keeps rare directions from being
    blown up by noise (the measured EERs in BENCHMARKS.md barely move between ridge 0.01 and 0.1).
    """
    vectors = np.asarray(vectors, dtype=np.float64)
    if vectors.ndim != 2:
        raise InvalidInputError(f"vectors must be (N, D), got shape {vectors.shape}")
    if ridge <= 0:
        raise InvalidInputError(f"ridge must be > 0, got {ridge}")
    _, inverse = np.unique(np.asarray(labels, dtype=object).astype(str), return_inverse=True)
    dim = vectors.shape[1]
    scatter, classes = np.zeros((dim, dim)), 0
    for c in range(inverse.max() + 1 if len(inverse) else 0):
        members = vectors[inverse == c]
        if len(members) < 2:
            continue
        centred = members - members.mean(axis=0)
        scatter += centred.T @ centred / len(members)  # (D, D) this class's covariance
        classes += 1
    if classes == 0:
        raise InvalidInputError("whitening needs at least one class with two or more items")
    scatter /= classes
    regularised = scatter + ridge * np.trace(scatter) / dim * np.eye(dim)
    eigenvalues, eigenvectors = np.linalg.eigh(regularised)
    return (eigenvectors / np.sqrt(eigenvalues)) @ eigenvectors.T  # (D, D), symmetric


def whitened_encoder(encoder: Encoder, vectors: np.ndarray, labels: Sequence[Any], ridge: float = 0.03,
                     notes: dict[str, Any] | None = None) -> Encoder:
    """A new Encoder: `encoder` followed by the within-class whitening fitted on its own `vectors` of `labels`."""
    if encoder.config.whitening:
        raise InvalidInputError("this encoder is already whitened")
    if encoder.config.metric != "cosine":
        raise InvalidInputError("whitening maps unit vectors: it applies to cosine encoders, not Euclidean ones")
    matrix = within_class_whitening(vectors, labels, ridge)  # (D, D)
    config = EncoderConfig.from_dict({**encoder.config.to_dict(), "whitening": True})
    config.notes = {**config.notes, "whitening": {"ridge": ridge, "items": len(vectors), **(notes or {})}}
    net = Whitened(encoder.net, encoder.dimension)
    with torch.no_grad():
        net.linear.weight.copy_(torch.from_numpy(matrix.T.astype(np.float32)))  # Linear computes x @ weight.T
    return Encoder(config, net=net, device=encoder.device)


def lookalike_threshold(encoder: Encoder, images: torch.Tensor, labels: np.ndarray, names: list[str],
                        forgery_of: dict[int, int], seed: int, target_far: float = 0.05) -> dict[str, Any]:
    """The threshold `verify` uses on an uncalibrated index: the lowest with FAR <= `target_far` on one-shot trials
    of held-out classes (one random reference each) against look-alike impostors -- the other held-out classes of
    the same group where groups hold several (alphabets; a writer's skilled forgeries), else any other class.
    {} when the held-out classes are too few to say anything."""
    from siamesedb.evaluation import oneshot_verification_trials

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
    threshold = query.far_threshold(impostor, target_far)
    return {"threshold": threshold, "target_far": target_far, "far": float(np.mean(impostor >= threshold)),
            "frr": float(np.mean(genuine < threshold)), "references": 1,
            "impostors": "other classes of the same group" if same_group else "any other class",
            "measured_on": f"{len(set(class_names))} held-out classes, {len(genuine)} genuine / {len(impostor)} "
                           "impostor trials", "chosen_by": "siamesedb train"}


def pair_threshold(encoder: Encoder, images: torch.Tensor, labels: np.ndarray, seed: int, pairs: int = 4000,
                   forgery_of: dict[int, int] | None = None) -> dict[str, float]:
    """Equal-error threshold for `verify IMAGE_A IMAGE_B` from genuine / impostor pairs of held-out classes."""
    vectors = encoder.encode_tensors(images)
    a, b, same = PairSampler(labels, seed=seed, forgery_of=forgery_of).sample(pairs)
    if encoder.config.metric == "euclidean":
        scores = -np.linalg.norm(vectors[a] - vectors[b], axis=1)  # higher is more similar: minus the distance
    else:
        scores = np.einsum("nd,nd->n", vectors[a], vectors[b])
    threshold, eer = query.eer_threshold(scores[same == 1], scores[same == 0])
    # 95% interval of the EER: 200 bootstrap resamples of the pairs (seeded, so the figure is reproducible)
    rng = np.random.default_rng(seed)
    resampled = []
    for _ in range(200):
        pick = rng.integers(0, len(scores), len(scores))
        genuine, impostor = scores[pick][same[pick] == 1], scores[pick][same[pick] == 0]
        if len(genuine) and len(impostor):
            resampled.append(query.eer_threshold(genuine, impostor)[1])
    ci = float((np.percentile(resampled, 97.5) - np.percentile(resampled, 2.5)) / 2) if resampled else 0.0
    return {"pair_threshold": threshold, "pair_eer": eer, "pair_eer_ci95": ci, "pair_count": pairs}


def _save_checkpoint(folder: Path, encoder: Encoder, optimizer: torch.optim.Optimizer, loss_module: torch.nn.Module,
                     state: dict[str, Any]) -> None:
    """Weights, loss head and Adam moments as safetensors, the rest as JSON: no pickle anywhere."""
    folder.mkdir(parents=True, exist_ok=True)
    encoder.save(folder)
    tensors = {f"loss.{k}": v.detach().cpu().contiguous() for k, v in loss_module.state_dict().items()}
    for i, param_state in enumerate(optimizer.state_dict()["state"].values()):
        for key, value in param_state.items():
            tensors[f"adam.{i}.{key}"] = torch.as_tensor(value).detach().cpu().contiguous().reshape(-1) if key == "step" else value.detach().cpu().contiguous()
    save_file(tensors, str(folder / "trainer.safetensors.tmp"))
    os.replace(folder / "trainer.safetensors.tmp", folder / "trainer.safetensors")
    (folder / "state.json.tmp").write_text(json.dumps(state, indent=2))
    os.replace(folder / "state.json.tmp", folder / "state.json")


def _restore_checkpoint(folder: Path, encoder: Encoder, optimizer: torch.optim.Optimizer,
                        loss_module: torch.nn.Module) -> dict[str, Any]:
    saved = Encoder.load(folder, device=encoder.device)
    encoder.net.load_state_dict(saved.net.state_dict())
    tensors = load_file(str(folder / "trainer.safetensors"))
    loss_state = {k[len("loss."):]: v for k, v in tensors.items() if k.startswith("loss.")}
    if loss_state:
        loss_module.load_state_dict(loss_state)
    opt_state = optimizer.state_dict()
    for i, pid in enumerate(opt_state["param_groups"][0]["params"]):
        entry = {}
        for key in ("step", "exp_avg", "exp_avg_sq"):
            name = f"adam.{i}.{key}"
            if name in tensors:
                entry[key] = tensors[name].reshape(()) if key == "step" else tensors[name].to(encoder.device)
        if entry:
            opt_state["state"][pid] = entry
    optimizer.load_state_dict(opt_state)
    return json.loads((folder / "state.json").read_text())


def plot_history(history: list[dict[str, float]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    epochs = [h["epoch"] for h in history]
    fig, left = plt.subplots(figsize=(6, 3.5), dpi=100)
    left.plot(epochs, [h["loss"] for h in history], "o-", color="tab:blue", label="training loss")
    left.set_xlabel("epoch")
    left.set_ylabel("loss", color="tab:blue")
    if any(h.get("val_accuracy") is not None for h in history):
        right = left.twinx()
        right.plot(epochs, [h.get("val_accuracy") for h in history], "s-", color="tab:red", label="validation")
        right.set_ylabel(f"held-out {history[-1].get('val_way', 20)}-way 1-shot accuracy", color="tab:red")
        right.set_ylim(0, 1.02)  # an accuracy: a flat line at 1.0 must not be stretched into a band around it
    from matplotlib.ticker import MaxNLocator

    left.xaxis.set_major_locator(MaxNLocator(integer=True))  # epochs are whole numbers
    left.set_title("siamesedb train")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def train(folder: str | os.PathLike, out_dir: str | os.PathLike, config: TrainConfig | None = None,
          progress: bool = True, resume: bool = False, log: Callable[[str], None] | None = None,
          started: float | None = None) -> Encoder:
    """Train an encoder on a labelled folder; write it (config.json + model.safetensors) and its logs to out_dir.

    `started`: the time.perf_counter() at which a time budget starts counting (default: now; the CLI passes the
    moment it began inspecting the folder).
    """
    from tqdm import tqdm

    run_started = started if started is not None else time.perf_counter()  # loading the folder counts too
    config = config or TrainConfig()
    log = log or (lambda line: None)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    device = resolve_device(config.device)
    torch.manual_seed(config.seed)
    np.random.seed(config.seed)

    images, labels, names = _load_folder(Path(folder), config, log)
    train_classes, val_classes = _split_classes(names, config.val_fraction, config.seed)
    forgeries = forgery_map(names)
    if forgeries:
        log(f"{len(forgeries)} classes of skilled forgeries serve as hard impostors of their genuine classes")
    if len(train_classes) < 2:
        raise InvalidInputError(f"{folder}: training needs at least two classes, found {len(train_classes)}")
    train_mask = np.isin(labels, train_classes)
    x_train, y_train = images[train_mask], labels[train_mask]
    x_val, y_val = images[~train_mask], labels[~train_mask]
    if config.rotate_classes:
        # A character turned by 90 degrees is a new character: 4x the training classes, none of the held-out ones.
        n_names = len(names)
        x_train = torch.cat([torch.rot90(x_train, k, dims=(2, 3)) for k in range(4)])
        y_train = np.concatenate([y_train + k * n_names for k in range(4)])
        forgeries = {f + k * n_names: g + k * n_names for f, g in forgeries.items() for k in range(4)}
        log(f"rotated copies: {len(np.unique(y_train))} training classes, {len(y_train)} images")
    if config.mirror_classes:
        # A mirrored character is another character too; with rotations this gives all eight symmetries of the square.
        offset = (4 if config.rotate_classes else 1) * len(names)  # class ids of the mirror images start here
        x_train = torch.cat([x_train, torch.flip(x_train, dims=(3,))])
        y_train = np.concatenate([y_train, y_train + offset])
        forgeries = {**forgeries, **{f + offset: g + offset for f, g in forgeries.items()}}
        log(f"mirrored copies: {len(np.unique(y_train))} training classes, {len(y_train)} images")
    # Group of every training class (its alphabet; a rotated or mirrored copy sits in its alphabet's copy group).
    group_names = sorted({group_of(n) for n in names})
    group_index = {g: i for i, g in enumerate(group_names)}
    group_of_class = {int(c): group_index[group_of(names[c % len(names)])] + len(group_names) * (int(c) // len(names))
                      for c in np.unique(y_train)}
    val_way = min(config.val_way, len(set(val_classes.tolist()) - set(forgeries)))  # enrollable held-out classes
    has_val = val_way >= 2
    log(f"{len(images)} images of {len(names)} classes: {len(train_classes)} for training, {len(val_classes)} held out")

    enc_config = EncoderConfig(backbone=config.backbone, embedding_dim=config.embedding_dim, width=config.width,
                               preprocessing=config.preprocessing(), metric=config.metric,
                               hidden=tuple(config.hidden) if config.hidden is not None else None,
                               dropout=config.dropout)
    encoder = Encoder(enc_config, device=device)
    if config.init:
        _load_initial_weights(encoder, config.init)
        log(f"starting from the weights of {config.init}")
    margin = config.effective_margin
    loss_module: torch.nn.Module = {
        "contrastive": lambda: ContrastiveLoss(margin),
        "triplet": lambda: TripletLoss(margin, config.mining),
        "bce": lambda: PairwiseBCELoss(config.embedding_dim),
        "proto": lambda: PrototypicalLoss(config.proto_scale if config.metric == "cosine" else 1.0),
    }[config.loss]().to(device)
    params = list(encoder.net.parameters()) + list(loss_module.parameters())
    optimizer = torch.optim.Adam(params, lr=config.lr, weight_decay=config.weight_decay)

    state: dict[str, Any] = {"epoch": 0, "history": [], "best_val": None}
    checkpoint = out / CHECKPOINT_DIR
    if resume and (checkpoint / "state.json").exists():
        state = _restore_checkpoint(checkpoint, encoder, optimizer, loss_module)
        log(f"resumed from epoch {state['epoch']}")
    x_train_dev = x_train.to(device)
    bf16 = use_bf16(config.precision, device, config.backbone)
    if bf16 and device.type == "cpu":
        log("training under bfloat16 autocast (this CPU has native bf16; --precision fp32 turns it off)")

    def make_sampler(epoch_seed: int) -> Any:
        if config.loss in ("contrastive", "bce"):
            return PairSampler(y_train, seed=epoch_seed, forgery_of=forgeries, hard_fraction=config.hard_negative_fraction)
        if config.loss == "triplet":
            return ClassBalancedSampler(y_train, max(2, config.batch_size // config.per_class), config.per_class, seed=epoch_seed)
        return EpisodeSampler(y_train, config.way, config.shot, config.queries, seed=epoch_seed,
                              forgery_of=forgeries if config.forgery_episodes else None,
                              group_of_class=group_of_class, within_group=config.within_group)

    def train_step(sampler: Any, generator: torch.Generator, lr: float) -> tuple[float, int]:
        """One optimiser step on a fresh batch / episode: (loss, images seen)."""
        for group in optimizer.param_groups:
            group["lr"] = lr
        if config.loss in ("contrastive", "bce"):
            a, b, same = sampler.sample(config.batch_size)
            batch = torch.cat([x_train_dev[torch.from_numpy(a)], x_train_dev[torch.from_numpy(b)]])
        elif config.loss == "triplet":
            idx = sampler.sample()
            batch = x_train_dev[torch.from_numpy(idx)]
        else:
            support, queried, answer = sampler.sample()
            batch = torch.cat([x_train_dev[torch.from_numpy(support)], x_train_dev[torch.from_numpy(queried)]])
        if config.flip or config.color_jitter:
            batch = photometric(batch, generator, config.flip, config.color_jitter)
        if config.augment:
            batch = augment(batch, generator, strength=config.augment_strength, background_zero=config.invert)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
            # The twin network: ONE encoder embeds both halves of every pair, so the weights are shared.
            emb = encoder.embed(batch) if config.normalize_train else encoder.net(batch.to(device)).float()
        emb = emb.float()  # the losses in float32 whatever the autocast did
        if config.loss in ("contrastive", "bce"):
            n = config.batch_size
            loss = loss_module(emb[:n], emb[n:], torch.from_numpy(same).to(device))
        elif config.loss == "triplet":
            loss = loss_module(emb, torch.from_numpy(y_train[idx]).to(device))
        else:
            n_support = len(support)
            way = n_support // config.shot  # fewer than config.way in a within-group episode of a small group
            support_labels = torch.arange(way, device=device).repeat_interleave(config.shot)
            loss = loss_module(emb[:n_support], support_labels, emb[n_support:], torch.from_numpy(answer).to(device))
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        return float(loss.detach()), len(batch)

    def validate() -> float | None:
        return (validation_accuracy(encoder, x_val, y_val, val_way, config.val_episodes, seed=config.seed,
                                    exclude=set(forgeries)) if has_val else None)

    # Time budget: time one validation and a few throwaway steps, then fit the schedule (config.epochs is the cap).
    val_seconds, reserve = 0.0, 0.0
    if config.time_budget is not None:
        if has_val:
            clock = time.perf_counter()
            untrained = validate()
            val_seconds = time.perf_counter() - clock
            if not state["history"]:
                log(f"before training: held-out {val_way}-way 1-shot {untrained:.2%} ({val_seconds:.1f} s a validation)")
        reserve = 3 * val_seconds + 2.0  # the final score and pair threshold after the last epoch, roughly
        if "schedule" in state:
            epochs, steps_per_epoch = state["schedule"]
        else:
            step_seconds = _time_steps(encoder, optimizer, loss_module, make_sampler, train_step, config.lr)
            left = config.time_budget - (time.perf_counter() - run_started) - reserve
            epochs, steps_per_epoch = fit_schedule(left, step_seconds, val_seconds, config.steps_per_epoch, config.epochs)
            estimate = epochs * (steps_per_epoch * step_seconds + val_seconds) + reserve
            log(f"time budget {config.time_budget / 60:.1f} min: {step_seconds:.3f} s a step, {val_seconds:.1f} s a "
                f"validation -> {epochs} epochs x {steps_per_epoch} steps, about {estimate / 60:.1f} min of training "
                f"and scoring ({(time.perf_counter() - run_started) / 60:.1f} min spent loading and timing)")
            state["schedule"] = [epochs, steps_per_epoch]
        config = replace(config, epochs=epochs, steps_per_epoch=steps_per_epoch)
    deadline = None if config.time_budget is None else run_started + config.time_budget
    total_steps = config.epochs * config.steps_per_epoch

    for epoch in range(state["epoch"], config.epochs):
        if state.get("stopped") or epoch >= config.epochs:  # config.epochs may shrink below (a re-fitted budget)
            break
        # Samplers and augmentation are seeded per epoch, so a resumed run draws what the uninterrupted one would.
        epoch_seed = config.seed * 100_003 + epoch
        generator = torch.Generator().manual_seed(epoch_seed)
        sampler = make_sampler(epoch_seed)
        encoder.net.train()
        losses, started, seen = [], time.perf_counter(), 0
        bar = tqdm(range(config.steps_per_epoch), disable=not progress, desc=f"epoch {epoch + 1}/{config.epochs}", unit="step")
        for step in bar:
            if deadline is not None and losses and time.perf_counter() > deadline - reserve - val_seconds:
                state["stopped"] = f"time budget reached after {step} steps of epoch {epoch + 1}"
                break
            global_step = epoch * config.steps_per_epoch + step
            lr = config.lr * 0.5 * (1 + math.cos(math.pi * global_step / total_steps))  # cosine decay to zero
            loss_value, images_seen = train_step(sampler, generator, lr)
            losses.append(loss_value)
            seen += images_seen
            bar.set_postfix(loss=f"{np.mean(losses[-20:]):.4f}", img_s=f"{seen / (time.perf_counter() - started):.0f}")
        bar.close()
        val = validate()
        record = {"epoch": epoch + 1, "loss": float(np.mean(losses)), "val_accuracy": val, "val_way": val_way, "lr": lr,
                  "steps": len(losses), "seconds": round(time.perf_counter() - started, 2),
                  "images_per_second": round(seen / (time.perf_counter() - started), 1)}
        state["history"].append(record)
        if val is None or state["best_val"] is None or val >= state["best_val"]:
            state["best_val"] = val
            state["best_epoch"] = epoch + 1
            encoder.save(out / "best")
        state["epoch"] = epoch + 1
        if config.patience and has_val and epoch + 1 - state["best_epoch"] >= config.patience and not state.get("stopped"):
            state["stopped"] = f"early stop: no better validation for {config.patience} epochs"
        if deadline is not None and not state.get("stopped") and epoch + 1 < config.epochs:
            # The machine may run slower than the timed steps promised (other work, warm-up): re-fit the epochs
            # that are left to this epoch's real cost, so the cosine schedule ends inside the budget instead of the
            # deadline cutting it short. Only ever fewer epochs.
            epoch_seconds = time.perf_counter() - started
            fits = epoch + 1 + int(max(0.0, deadline - time.perf_counter() - reserve) // epoch_seconds)
            if fits < config.epochs:
                log(f"re-fitted to the time budget: {max(fits, epoch + 1)} epochs instead of {config.epochs} "
                    f"(this epoch took {epoch_seconds:.0f} s)")
                config = replace(config, epochs=max(fits, epoch + 1))
                total_steps = config.epochs * config.steps_per_epoch
                state["schedule"] = [config.epochs, config.steps_per_epoch]
        _save_checkpoint(checkpoint, encoder, optimizer, loss_module, state)
        log(f"epoch {epoch + 1}: loss {record['loss']:.4f}" + (f", held-out {val_way}-way 1-shot {val:.2%}" if val is not None else ""))
    if state.get("stopped"):
        log(f"stopped: {state['stopped']}")

    final = Encoder.load(out / "best", device=device)
    if state.get("best_epoch") != state["epoch"]:
        log(f"restored the best epoch, {state.get('best_epoch')} of {state['epoch']}")
    notes: dict[str, Any] = {"trained_on": str(folder), "train_config": config.to_dict(),
                             "best_epoch": state.get("best_epoch"), "val_accuracy": state.get("best_val"),
                             "epochs_run": state["epoch"], "stopped": state.get("stopped"),
                             "precision": "bf16" if bf16 else "fp32"}
    if has_val:
        accuracy, ci = held_out_score(final, x_val, y_val, val_way, config.final_episodes, seed=config.seed + 1,
                                      exclude=set(forgeries))
        held = len(set(np.unique(y_val).tolist()) - set(forgeries))
        notes["held_out"] = {"way": val_way, "shot": 1, "accuracy": accuracy, "ci95": ci,
                             "episodes": config.final_episodes, "classes": held}
        log(f"held-out score: {val_way}-way 1-shot {accuracy:.2%} ± {ci:.2%} (95% CI, {config.final_episodes} episodes "
            f"on the {held} held-out classes, which also chose the best epoch)")
        notes.update(pair_threshold(final, x_val, y_val, seed=config.seed, forgery_of=forgeries))
        if forgeries:
            notes["held_out"]["pair_eer"] = notes["pair_eer"]
            notes["held_out"]["pair_eer_ci95"] = notes.get("pair_eer_ci95")
            log(f"held-out pair EER (impostors half skilled forgeries): {notes['pair_eer']:.2%} ± "
                f"{notes.get('pair_eer_ci95', 0.0):.2%} (95% bootstrap CI, {notes['pair_count']} pairs)")
    final.config.notes = notes
    if has_val:
        final.config.pair_calibration = lookalike_threshold(final, x_val, y_val, names, forgeries, seed=config.seed)
        if final.config.pair_calibration:
            cal = final.config.pair_calibration
            log(f"verify threshold {cal['threshold']:.4f}: FAR {cal['far']:.2%} / FRR {cal['frr']:.2%} on held-out "
                f"classes, one reference each, impostors: {cal['impostors']}")
    final.config.data_profile = image_profile([image.path for image in scan_folder(folder)], limit=64)
    final.config.name = final.config.name or Path(out).name
    final._fingerprint = None
    final.save(out)
    (out / "train_config.json").write_text(json.dumps(config.to_dict(), indent=2) + "\n")
    (out / "history.json").write_text(json.dumps(state["history"], indent=2) + "\n")
    plot_history(state["history"], out / "loss_curve.png")
    if config.time_budget is not None:
        log(f"run took {(time.perf_counter() - run_started) / 60:.2f} min of its {config.time_budget / 60:.2f}-minute budget")
    return final


def _time_steps(encoder: Encoder, optimizer: torch.optim.Optimizer, loss_module: torch.nn.Module,
                make_sampler: Callable[[int], Any], train_step: Callable[..., tuple[float, int]], lr: float,
                warmup: int = 2, timed: int = 6) -> float:
    """Seconds per training step, from `timed` throwaway steps after `warmup` ones; every weight, optimiser moment
    and random state is put back afterwards, so the run itself is the one its saved schedule describes."""
    saved = (copy.deepcopy(encoder.net.state_dict()), copy.deepcopy(optimizer.state_dict()),
             copy.deepcopy(loss_module.state_dict()), torch.get_rng_state())
    sampler, generator = make_sampler(987_654_321), torch.Generator().manual_seed(12345)  # a seed no epoch uses
    encoder.net.train()
    for _ in range(warmup):
        train_step(sampler, generator, lr)
    clock = time.perf_counter()
    for _ in range(timed):
        train_step(sampler, generator, lr)
    seconds = (time.perf_counter() - clock) / timed
    encoder.net.load_state_dict(saved[0])
    optimizer.load_state_dict(saved[1])
    loss_module.load_state_dict(saved[2])
    torch.set_rng_state(saved[3])
    return seconds
