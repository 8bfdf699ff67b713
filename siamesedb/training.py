"""The training loop: a Siamese encoder (one network applied to both sides of every pair) trained on a labelled folder."""

from __future__ import annotations

import json
import math
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, fields
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
    EpisodeSampler,
    PairSampler,
    Preprocessing,
    forgery_target,
    group_of,
    iter_batches,
    scan_folder,
    select_groups,
)
from siamesedb.encoder import Encoder, EncoderConfig, Whitened, resolve_device
from siamesedb.errors import InvalidInputError
from siamesedb.losses import ContrastiveLoss, PairwiseBCELoss, PrototypicalLoss, TripletLoss

LOSSES = ("contrastive", "triplet", "bce", "proto")
CHECKPOINT_DIR = "checkpoint"


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
        if not 0.0 <= self.val_fraction < 1.0:
            raise InvalidInputError(f"val_fraction must lie in [0, 1), got {self.val_fraction}")

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
        scores = vectors[queried] @ vectors[support].T  # (way, way): support is class-major with shot 1
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
    matrix = within_class_whitening(vectors, labels, ridge)  # (D, D)
    config = EncoderConfig.from_dict({**encoder.config.to_dict(), "whitening": True})
    config.notes = {**config.notes, "whitening": {"ridge": ridge, "items": len(vectors), **(notes or {})}}
    net = Whitened(encoder.net, encoder.dimension)
    with torch.no_grad():
        net.linear.weight.copy_(torch.from_numpy(matrix.T.astype(np.float32)))  # Linear computes x @ weight.T
    return Encoder(config, net=net, device=encoder.device)


def pair_threshold(encoder: Encoder, images: torch.Tensor, labels: np.ndarray, seed: int, pairs: int = 4000,
                   forgery_of: dict[int, int] | None = None) -> dict[str, float]:
    """Equal-error threshold for `verify IMAGE_A IMAGE_B` from genuine / impostor pairs of held-out classes."""
    vectors = encoder.encode_tensors(images)
    a, b, same = PairSampler(labels, seed=seed, forgery_of=forgery_of).sample(pairs)
    scores = np.einsum("nd,nd->n", vectors[a], vectors[b])
    threshold, eer = query.eer_threshold(scores[same == 1], scores[same == 0])
    return {"pair_threshold": threshold, "pair_eer": eer, "pair_count": pairs}


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
          progress: bool = True, resume: bool = False, log: Callable[[str], None] | None = None) -> Encoder:
    """Train an encoder on a labelled folder; write it (config.json + model.safetensors) and its logs to out_dir."""
    from tqdm import tqdm

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
                               preprocessing=config.preprocessing())
    encoder = Encoder(enc_config, device=device)
    if config.init:
        _load_initial_weights(encoder, config.init)
        log(f"starting from the weights of {config.init}")
    margin = config.effective_margin
    loss_module: torch.nn.Module = {
        "contrastive": lambda: ContrastiveLoss(margin),
        "triplet": lambda: TripletLoss(margin, config.mining),
        "bce": lambda: PairwiseBCELoss(config.embedding_dim),
        "proto": lambda: PrototypicalLoss(config.proto_scale),
    }[config.loss]().to(device)
    params = list(encoder.net.parameters()) + list(loss_module.parameters())
    optimizer = torch.optim.Adam(params, lr=config.lr, weight_decay=config.weight_decay)
    total_steps = config.epochs * config.steps_per_epoch

    state: dict[str, Any] = {"epoch": 0, "history": [], "best_val": None}
    checkpoint = out / CHECKPOINT_DIR
    if resume and (checkpoint / "state.json").exists():
        state = _restore_checkpoint(checkpoint, encoder, optimizer, loss_module)
        log(f"resumed from epoch {state['epoch']}")
    x_train_dev = x_train.to(device)
    use_amp = device.type == "cuda"

    for epoch in range(state["epoch"], config.epochs):
        # Samplers and augmentation are seeded per epoch, so a resumed run draws what the uninterrupted one would.
        epoch_seed = config.seed * 100_003 + epoch
        generator = torch.Generator().manual_seed(epoch_seed)
        if config.loss in ("contrastive", "bce"):
            sampler: Any = PairSampler(y_train, seed=epoch_seed, forgery_of=forgeries,
                                       hard_fraction=config.hard_negative_fraction)
        elif config.loss == "triplet":
            sampler = ClassBalancedSampler(y_train, max(2, config.batch_size // config.per_class), config.per_class, seed=epoch_seed)
        else:
            sampler = EpisodeSampler(y_train, config.way, config.shot, config.queries, seed=epoch_seed,
                                     forgery_of=forgeries if config.forgery_episodes else None,
                                     group_of_class=group_of_class, within_group=config.within_group)
        encoder.net.train()
        losses, started, seen = [], time.perf_counter(), 0
        bar = tqdm(range(config.steps_per_epoch), disable=not progress, desc=f"epoch {epoch + 1}/{config.epochs}", unit="step")
        for step in bar:
            global_step = epoch * config.steps_per_epoch + step
            lr = config.lr * 0.5 * (1 + math.cos(math.pi * global_step / total_steps))  # cosine decay to zero
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
            if config.augment:
                batch = augment(batch, generator, strength=config.augment_strength, background_zero=config.invert)
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=use_amp):
                # The twin network: ONE encoder embeds both halves of every pair, so the weights are shared.
                emb = encoder.embed(batch) if config.normalize_train else encoder.net(batch.to(device)).float()
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
            losses.append(float(loss.detach()))
            seen += len(batch)
            bar.set_postfix(loss=f"{np.mean(losses[-20:]):.4f}", img_s=f"{seen / (time.perf_counter() - started):.0f}")
        bar.close()
        val = (validation_accuracy(encoder, x_val, y_val, val_way, config.val_episodes, seed=config.seed,
                                   exclude=set(forgeries)) if has_val else None)
        record = {"epoch": epoch + 1, "loss": float(np.mean(losses)), "val_accuracy": val, "val_way": val_way, "lr": lr,
                  "seconds": round(time.perf_counter() - started, 2), "images_per_second": round(seen / (time.perf_counter() - started), 1)}
        state["history"].append(record)
        if val is None or state["best_val"] is None or val >= state["best_val"]:
            state["best_val"] = val
            state["best_epoch"] = epoch + 1
            encoder.save(out / "best")
        state["epoch"] = epoch + 1
        _save_checkpoint(checkpoint, encoder, optimizer, loss_module, state)
        log(f"epoch {epoch + 1}: loss {record['loss']:.4f}" + (f", held-out {val_way}-way 1-shot {val:.2%}" if val is not None else ""))

    final = Encoder.load(out / "best", device=device)
    notes: dict[str, Any] = {"trained_on": str(folder), "train_config": config.to_dict(),
                             "best_epoch": state.get("best_epoch"), "val_accuracy": state.get("best_val")}
    if has_val:
        notes.update(pair_threshold(final, x_val, y_val, seed=config.seed, forgery_of=forgeries))
    final.config.notes = notes
    final.config.name = final.config.name or Path(out).name
    final._fingerprint = None
    final.save(out)
    (out / "train_config.json").write_text(json.dumps(config.to_dict(), indent=2) + "\n")
    (out / "history.json").write_text(json.dumps(state["history"], indent=2) + "\n")
    plot_history(state["history"], out / "loss_curve.png")
    return final
