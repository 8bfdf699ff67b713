"""The backbone registry: every net an encoder can be built on, by name, its options passed as keyword arguments
(timm-style: `create_backbone("conv4", channels=1, embedding_dim=64, image_size=(28, 28), width=64)`), and the two
wrappers that combine trained nets (`Ensemble`, `Whitened`).

Adding a backbone is one entry: a factory decorated with `@register_backbone("name")` that takes the keyword
arguments `channels`, `embedding_dim`, `image_size` (height, width) and `width` (plus any options of its own) and
returns an nn.Module mapping (N, channels, H, W) to (N, embedding_dim).
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import nn
from torch.nn import functional as F

from siamesedb.errors import EncoderError

COMMON_ARGUMENTS = ("channels", "embedding_dim", "image_size", "width")  # every factory takes these by keyword


@dataclass(frozen=True)
class Backbone:
    """One registry entry: a net's factory and what is known about the net."""

    name: str
    factory: Callable[..., nn.Module]
    # Its training step measured faster under CPU bfloat16 autocast (tools/bench_train_bf16.py, BENCHMARKS.md).
    bf16_faster: bool = False
    # The vector length of its reference design, for callers that let the backbone choose (None: no preference).
    embedding_dim: int | None = None

    @property
    def options(self) -> frozenset[str]:
        """The keyword options its factory takes beyond COMMON_ARGUMENTS (the mlp: hidden, dropout)."""
        return frozenset(inspect.signature(self.factory).parameters) - frozenset(COMMON_ARGUMENTS)


BACKBONES: dict[str, Backbone] = {}


def register_backbone(name: str, *, bf16_faster: bool = False, embedding_dim: int | None = None) -> Callable:
    """Decorator: make a backbone factory (keyword arguments, see the module docstring) known under `name`."""

    def wrap(factory: Callable[..., nn.Module]) -> Callable[..., nn.Module]:
        BACKBONES[name] = Backbone(name, factory, bf16_faster=bf16_faster, embedding_dim=embedding_dim)
        return factory

    return wrap


def get_backbone(name: str) -> Backbone:
    """The registry entry of `name` (`hf:HUB_ID_OR_DIR`: the pretrained entry); an unknown name is an EncoderError
    listing the known ones."""
    if isinstance(name, str) and name.startswith(PRETRAINED_PREFIX):
        return PRETRAINED
    try:
        return BACKBONES[name]
    except KeyError:
        raise EncoderError(f"unknown backbone {name!r}; known: {', '.join(sorted(BACKBONES))}, "
                           f"or {PRETRAINED_PREFIX}HUB_ID_OR_DIR (a Hugging Face vision model)") from None


def create_backbone(name: str, *, channels: int, embedding_dim: int, image_size: tuple[int, int],
                    width: int | None = None, **options: object) -> nn.Module:
    """The untrained net `name`: (N, channels, *image_size) -> (N, embedding_dim). `width` None: the net's own
    default; `options` must be ones the net takes (`Backbone.options`), else an EncoderError names them."""
    backbone = get_backbone(name)
    unknown = sorted(set(options) - backbone.options)
    if unknown:
        raise EncoderError(f"the {name} backbone takes no option {', '.join(unknown)}")
    if width is not None:
        options["width"] = width
    return backbone.factory(channels=channels, embedding_dim=embedding_dim, image_size=image_size, **options)


PRETRAINED_PREFIX = "hf:"


def _pretrained(*, channels: int, embedding_dim: int, image_size: tuple[int, int], width: int = 0,
                pretrained: dict | None = None) -> nn.Module:
    """A Hugging Face vision model (`hf:HUB_ID_OR_DIR`, siamesedb.pretrained) rebuilt from the description an
    encoder's config keeps (`pretrained`); the common arguments come from the model itself and are not used.
    A new one is made from its source with `Encoder.from_pretrained`."""
    if not pretrained:
        raise EncoderError("an hf: backbone is made from its source with Encoder.from_pretrained (or train --backbone "
                           "hf:... --epochs 0), not from a bare config")
    from siamesedb.pretrained import net_from_spec

    return net_from_spec(pretrained)


# Every hf:... name; not in BACKBONES (no one name). bf16_faster: DINOv2-small's feature pass and its unfrozen
# step measured faster under CPU bf16 autocast (tools/bench_pretrained_train.py, BENCHMARKS.md).
PRETRAINED = Backbone("hf", _pretrained, bf16_faster=True)


def _conv_block(cin: int, cout: int) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(cin, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True), nn.MaxPool2d(2))


@register_backbone("conv4", bf16_faster=True)
def conv4(*, channels: int, embedding_dim: int, image_size: tuple[int, int], width: int = 64) -> nn.Module:
    """Conv-4 (Vinyals et al. 2016; Snell et al. 2017): 4 x [conv3x3-BN-ReLU-maxpool2], then a linear projection.

    (N, C, H, W) -> (N, width, H/16, W/16) -> flatten -> (N, embedding_dim). At 28x28 the feature map is 1x1.
    """
    features = nn.Sequential(*(_conv_block(channels if i == 0 else width, width) for i in range(4)))
    h, w = image_size
    flat = width * max(1, h // 16) * max(1, w // 16)
    return nn.Sequential(features, nn.Flatten(), nn.Linear(flat, embedding_dim))


@register_backbone("conv4map", bf16_faster=True)
def conv4map(*, channels: int, embedding_dim: int, image_size: tuple[int, int], width: int = 64) -> nn.Module:
    """Conv-4 without its last max-pool: the projection sees where on the page each feature fired.

    (N, C, H, W) -> (N, width, H/8, W/8) -> flatten -> (N, embedding_dim). At 28x28 the map is 3x3 (576 values at
    width 64), where plain Conv-4's last pool keeps one 2x2 corner of it as a single value per channel.
    """
    blocks = [_conv_block(channels if i == 0 else width, width) for i in range(4)]
    features = nn.Sequential(*blocks[:3], blocks[3][:-1])  # the fourth block's conv-BN-ReLU, no pool
    h, w = image_size
    flat = width * max(1, h // 8) * max(1, w // 8)
    return nn.Sequential(features, nn.Flatten(), nn.Linear(flat, embedding_dim))


@register_backbone("signet", bf16_faster=True)
def signet(*, channels: int, embedding_dim: int, image_size: tuple[int, int], width: int = 32) -> nn.Module:
    """A small SigNet-style net for offline signatures (after Dey et al. 2017, scaled down for CPU).

    Wide grey input (e.g. 64x128, inverted, aspect kept): a 5x5 stem then 3 conv blocks (width x 1, 2, 4, 4), each
    halving the map, an adaptive pool to (2, 4) that keeps the left-to-right layout of the strokes, and two fully
    connected layers with dropout. (N, C, H, W) -> (N, embedding_dim).
    """
    stem = nn.Sequential(nn.Conv2d(channels, width, 5, padding=2, bias=False), nn.BatchNorm2d(width),
                         nn.ReLU(inplace=True), nn.MaxPool2d(2))
    blocks = [_conv_block(width, width * 2), _conv_block(width * 2, width * 4), _conv_block(width * 4, width * 4)]
    head = nn.Sequential(nn.AdaptiveAvgPool2d((2, 4)), nn.Flatten(), nn.Linear(width * 4 * 8, 256),
                         nn.ReLU(inplace=True), nn.Dropout(0.3), nn.Linear(256, embedding_dim))
    return nn.Sequential(stem, *blocks, head)


MLP_HIDDEN = (128, 64, 32)  # the reference MLP twin: 784 -> 128 -> 64 -> 32 -> 16
MLP_DROPOUT = 0.1


@register_backbone("mlp", embedding_dim=16)
def mlp(*, channels: int, embedding_dim: int, image_size: tuple[int, int], width: int = 0,
        hidden: Sequence[int] | None = None, dropout: float | None = None) -> nn.Module:
    """The reference MLP twin (MNIST): flatten, then Dense-ReLU layers, dropout after all but the last two.

    (N, C, H, W) -> flatten (N, C*H*W) -> 128 ReLU -> Dropout 0.1 -> 64 ReLU -> Dropout 0.1 -> 32 ReLU
    -> embedding_dim ReLU (16 in the reference). `hidden` replaces (128, 64, 32) and `dropout` the 0.1; `width` is
    not used (a fully connected net has no channels). The last ReLU is the reference's: outputs are >= 0.
    """
    sizes = [channels * image_size[0] * image_size[1], *(MLP_HIDDEN if hidden is None else hidden)]
    p = MLP_DROPOUT if dropout is None else float(dropout)
    layers: list[nn.Module] = [nn.Flatten()]
    for i, (cin, cout) in enumerate(zip(sizes, sizes[1:])):
        layers += [nn.Linear(cin, cout), nn.ReLU(inplace=True)]
        if i < len(sizes) - 2 and p > 0:  # the reference drops out after every hidden layer but the last one
            layers.append(nn.Dropout(p))
    layers += [nn.Linear(sizes[-1], embedding_dim), nn.ReLU(inplace=True)]
    return nn.Sequential(*layers)


class _BasicBlock(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.skip = (
            nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))
            if stride != 1 or cin != cout
            else nn.Identity()
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)), inplace=True)
        return F.relu(self.bn2(self.conv2(out)) + self.skip(x), inplace=True)


@register_backbone("resnet", bf16_faster=True)
def resnet(*, channels: int, embedding_dim: int, image_size: tuple[int, int], width: int = 32) -> nn.Module:
    """A small ResNet for photos (He et al. 2016): stem, 4 stages of 2 BasicBlocks (width x 1, 2, 4, 8), GAP, linear."""
    stem = nn.Sequential(nn.Conv2d(channels, width, 3, 1, 1, bias=False), nn.BatchNorm2d(width), nn.ReLU(inplace=True))
    stages, cin = [], width
    for i, mult in enumerate((1, 2, 4, 8)):
        cout = width * mult
        stride = 1 if i == 0 else 2
        stages += [_BasicBlock(cin, cout, stride), _BasicBlock(cout, cout, 1)]
        cin = cout
    return nn.Sequential(stem, *stages, nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(cin, embedding_dim))


class Ensemble(nn.Module):
    """Several independently trained copies of one backbone: (N, C, H, W) -> (N, members * D).

    Each member's vector is L2-normalised and scaled by 1/sqrt(members), so after the encoder's own normalisation
    (a no-op here: the result already has unit length) the cosine of two images is the mean of the members' cosines.
    """

    def __init__(self, members: list[nn.Module]):
        super().__init__()
        self.members = nn.ModuleList(members)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        scale = len(self.members) ** -0.5
        return torch.cat([F.normalize(m(x).float(), dim=1) * scale for m in self.members], dim=1)


class Whitened(nn.Module):
    """A backbone followed by a fixed linear map of its unit vectors: (N, C, H, W) -> (N, D).

    The map (fitted by `training.whitened_encoder`) whitens the spread of one class's items (within-class covariance),
    so that cosine similarity stops rewarding the directions along which a class's own items already disagree.
    """

    def __init__(self, backbone: nn.Module, dimension: int):
        super().__init__()
        self.backbone = backbone
        self.linear = nn.Linear(dimension, dimension, bias=False)
        with torch.no_grad():
            self.linear.weight.copy_(torch.eye(dimension))  # identity until fitted

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear(F.normalize(self.backbone(x).float(), dim=1))
