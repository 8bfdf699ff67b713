"""Metric-learning losses as small composable modules (contrastive, triplet (mined), pairwise BCE, prototypical) and
the recipe table that says, per loss, which batch it trains on and how that batch is scored."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F


class ContrastiveLoss(nn.Module):
    """Hadsell, Chopra & LeCun (CVPR 2006): pull genuine pairs together, push impostors beyond a margin.

    forward(a (N, D), b (N, D), same (N,) in {0, 1}) -> scalar
        mean over pairs of  same * d^2 + (1 - same) * max(0, margin - d)^2, halved;  d = ||a - b||_2.
    On unit vectors d lies in [0, 2], so margins around 0.5 to 1.0 are sensible.
    """

    def __init__(self, margin: float = 0.75):
        super().__init__()
        self.margin = margin

    def forward(self, a: torch.Tensor, b: torch.Tensor, same: torch.Tensor) -> torch.Tensor:
        # +1e-12 inside the sqrt keeps the gradient finite for identical embeddings (d = 0).
        d = torch.sqrt(((a - b) ** 2).sum(dim=1) + 1e-12)
        same = same.to(d.dtype)
        return 0.5 * (same * d.pow(2) + (1 - same) * F.relu(self.margin - d).pow(2)).mean()


def _pairwise_distances(x: torch.Tensor) -> torch.Tensor:
    """(N, D) -> (N, N) Euclidean distances, with a safe sqrt at zero."""
    squared = (x.unsqueeze(1) - x.unsqueeze(0)).pow(2).sum(-1)
    return torch.sqrt(squared.clamp_min(1e-12))


class TripletLoss(nn.Module):
    """max(0, d(a, p) - d(a, n) + margin) over triplets chosen by a mining rule.

    forward(embeddings (N, D), labels (N,)) -> scalar.
    - batch_hard (Hermans, Beyer & Leibe 2017): per anchor, its farthest positive and nearest negative.
    - semi_hard (Schroff, Kalenichenko & Philbin 2015): per (anchor, positive), the nearest negative that is still
      farther than the positive; if none, the farthest negative. Mean over (anchor, positive) pairs.
    - all: mean over every valid triplet with a positive loss (zero if none).
    """

    def __init__(self, margin: float = 0.2, mining: str = "batch_hard"):
        super().__init__()
        if mining not in ("batch_hard", "semi_hard", "all"):
            raise ValueError(f"unknown mining {mining!r}")
        self.margin = margin
        self.mining = mining

    def forward(self, embeddings: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        d = _pairwise_distances(embeddings)  # (N, N)
        same = labels.unsqueeze(0) == labels.unsqueeze(1)
        eye = torch.eye(len(labels), dtype=torch.bool, device=labels.device)
        positive = same & ~eye
        negative = ~same
        if self.mining == "batch_hard":
            hardest_pos = torch.where(positive, d, torch.zeros_like(d)).max(dim=1).values
            hardest_neg = torch.where(negative, d, torch.full_like(d, float("inf"))).min(dim=1).values
            valid = positive.any(dim=1) & negative.any(dim=1)
            if not valid.any():
                return embeddings.sum() * 0.0
            return F.relu(hardest_pos - hardest_neg + self.margin)[valid].mean()
        # (anchor a, positive p, negative n) loss: d[a, p] - d[a, n] + margin -> (N, N, N)
        triplet = d.unsqueeze(2) - d.unsqueeze(1) + self.margin
        valid = positive.unsqueeze(2) & negative.unsqueeze(1)
        if self.mining == "all":
            losses = F.relu(triplet[valid])
            positive_losses = losses[losses > 0]
            return positive_losses.mean() if len(positive_losses) else embeddings.sum() * 0.0
        # semi_hard: negatives with d(a, n) > d(a, p); take the closest of them
        d_ap = d.unsqueeze(2)  # (N, N, 1)
        d_an = d.unsqueeze(1)  # (N, 1, N)
        semi = negative.unsqueeze(1) & (d_an > d_ap)
        inf = torch.full_like(triplet, float("inf"))
        closest_semi = torch.where(semi, d_an.expand_as(triplet), inf).min(dim=2).values  # (N, N)
        farthest_neg = torch.where(negative.unsqueeze(1), d_an.expand_as(triplet), -inf).max(dim=2).values
        chosen = torch.where(torch.isfinite(closest_semi), closest_semi, farthest_neg)
        pairs = positive & negative.any(dim=1, keepdim=True)
        if not pairs.any():
            return embeddings.sum() * 0.0
        return F.relu(d - chosen + self.margin)[pairs].mean()


class PairwiseBCELoss(nn.Module):
    """Koch, Zemel & Salakhutdinov (2015): p(same) = sigmoid(w . |a - b| + bias), trained with binary cross-entropy.

    forward(a (N, D), b (N, D), same (N,)) -> scalar. The head is learnable and lives in this module, so pass the
    loss's parameters to the optimiser too. `logits(a, b)` gives the head's raw scores.
    """

    def __init__(self, embedding_dim: int):
        super().__init__()
        self.head = nn.Linear(embedding_dim, 1)

    def logits(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        return self.head((a - b).abs()).squeeze(1)

    def forward(self, a: torch.Tensor, b: torch.Tensor, same: torch.Tensor) -> torch.Tensor:
        return F.binary_cross_entropy_with_logits(self.logits(a, b), same.to(a.dtype))


class PrototypicalLoss(nn.Module):
    """Snell, Swersky & Zemel (NeurIPS 2017): classify queries by softmax over negative squared distances to prototypes.

    forward(support (S, D), support_labels (S,), query (Q, D), query_labels (Q,)) -> scalar cross-entropy.
    Labels are any integers; prototypes are plain class means of the support embeddings. `scale` multiplies the
    logits: on unit-norm embeddings squared distances lie in [0, 4], too flat for a softmax over 20+ classes,
    so a scale around 10 keeps the loss from saturating (a fixed temperature, as in cosine-softmax losses).
    """

    def __init__(self, scale: float = 10.0):
        super().__init__()
        self.scale = scale

    def forward(
        self, support: torch.Tensor, support_labels: torch.Tensor, query: torch.Tensor, query_labels: torch.Tensor
    ) -> torch.Tensor:
        classes, support_index = torch.unique(support_labels, return_inverse=True)
        counts = torch.bincount(support_index, minlength=len(classes)).to(support.dtype)
        sums = torch.zeros(len(classes), support.shape[1], dtype=support.dtype, device=support.device)
        prototypes = sums.index_add(0, support_index, support) / counts.unsqueeze(1)  # (C, D)
        logits = -self.scale * (query.unsqueeze(1) - prototypes.unsqueeze(0)).pow(2).sum(-1)  # (Q, C)
        # Map each query label to its class position; a query class absent from the support is an error.
        position = (query_labels.unsqueeze(1) == classes.unsqueeze(0)).float().argmax(dim=1)
        if not bool((classes[position] == query_labels).all()):
            raise ValueError("every query label must appear in the support set")
        return F.cross_entropy(logits, position)


# ---------------------------------------------------------------------------------------------- the recipe table


@dataclass
class Batch:
    """What one training step embeds, in order, and what its loss needs to know about those items.

    `indices` (B,): training items in embedding order. Pairs: the first half pairs with the second, `same` (B/2,)
    1 genuine / 0 impostor. Classes: `labels` (B,) the class of each item. Episodes: the first `support` items are
    the support set (class-major, `shot` a class), the rest queries of episode classes `answer` (Q,).
    """

    indices: np.ndarray
    same: np.ndarray | None = None
    labels: np.ndarray | None = None
    support: int = 0
    shot: int = 1
    answer: np.ndarray | None = None


def _score_pairs(loss: nn.Module, embeddings: torch.Tensor, batch: Batch) -> torch.Tensor:
    n = len(batch.same)
    return loss(embeddings[:n], embeddings[n:], torch.from_numpy(batch.same).to(embeddings.device))


def _score_classes(loss: nn.Module, embeddings: torch.Tensor, batch: Batch) -> torch.Tensor:
    return loss(embeddings, torch.from_numpy(batch.labels).to(embeddings.device))


def _score_episode(loss: nn.Module, embeddings: torch.Tensor, batch: Batch) -> torch.Tensor:
    way = batch.support // batch.shot  # fewer than asked in a within-group episode of a small group
    support_labels = torch.arange(way, device=embeddings.device).repeat_interleave(batch.shot)
    return loss(embeddings[: batch.support], support_labels, embeddings[batch.support :],
                torch.from_numpy(batch.answer).to(embeddings.device))


@dataclass(frozen=True)
class LossRecipe:
    """How one loss trains: `build(config)` its module from a TrainConfig (and the margin it uses), the `batch`
    kind it trains on ("pairs", "classes" or "episodes", drawn by `siamesedb.batches`), and `score(module,
    embeddings, batch)` the loss of one batch. `margin`: the default of TrainConfig.margin."""

    build: Callable[[Any, float], nn.Module]
    batch: str
    score: Callable[[nn.Module, torch.Tensor, Batch], torch.Tensor]
    margin: float = 0.2


# A new loss is one entry here (and, for a new kind of batch, one entry in siamesedb.batches.BATCH_KINDS).
LOSS_RECIPES: dict[str, LossRecipe] = {
    "contrastive": LossRecipe(lambda config, margin: ContrastiveLoss(margin), "pairs", _score_pairs, margin=0.75),
    "triplet": LossRecipe(lambda config, margin: TripletLoss(margin, config.mining), "classes", _score_classes),
    "bce": LossRecipe(lambda config, margin: PairwiseBCELoss(config.embedding_dim), "pairs", _score_pairs),
    # On unit vectors the prototypical logits are scaled (see PrototypicalLoss); Euclidean heads use -d^2 as is.
    "proto": LossRecipe(lambda config, margin: PrototypicalLoss(config.proto_scale if config.metric == "cosine" else 1.0),
                        "episodes", _score_episode),
}
