"""The training loop: a Siamese encoder (one network applied to both sides of every pair) trained on a labelled folder.

What a run is made of lives beside it: the loss recipes (`losses`), the batches each draws (`batches`),
augmentation (`augmentation`), the time budget (`schedule`), the held-out classes and what is measured on them
(`validation`), checkpoints (`checkpoints`), the loss curve (`plots`); whitening a trained encoder (`whitening`).
Their old names stay importable from here.
"""

from __future__ import annotations

import json
import math
import os
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, fields, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch

from siamesedb.augmentation import augment, photometric
from siamesedb.backbones import get_backbone
from siamesedb.batches import BATCH_KINDS
from siamesedb.checkpoints import restore_checkpoint, save_checkpoint
from siamesedb.data import Preprocessing, group_of, image_profile, iter_batches, scan_folder, select_groups
from siamesedb.encoder import Encoder, EncoderConfig, cpu_has_native_bf16, resolve_device
from siamesedb.errors import InvalidInputError
from siamesedb.losses import LOSS_RECIPES
from siamesedb.plots import loss_curve
from siamesedb.schedule import fit_schedule, parse_duration, time_steps  # noqa: F401  (parse_duration: its old home)
from siamesedb.validation import (  # noqa: F401  (held_out_images: its old home)
    forgery_map,
    held_out_images,
    held_out_score,
    lookalike_threshold,
    pair_threshold,
    split_classes,
    validation_accuracy,
)
from siamesedb.whitening import whitened_encoder, within_class_whitening  # noqa: F401  (their old home)

# Old names, kept importable: the one bf16 probe is the encoder's; the split, the loss curve moved.
cpu_supports_bf16 = cpu_has_native_bf16
_split_classes = split_classes
plot_history = loss_curve

LOSSES = tuple(LOSS_RECIPES)
PRECISIONS = ("auto", "fp32", "bf16")
CHECKPOINT_DIR = "checkpoint"
# Backbones whose training step measured faster under CPU bfloat16 autocast (tools/bench_train_bf16.py, BENCHMARKS.md)


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
    precision: str = "auto"  # auto: bfloat16 autocast on CUDA, and on CPUs with native bf16 for backbones registered bf16_faster
    time_budget: float | None = None  # seconds for the whole run: epochs fitted after timing the first steps
    patience: int | None = None  # stop after this many epochs without a better validation score (None: never)
    final_episodes: int = 1000  # episodes of the final held-out score (with its 95% interval)
    recipe: dict[str, Any] | None = None  # what siamesedb.recipe saw and chose, with a reason per choice (record only)
    unfreeze: int = 0  # hf: backbones: also train the model's last this-many blocks (0: the head only, on cached features)

    def __post_init__(self) -> None:
        if self.loss not in LOSSES:
            raise InvalidInputError(f"unknown loss {self.loss!r}; choose from {', '.join(LOSSES)}")
        # hf: backbones only: epochs 0 keeps the pretrained embedding as it is (siamesedb.pretrained_train).
        if (self.epochs < (0 if self.backbone.startswith("hf:") else 1) or self.steps_per_epoch < 1
                or self.batch_size < 2):
            raise InvalidInputError("epochs and steps per epoch must be >= 1 (epochs 0: hf: backbones), batch size >= 2")
        if self.rotate_classes and self.image_width not in (None, self.image_size):
            raise InvalidInputError("rotate_classes needs square inputs (image_width equal to image_size)")
        if not 0.0 <= self.within_group <= 1.0:
            raise InvalidInputError(f"within_group must be a fraction in [0, 1], got {self.within_group}")
        if not 0.0 <= self.augment_strength <= 3.0:
            raise InvalidInputError(f"augment_strength must lie in [0, 3], got {self.augment_strength}")
        if self.metric not in ("cosine", "euclidean"):
            raise InvalidInputError(f"unknown metric {self.metric!r}; choose from cosine, euclidean")
        if self.hidden is not None and "hidden" not in get_backbone(self.backbone).options or (
                self.dropout is not None and "dropout" not in get_backbone(self.backbone).options):
            raise InvalidInputError(f"--hidden and --dropout apply to the mlp backbone, not {self.backbone!r}")
        if self.unfreeze and not (self.backbone.startswith("hf:") and self.unfreeze > 0):
            raise InvalidInputError(f"--unfreeze applies to hf: backbones (a number of blocks >= 0), not {self.backbone!r}")
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
        """The margin the loss uses: the one given, else its recipe's default (losses.LOSS_RECIPES)."""
        return self.margin if self.margin is not None else LOSS_RECIPES[self.loss].margin

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


def use_bf16(precision: str, device: torch.device, backbone: str) -> bool:
    """Whether training autocasts to bfloat16: always on CUDA under auto; on CPU only with native bf16 support."""
    if precision == "fp32":
        return False
    if device.type == "cuda":
        return True
    if precision == "bf16":
        return True
    return device.type == "cpu" and get_backbone(backbone).bf16_faster and cpu_has_native_bf16()


def _load_folder(folder: Path, config: TrainConfig, log: Callable[[str], None], preprocessing: Preprocessing | None = None,
                 batch_size: int = 512) -> tuple[torch.Tensor, np.ndarray, list[str]]:
    """Every readable image of the folder: ((N, C, H, W) float32, class index (N,), class names), preprocessed as
    `config` says, or by `preprocessing` (a pretrained model's own image processor)."""
    images = select_groups(scan_folder(folder), config.groups)
    chunks, kept_labels, skipped = [], [], 0
    preprocessing = preprocessing or config.preprocessing()
    for kept, tensor, bad in iter_batches(images, preprocessing, batch_size=batch_size, workers=config.workers):
        chunks.append(tensor)
        kept_labels.extend(images[i].label for i in kept)
        skipped += len(bad)
    if skipped:
        log(f"skipped {skipped} unreadable files")
    names, index = np.unique(np.asarray(kept_labels, dtype=object).astype(str), return_inverse=True)
    return torch.cat(chunks), index.astype(np.int64), [str(n) for n in names]


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


@dataclass
class _Classes:
    """A run's images by class: the training items (with any rotated / mirrored copies as new classes), the held-out
    ones, skilled forgeries (forged class -> its genuine class), each training class's group, the validation way."""

    x_train: torch.Tensor
    y_train: np.ndarray
    x_val: torch.Tensor
    y_val: np.ndarray
    names: list[str]
    forgeries: dict[int, int]
    group_of_class: dict[int, int]
    val_way: int

    @property
    def has_val(self) -> bool:
        return self.val_way >= 2


def _split_for_training(folder: str | os.PathLike, images: torch.Tensor, labels: np.ndarray, names: list[str],
                        config: TrainConfig, log: Callable[[str], None]) -> _Classes:
    """Hold out `config.val_fraction` of the classes whole, and add the symmetry copies of the training classes."""
    train_classes, val_classes = split_classes(names, config.val_fraction, config.seed)
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
    log(f"{len(images)} images of {len(names)} classes: {len(train_classes)} for training, {len(val_classes)} held out")
    return _Classes(x_train, y_train, x_val, y_val, names, forgeries, group_of_class, val_way)


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
    data = _split_for_training(folder, images, labels, names, config, log)
    val_way, has_val = data.val_way, data.has_val
    enc_config = EncoderConfig(backbone=config.backbone, embedding_dim=config.embedding_dim, width=config.width,
                               preprocessing=config.preprocessing(), metric=config.metric,
                               hidden=tuple(config.hidden) if config.hidden is not None else None,
                               dropout=config.dropout)
    encoder = Encoder(enc_config, device=device)
    if config.init:
        _load_initial_weights(encoder, config.init)
        log(f"starting from the weights of {config.init}")
    recipe = LOSS_RECIPES[config.loss]
    loss_module = recipe.build(config, config.effective_margin).to(device)
    params = list(encoder.net.parameters()) + list(loss_module.parameters())
    optimizer = torch.optim.Adam(params, lr=config.lr, weight_decay=config.weight_decay)

    state: dict[str, Any] = {"epoch": 0, "history": [], "best_val": None}
    checkpoint = out / CHECKPOINT_DIR
    if resume and (checkpoint / "state.json").exists():
        state = restore_checkpoint(checkpoint, encoder, optimizer, loss_module)
        log(f"resumed from epoch {state['epoch']}")
    x_train_dev = data.x_train.to(device)
    bf16 = use_bf16(config.precision, device, config.backbone)
    if bf16 and device.type == "cpu":
        log("training under bfloat16 autocast (this CPU has native bf16; --precision fp32 turns it off)")

    def make_batches(epoch_seed: int) -> Callable[[], Any]:
        return BATCH_KINDS[recipe.batch](data.y_train, epoch_seed, config, data.forgeries, data.group_of_class)

    def train_step(draw: Callable[[], Any], generator: torch.Generator, lr: float) -> tuple[float, int]:
        """One optimiser step on a fresh batch / episode: (loss, images seen)."""
        for group in optimizer.param_groups:
            group["lr"] = lr
        batch = draw()
        inputs = x_train_dev[torch.from_numpy(batch.indices)]
        if config.flip or config.color_jitter:
            inputs = photometric(inputs, generator, config.flip, config.color_jitter)
        if config.augment:
            inputs = augment(inputs, generator, strength=config.augment_strength, background_zero=config.invert)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
            # The twin network: ONE encoder embeds both halves of every pair, so the weights are shared.
            emb = encoder.embed(inputs) if config.normalize_train else encoder.net(inputs.to(device)).float()
        loss = recipe.score(loss_module, emb.float(), batch)  # the losses in float32 whatever the autocast did
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        return float(loss.detach()), len(inputs)

    def validate() -> float | None:
        return (validation_accuracy(encoder, data.x_val, data.y_val, val_way, config.val_episodes, seed=config.seed,
                                    exclude=set(data.forgeries)) if has_val else None)

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
            step_seconds = time_steps(encoder.net, optimizer, loss_module, make_batches, train_step, config.lr)
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
        draw = make_batches(epoch_seed)
        encoder.net.train()
        losses, started, seen = [], time.perf_counter(), 0
        bar = tqdm(range(config.steps_per_epoch), disable=not progress, desc=f"epoch {epoch + 1}/{config.epochs}", unit="step")
        for step in bar:
            if deadline is not None and losses and time.perf_counter() > deadline - reserve - val_seconds:
                state["stopped"] = f"time budget reached after {step} steps of epoch {epoch + 1}"
                break
            global_step = epoch * config.steps_per_epoch + step
            lr = config.lr * 0.5 * (1 + math.cos(math.pi * global_step / total_steps))  # cosine decay to zero
            loss_value, images_seen = train_step(draw, generator, lr)
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
        save_checkpoint(checkpoint, encoder, optimizer, loss_module, state)
        log(f"epoch {epoch + 1}: loss {record['loss']:.4f}" + (f", held-out {val_way}-way 1-shot {val:.2%}" if val is not None else ""))
    if state.get("stopped"):
        log(f"stopped: {state['stopped']}")
    final = Encoder.load(out / "best", device=device)
    if state.get("best_epoch") != state["epoch"]:
        log(f"restored the best epoch, {state.get('best_epoch')} of {state['epoch']}")
    _finish(final, folder, out, config, data, state, bf16, log)
    if config.time_budget is not None:
        log(f"run took {(time.perf_counter() - run_started) / 60:.2f} min of its {config.time_budget / 60:.2f}-minute budget")
    return final


def _finish(final: Encoder, folder: str | os.PathLike, out: Path, config: TrainConfig, data: _Classes,
            state: dict[str, Any], bf16: bool, log: Callable[[str], None]) -> None:
    """Score the best epoch's encoder on the held-out classes, give it its thresholds and notes, and write it with
    the run's config, history and loss curve into `out`."""
    forgeries, val_way = data.forgeries, data.val_way
    notes: dict[str, Any] = {"trained_on": str(folder), "train_config": config.to_dict(),
                             "best_epoch": state.get("best_epoch"), "val_accuracy": state.get("best_val"),
                             "epochs_run": state["epoch"], "stopped": state.get("stopped"),
                             "precision": "bf16" if bf16 else "fp32"}
    if data.has_val:
        accuracy, ci = held_out_score(final, data.x_val, data.y_val, val_way, config.final_episodes,
                                      seed=config.seed + 1, exclude=set(forgeries))
        held = len(set(np.unique(data.y_val).tolist()) - set(forgeries))
        notes["held_out"] = {"way": val_way, "shot": 1, "accuracy": accuracy, "ci95": ci,
                             "episodes": config.final_episodes, "classes": held}
        log(f"held-out score: {val_way}-way 1-shot {accuracy:.2%} ± {ci:.2%} (95% CI, {config.final_episodes} episodes "
            f"on the {held} held-out classes" + (", which also chose the best epoch)" if state["epoch"] else ")"))
        notes.update(pair_threshold(final, data.x_val, data.y_val, seed=config.seed, forgery_of=forgeries))
        if forgeries:
            notes["held_out"]["pair_eer"] = notes["pair_eer"]
            notes["held_out"]["pair_eer_ci95"] = notes.get("pair_eer_ci95")
            log(f"held-out pair EER (impostors half skilled forgeries): {notes['pair_eer']:.2%} ± "
                f"{notes.get('pair_eer_ci95', 0.0):.2%} (95% bootstrap CI, {notes['pair_count']} pairs)")
    final.config.notes = notes
    if data.has_val:
        final.config.pair_calibration = lookalike_threshold(final, data.x_val, data.y_val, data.names, forgeries,
                                                            seed=config.seed)
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
    loss_curve(state["history"], out / "loss_curve.png")
