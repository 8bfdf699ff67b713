"""Training-time augmentation of (N, C, H, W) batches in [0, 1], on the batch's device: small random affine
distortions (glyphs, signatures, photos) and photometric ones (photos: flips, brightness and contrast)."""

from __future__ import annotations

import math

import torch
from torch.nn import functional as F

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
