"""The training loop: a Siamese encoder (one network applied to both sides of every pair) trained on a labelled folder.

What a run is made of lives beside it: the loss recipes (`losses`), the batches each draws (`batches`),
augmentation (`augmentation`), the time budget (`schedule`), the held-out classes and what is measured on them
(`validation`), checkpoints (`checkpoints`), the loss curve (`plots`); whitening a trained encoder (`whitening`).
Their old names stay importable from here.
"""

from __future__ import annotations

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
from siamesedb.data import Preprocessing, group_of, iter_batches, scan_folder, select_groups
from siamesedb.encoder import Encoder, EncoderConfig, cpu_has_native_bf16, resolve_device
from siamesedb.errors import InvalidInputError
from siamesedb.losses import LOSS_RECIPES
from siamesedb.plots import loss_curve
from siamesedb.schedule import fit_schedule, parse_duration, replan, time_steps  # noqa: F401  (parse_duration: its old home)
from siamesedb.validation import (  # noqa: F401  (held_out_images, held_out_score...: their old home)
    ValidationPlan,
    forgery_map,
    held_out_images,
    held_out_score,
    lookalike_threshold,
    pair_threshold,
    plan_validation,
    split_classes,
    split_images,
    validation_accuracy,
    within_group_episodes,
    writer_eer,
)
from siamesedb.validation import finish_run
from siamesedb.whitening import whitened_encoder, within_class_whitening  # noqa: F401  (their old home)

# Old names, kept importable: the one bf16 probe is the encoder's; the split, the loss curve moved.
cpu_supports_bf16 = cpu_has_native_bf16
_split_classes = split_classes
plot_history = loss_curve
_finish = finish_run  # pretrained_train's name for the end of a run

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
    hold_out_groups: bool = False  # hold out whole groups (alphabets) and validate within each (the recipe's choice)
    val_episodes: int = 200
    val_way: int = 20  # classes of a held-out N-way episode, at most (the recipe: every held-out class)
    # What picks the epoch (validation.plan_validation): "auto" (verification EER where held-out writers have
    # skilled forgeries, N-way over held-out classes when >= 8 are held out, else held-out images of every class),
    # or "classes" (held-out classes whatever their number, the old behaviour).
    validation: str = "auto"
    split_seed: int | None = None  # seed of the held-out split (None: `seed`); members of one run share one split
    members: int = 1  # > 1: that many short members in the one budget, joined + whitened as validation chooses (members.py)
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
        if self.validation not in ("auto", "classes"):
            raise InvalidInputError(f"unknown validation {self.validation!r}; choose from auto, classes")
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
    plan: ValidationPlan
    originals: int  # the first `originals` training items are the folder's own (the rest: rotated / mirrored copies)

    @property
    def has_val(self) -> bool:
        return self.val_way >= 2 or self.plan.task == "verification"


def _split_for_training(folder: str | os.PathLike, images: torch.Tensor, labels: np.ndarray, names: list[str],
                        config: TrainConfig, log: Callable[[str], None]) -> _Classes:
    """Hold out `config.val_fraction` of the classes whole, and add the symmetry copies of the training classes."""
    split_seed = config.seed if config.split_seed is None else config.split_seed
    forgeries = forgery_map(names)
    by_group = config.hold_out_groups and not forgeries
    train_classes, val_classes = split_classes(names, config.val_fraction, split_seed, by_group)
    if forgeries:
        log(f"{len(forgeries)} classes of skilled forgeries serve as hard impostors of their genuine classes")
    plan = plan_validation(names, forgeries, val_classes, config.val_fraction, labels, by_group)
    if config.validation == "classes" and plan.task == "images":
        plan = ValidationPlan("classes", f"WARNING: only {len(set(val_classes.tolist()) - set(forgeries))} held-out "
                                         "classes (held-out classes asked for): too few to choose an epoch by, the "
                                         "score below says little")
    if plan.task == "images":
        train_mask = ~split_images(labels, config.val_fraction, split_seed)  # every class trains
        train_classes = np.unique(labels[train_mask])
    else:
        train_mask = np.isin(labels, train_classes)
    log(f"validation: {plan.reason}")
    if len(train_classes) < 2:
        raise InvalidInputError(f"{folder}: training needs at least two classes, found {len(train_classes)}")
    x_train, y_train = images[train_mask], labels[train_mask]
    x_val, y_val = images[~train_mask], labels[~train_mask]
    originals = len(y_train)
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
    # enrollable held-out classes with a support and a query
    counts = np.bincount(y_val, minlength=len(names)) if len(y_val) else np.zeros(len(names), dtype=np.int64)
    val_way = min(config.val_way, int(sum(1 for c in range(len(names)) if counts[c] >= 2 and c not in forgeries)))
    if plan.task == "none":
        val_way = 0
    held = (f"{len(y_val)} images of every class held out" if plan.task == "images"
            else f"{len(set(val_classes.tolist()))} held out")
    log(f"{len(images)} images of {len(names)} classes: {len(train_classes)} for training, {held}")
    return _Classes(x_train, y_train, x_val, y_val, names, forgeries, group_of_class, val_way, plan, originals)


def train(folder: str | os.PathLike, out_dir: str | os.PathLike, config: TrainConfig | None = None,
          progress: bool = True, resume: bool = False, log: Callable[[str], None] | None = None,
          started: float | None = None) -> Encoder:
    """Train an encoder on a labelled folder; write it (config.json + model.safetensors) and its logs to out_dir.

    `started`: the time.perf_counter() at which a time budget starts counting (default: now; the CLI passes the
    moment it began inspecting the folder).
    """
    from tqdm import tqdm

    run_started = started if started is not None else _clock()  # loading the folder counts too
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

    plan = data.plan

    def validate() -> tuple[float | None, dict[str, Any]]:
        """(the score that picks the epoch, higher better; what to record): 1 - EER of held-out writers, or
        N-way 1-shot accuracy of held-out classes / images."""
        if not has_val:
            return None, {"val_accuracy": None}
        if plan.task == "verification":
            eer = writer_eer(encoder, data.x_val, data.y_val, data.forgeries, plan.references, seed=config.seed)["eer"]
            return 1.0 - eer, {"val_accuracy": None, "val_eer": eer, "val_references": plan.references}
        if plan.task == "groups":
            accuracy = within_group_episodes(encoder, data.x_val, data.y_val, data.names, val_way, config.val_episodes,
                                             seed=config.seed).pooled
            return accuracy, {"val_accuracy": accuracy, "val_way": val_way, "val_task": plan.task}
        accuracy = validation_accuracy(encoder, data.x_val, data.y_val, val_way, config.val_episodes, seed=config.seed,
                                       exclude=set(data.forgeries))
        return accuracy, {"val_accuracy": accuracy, "val_way": val_way, "val_task": plan.task}

    def describe(fields_: dict[str, Any]) -> str:
        if "val_eer" in fields_:
            return f"held-out verification EER {fields_['val_eer']:.2%} ({plan.references} references)"
        if fields_["val_accuracy"] is None:
            return ""
        if plan.task == "groups":
            return f"held-out within-group 1-shot {fields_['val_accuracy']:.2%} (up to {val_way}-way)"
        where = "held-out images" if plan.task == "images" else "held-out"
        return f"{where} {val_way}-way 1-shot {fields_['val_accuracy']:.2%}"

    # Time budget: time one validation and a few throwaway steps, then fit the schedule (config.epochs is the cap).
    val_seconds, reserve, step_seconds = 0.0, 0.0, None
    steps_cap = state.setdefault("steps_cap", config.steps_per_epoch)  # a re-plan never grows epochs past it
    if config.time_budget is not None:
        if has_val:
            clock = _clock()
            _, untrained = validate()
            val_seconds = _clock() - clock
            if not state["history"]:
                log(f"before training: {describe(untrained)} ({val_seconds:.1f} s a validation)")
        reserve = 3 * val_seconds + 2.0  # the final score and pair threshold after the last epoch, roughly
        if "schedule" in state:
            epochs, steps_per_epoch = state["schedule"]
        else:
            step_seconds = time_steps(encoder.net, optimizer, loss_module, make_batches, train_step, config.lr)
            left = config.time_budget - (_clock() - run_started) - reserve
            epochs, steps_per_epoch = fit_schedule(left, step_seconds, val_seconds, config.steps_per_epoch, config.epochs)
            estimate = epochs * (steps_per_epoch * step_seconds + val_seconds) + reserve
            log(f"time budget {config.time_budget / 60:.1f} min: {step_seconds:.3f} s a step, {val_seconds:.1f} s a "
                f"validation -> {epochs} epochs x {steps_per_epoch} steps, about {estimate / 60:.1f} min of training "
                f"and scoring ({(_clock() - run_started) / 60:.1f} min spent loading and timing)")
            state["schedule"] = [epochs, steps_per_epoch]
        config = replace(config, epochs=epochs, steps_per_epoch=steps_per_epoch)
    deadline = None if config.time_budget is None else run_started + config.time_budget
    total_steps = state.get("total_steps") or config.epochs * config.steps_per_epoch

    for epoch in range(state["epoch"], config.epochs):
        if state.get("stopped") or epoch >= config.epochs:  # config.epochs may shrink below (a re-fitted budget)
            break
        # Samplers and augmentation are seeded per epoch, so a resumed run draws what the uninterrupted one would.
        epoch_seed = config.seed * 100_003 + epoch
        generator = torch.Generator().manual_seed(epoch_seed)
        draw = make_batches(epoch_seed)
        encoder.net.train()
        losses, started, seen = [], _clock(), 0
        done = state.get("steps_run", epoch * config.steps_per_epoch)  # steps of the epochs before: the cosine schedule runs over all of them
        bar = tqdm(range(config.steps_per_epoch), disable=not progress, desc=f"epoch {epoch + 1}/{config.epochs}", unit="step")
        for step in bar:
            if deadline is not None and losses and _clock() > deadline - reserve - val_seconds:
                state["stopped"] = f"time budget reached after {step} steps of epoch {epoch + 1}"
                break
            lr = config.lr * 0.5 * (1 + math.cos(math.pi * min(done + step, total_steps) / total_steps))  # cosine decay to zero
            loss_value, images_seen = train_step(draw, generator, lr)
            losses.append(loss_value)
            seen += images_seen
            bar.set_postfix(loss=f"{np.mean(losses[-20:]):.4f}", img_s=f"{seen / max(_clock() - started, 1e-9):.0f}")
        bar.close()
        trained_seconds = _clock() - started
        val, measured = validate()
        elapsed = max(_clock() - started, 1e-9)
        record = {"epoch": epoch + 1, "loss": float(np.mean(losses)), **measured, "lr": lr,
                  "steps": len(losses), "seconds": round(elapsed, 2), "images_per_second": round(seen / elapsed, 1)}
        state["history"].append(record)
        state["steps_run"] = state.get("steps_run", 0) + len(losses)
        if val is None or state["best_val"] is None or val >= state["best_val"]:
            state["best_val"] = val
            state["best_epoch"] = epoch + 1
            state["best_record"] = measured
            encoder.save(out / "best")
        state["epoch"] = epoch + 1
        if config.patience and has_val and epoch + 1 - state["best_epoch"] >= config.patience and not state.get("stopped"):
            state["stopped"] = f"early stop: no better validation for {config.patience} epochs"
        if deadline is not None and not state.get("stopped") and epoch + 1 < config.epochs:
            config, total_steps = replan(config, state, epoch, len(losses), trained_seconds, elapsed - trained_seconds,
                                         deadline - _clock() - reserve, step_seconds, steps_cap, log)
        save_checkpoint(checkpoint, encoder, optimizer, loss_module, state)
        log(f"epoch {epoch + 1}: loss {record['loss']:.4f}" + (f", {describe(measured)}" if val is not None else ""))
    if state.get("stopped"):
        log(f"stopped: {state['stopped']}")
    final = Encoder.load(out / "best", device=device)
    if state.get("best_epoch") != state["epoch"]:
        log(f"restored the best epoch, {state.get('best_epoch')} of {state['epoch']}")
    budget = None
    if config.time_budget is not None:
        budget = {"budget_s": round(config.time_budget, 1), "steps": state.get("steps_run", 0)}
        if budget["steps"] < MIN_STEPS:
            line = (f"only {budget['steps']} training steps fitted the {config.time_budget / 60:.1f}-minute budget "
                    f"(fewer than {MIN_STEPS}): this encoder is barely trained; give a longer --time-budget")
            budget["warning"] = line
            log(f"WARNING: {line}")
    finish_run(final, folder, out, config, data, state, bf16, log, budget=budget,
               used=lambda: _clock() - run_started)
    return final


MIN_STEPS = 50  # fewer training steps than this and a budgeted run says the encoder is barely trained


def _clock() -> float:
    """The run's clock (seconds); tests replace it to play a slow machine without waiting."""
    return time.perf_counter()
