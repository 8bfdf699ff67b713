"""Distil an encoder that embeds several test-time views (`test_time_shift`: five forward passes an image) into a
one-view student of the same backbone: one forward pass an image, trained to reproduce the teacher's vectors.

The teacher's vectors of the training images (its own multi-view embedding of each clean image) are computed once
and cached; the student starts from the teacher's weights and sees the images, part of them under small random
affine distortions (shift, rotation, scale, shear), and is pulled towards the cached vectors by

    loss = (1 - mean cosine(student_i, teacher_i))                                    (pointwise)
         + relational * mean_{i != j} (s_i . s_j - t_i . t_j)^2                        (the in-batch cosine matrix)
         + proto * prototypical loss of the batch (optional: the labels the teacher was trained on)

Batches are episodes (`EpisodeSampler`: `way` classes x (1 + `queries`) images, part of them drawn inside one group,
an alphabet), so the relational term sees the look-alike rivals the within-alphabet test asks about.
"""

from __future__ import annotations

import copy
import dataclasses
import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from siamesedb.augmentation import augment
from siamesedb.encoder import Encoder
from siamesedb.losses import PrototypicalLoss
from siamesedb.samplers import EpisodeSampler
from siamesedb.validation import held_out_score


@dataclass
class DistillConfig:
    """Every knob of a distillation run (saved in the student's notes)."""

    steps: int = 3000
    eval_every: int = 250  # steps between validations (the best validated student is kept)
    way: int = 60  # classes per batch
    queries: int = 3  # images per class beside the one support image: batch = way * (1 + queries)
    within_group: float = 0.5  # share of batches drawn inside one group (alphabet)
    lr: float = 3e-4  # Adam, linear warm-up over `warmup` steps, then cosine decay to 0 at `steps`
    warmup: int = 100
    frozen_batchnorm: bool = True  # BatchNorm keeps the teacher's running statistics (train = test behaviour)
    relational: float = 3.0
    proto: float = 0.1
    proto_scale: float = 10.0
    augment_fraction: float = 0.5  # share of each batch distorted (the rest is seen clean, as at test time)
    augment_strength: float = 0.5  # training.augment's strength (0.5: up to 5 degrees, 1 px, scale 0.95-1.05)
    seed: int = 0
    bf16: bool = False  # bfloat16 autocast for the student's forward pass (CPUs with native bf16, or CUDA)
    val_way: int = 20
    val_episodes: int = 1000
    select: str = "cosine"  # keep the validated student closest to the teacher ("cosine") or best held-out "accuracy"


def distillation_loss(student: torch.Tensor, teacher: torch.Tensor, relational: float = 1.0
                      ) -> tuple[torch.Tensor, dict[str, float]]:
    """(B, D) unit student vectors, (B, D) unit teacher vectors -> (loss, parts).

    Pointwise cosine distance, mean over the batch, plus `relational` x the mean squared difference of the two
    in-batch cosine matrices over the off-diagonal pairs (the diagonal is 1 on both sides).
    """
    pointwise = 1.0 - (student * teacher).sum(dim=1).mean()
    n = student.shape[0]
    if n > 1 and relational:
        off = ~torch.eye(n, dtype=torch.bool, device=student.device)
        gap = (student @ student.T - teacher @ teacher.T)[off]
        rel = gap.pow(2).mean()
    else:
        rel = student.new_zeros(())
    loss = pointwise + relational * rel
    return loss, {"cosine": float(pointwise.detach()), "relational": float(rel.detach())}


def teacher_targets(teacher: Encoder, images: torch.Tensor, batch_size: int = 1024,
                    log: Callable[[str], None] | None = None) -> torch.Tensor:
    """The teacher's own vectors (all its test-time views) of preprocessed (N, C, H, W) images: (N, D) float32."""
    out, started = [], time.perf_counter()
    for start in range(0, len(images), batch_size):
        out.append(torch.from_numpy(teacher.encode_tensors(images[start : start + batch_size])))
        if log and (start // batch_size) % 20 == 0:
            log(f"teacher targets {start + len(out[-1])}/{len(images)} ({time.perf_counter() - started:.0f} s)")
    return torch.cat(out) if out else torch.empty((0, teacher.dimension))


def student_of(teacher: Encoder, backbone: str | None = None) -> Encoder:
    """A one-view copy of the teacher: the same config without test-time views, the same weights (a head start).

    backbone "conv4map" (teacher conv4): the same convolutions without the last max-pool, so the projection sees the
    whole 3x3 map of the fourth block; its projection starts as the teacher's applied to the mean of the 2x2 corner
    that the teacher's pool kept (a mean where the teacher took a max: close, not equal).
    """
    config = dataclasses.replace(teacher.config, test_time_shift=0, notes={}, pair_calibration={},
                                 data_profile=dict(teacher.config.data_profile))
    if backbone is None or backbone == teacher.config.backbone:
        return Encoder(config, net=copy.deepcopy(teacher.net).cpu(), device=teacher.device)
    if (teacher.config.backbone, backbone) != ("conv4", "conv4map") or teacher.config.members != 1 \
            or teacher.config.whitening:
        raise ValueError(f"a {backbone} student of a {teacher.config.backbone} teacher is not supported")
    student = Encoder(dataclasses.replace(config, backbone=backbone), device=teacher.device)
    state = {k: v.clone() for k, v in teacher.net.state_dict().items()}
    weight = state.pop("2.weight")  # (D, C): the teacher's projection of the pooled 1x1 map
    h, w = (size // 8 for size in teacher.config.preprocessing.size)
    spread = torch.zeros(weight.shape[0], weight.shape[1], h, w)
    spread[:, :, :2, :2] = weight[:, :, None, None] / 4  # the corner the teacher's last 2x2 max-pool saw
    state["2.weight"] = spread.reshape(weight.shape[0], -1)
    student.net.load_state_dict(state)
    return student


def heldout_accuracy(encoder: Encoder, images: torch.Tensor, labels: np.ndarray, way: int, episodes: int,
                     seed: int = 0) -> tuple[float, float]:
    """(mean, 95% CI) of `way`-way 1-shot accuracy over seeded episodes of held-out classes (unstructured)."""
    return held_out_score(encoder, images, labels, way, episodes, seed)


def mean_cosine(encoder: Encoder, images: torch.Tensor, targets: torch.Tensor) -> float:
    """Mean cosine between the encoder's vectors of `images` and `targets` (unit vectors)."""
    vectors = torch.from_numpy(encoder.encode_tensors(images))
    return float((vectors * targets).sum(dim=1).mean())


def distill(teacher: Encoder, images: torch.Tensor, targets: torch.Tensor, labels: np.ndarray,
            group_of_class: dict[int, int] | None = None, config: DistillConfig | None = None,
            validation: tuple[torch.Tensor, np.ndarray, torch.Tensor] | None = None,
            log: Callable[[str], None] | None = None, student: Encoder | None = None) -> tuple[Encoder, list[dict[str, Any]]]:
    """Train a one-view student of `teacher` on (N, C, H, W) `images` whose teacher vectors are `targets` (N, D).

    `labels` (N,) class ids drive the episode batches (and the optional prototypical term); `group_of_class` the
    within-group batches. `validation` = (held-out images, their labels, their teacher vectors): every
    `eval_every` steps the student is scored (held-out `val_way`-way 1-shot, and mean cosine to the teacher) and the
    best scoring weights are kept. Returns (student with the best weights, history).
    """
    config = config or DistillConfig()
    log = log or (lambda line: None)
    torch.manual_seed(config.seed)
    student = student or student_of(teacher)
    device = student.device
    net = student.net
    optimizer = torch.optim.Adam(net.parameters(), lr=config.lr)
    proto_loss = PrototypicalLoss(config.proto_scale)
    sampler = EpisodeSampler(labels, way=config.way, shot=1, queries=config.queries, seed=config.seed,
                             group_of_class=group_of_class, within_group=config.within_group if group_of_class else 0.0)
    generator = torch.Generator().manual_seed(config.seed)
    x, t = images.to(device), targets.to(device)
    history: list[dict[str, Any]] = []

    def validate(step: int, seconds: float, running: dict[str, float]) -> float:
        row: dict[str, Any] = {"step": step, "seconds": round(seconds, 1), **{k: round(v, 5) for k, v in running.items()}}
        score = -float("inf")
        if validation is not None:
            vx, vy, vt = validation
            acc, ci = heldout_accuracy(student, vx, vy, config.val_way, config.val_episodes, seed=config.seed)
            row.update(val_accuracy=round(acc, 5), val_ci=round(ci, 5), val_cosine=round(mean_cosine(student, vx, vt), 5))
            # kept: the student closest to the teacher on the held-out classes (their accuracy is too noisy to
            # choose by: +-0.2 points over 1,000 episodes, about the whole gap between one and five views there)
            score = row["val_cosine"] if config.select == "cosine" else acc + 1e-3 * row["val_cosine"]
        history.append(row)
        log(" ".join(f"{k} {v}" for k, v in row.items()))
        train_mode()
        return score

    def train_mode() -> None:
        net.train()
        if config.frozen_batchnorm:
            for module in net.modules():
                if isinstance(module, torch.nn.modules.batchnorm._BatchNorm):
                    module.eval()

    best_score = validate(0, 0.0, {})
    best_state = copy.deepcopy(net.state_dict())
    best_step = 0
    started = time.perf_counter()
    running: dict[str, float] = {}
    train_mode()
    for step in range(1, config.steps + 1):
        lr = 0.5 * config.lr * (1 + math.cos(math.pi * (step - 1) / config.steps))
        if step <= config.warmup:
            lr *= step / config.warmup  # a converged net: Adam's first steps would jolt every weight by ~lr
        for group in optimizer.param_groups:
            group["lr"] = lr
        support, queried, _ = sampler.sample()
        index = torch.from_numpy(np.concatenate([support, queried]))
        batch, target = x[index], t[index]
        if config.augment_fraction > 0:
            chosen = torch.rand(len(batch), generator=generator) < config.augment_fraction
            if bool(chosen.any()):
                batch = batch.clone()
                batch[chosen] = augment(batch[chosen], generator, strength=config.augment_strength)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=config.bf16):
            emb = student.embed(batch)
        emb = emb.float()
        loss, parts = distillation_loss(emb, target, config.relational)
        if config.proto:
            n_support = len(support)
            way = n_support  # shot 1: one support image per class, class-major
            support_labels = torch.arange(way, device=device)
            query_labels = torch.arange(way, device=device).repeat_interleave(config.queries)
            proto = proto_loss(emb[:n_support], support_labels, emb[n_support:], query_labels)
            loss = loss + config.proto * proto
            parts["proto"] = float(proto.detach())
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        for key, value in parts.items():
            running[key] = 0.98 * running.get(key, value) + 0.02 * value
        if step % config.eval_every == 0 or step == config.steps:
            score = validate(step, time.perf_counter() - started, running)
            if score > best_score:
                best_score, best_step = score, step
                best_state = copy.deepcopy(net.state_dict())
    if validation is None:  # nothing to choose by: the last weights
        best_step, best_state = config.steps, copy.deepcopy(net.state_dict())
    net.load_state_dict(best_state)
    net.eval()
    student._fingerprint = None
    log(f"best step {best_step}")
    history.append({"best_step": best_step})
    return student, history
