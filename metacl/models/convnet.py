"""Convolutional encoders with swappable heads, and the base class every meta model shares.

Every meta model is an `EncoderClassifier`: `encode(x) -> (B, D)` is the representation,
`head(z) -> logits`, `forward(x) = head(encode(x))`, and the last layer is an `nn.Linear` named
`fc`. `forward(x, stage=...)` also reaches the parts one at a time, so that
`torch.func.functional_call` can run just the encoder or just the head with a given parameter
dict (the meta-trainer encodes an episode once when the inner loop only adapts the head).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

from ..core.errors import ConfigError
from .layers import Conv2d, InstanceNorm, MaxPool2d
from .registry import register_model

Stage = Literal["logits", "encode", "head"]


class EncoderClassifier(nn.Module):
    """Base of the meta models: an encoder, a head ending in `fc`, and staged forward passes."""

    head_prefixes: tuple[str, ...] = ("fc.",)
    """Parameter-name prefixes of the head (everything after `encode`)."""

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    fc: nn.Linear

    def head(self, z: torch.Tensor) -> torch.Tensor:
        return self.fc(z)

    def forward(self, x: torch.Tensor, stage: Stage = "logits") -> torch.Tensor:
        if stage == "logits":
            return self.head(self.encode(x))
        if stage == "encode":
            return self.encode(x)
        if stage == "head":
            return self.head(x)
        raise ValueError(f"unknown stage {stage!r}; valid: logits, encode, head")


def conv_block(
    in_channels: int,
    out_channels: int,
    *,
    norm: str | None = "in",
    pool: int = 2,
    padding: int = 0,
    stride: int = 1,
    num_groups: int = 8,
) -> nn.Sequential:
    """[3x3 conv; norm; ReLU; max-pool] with norm in (None, bn, gn, in) and pool 0 for none.

    The max-pool runs before the ReLU: the two commute exactly (values and gradients), and
    pooling first makes the ReLU four times cheaper.
    """
    layers: list[nn.Module] = [Conv2d(in_channels, out_channels, 3, stride=stride, padding=padding)]
    if norm == "in":
        layers.append(InstanceNorm(out_channels, affine=True))
    elif norm == "bn":
        layers.append(nn.BatchNorm2d(out_channels))
    elif norm == "gn":
        layers.append(nn.GroupNorm(math.gcd(num_groups, out_channels), out_channels))
    elif norm is not None:
        raise ConfigError(f"unknown norm {norm!r}; valid choices: null, bn, gn, in")
    if pool:
        layers.append(MaxPool2d(pool))
    layers.append(nn.ReLU())
    return nn.Sequential(*layers)


def kaiming_init_(module: nn.Module, zero_bias: bool = False) -> None:
    """Kaiming-normal weights for every conv (and linear, when `zero_bias`), optionally zero biases."""
    for layer in module.modules():
        if isinstance(layer, nn.Conv2d) or (zero_bias and isinstance(layer, nn.Linear)):
            nn.init.kaiming_normal_(layer.weight)
            if zero_bias and layer.bias is not None:
                nn.init.zeros_(layer.bias)


def output_size(module: nn.Module, in_channels: int, image_size: int) -> int:
    """Flattened output size of `module` on one image (one cheap forward pass at build time)."""
    with torch.no_grad():
        return module(torch.zeros(1, in_channels, image_size, image_size)).flatten(1).shape[1]


def _per_block(value: int | Sequence[int] | None, blocks: int, name: str) -> list[int]:
    if value is None:
        return [0] * blocks
    if isinstance(value, int):
        return [value] * blocks
    value = list(value)
    if len(value) != blocks:
        raise ConfigError(f"convnet {name}: {len(value)} values given for {blocks} blocks")
    return [int(v) if v is not None else 0 for v in value]


@register_model("convnet")
class ConvNet(EncoderClassifier):
    """`num_blocks` conv blocks (filters, padding, stride, norm and pooling per block), then a
    linear, MLP or cosine head. Its `fc` is the final linear layer (for the cosine head, the
    bias-free class rows that logits compare `z` with)."""

    def __init__(
        self,
        num_classes: int = 1000,
        in_channels: int = 1,
        image_size: int = 28,
        num_blocks: int = 4,
        num_filters: int | list[int] = 64,
        padding: int = 1,
        stride: int | list[int] = 1,
        norm: str | None = "bn",
        pool: int | list[int] | None = 2,
        head: str = "linear",
        hidden: list[int] | None = None,
        cosine_scale: float = 10.0,
    ):
        super().__init__()
        filters = _per_block(num_filters, num_blocks, "num_filters")
        strides = _per_block(stride, num_blocks, "stride")
        pools = _per_block(pool, num_blocks, "pool")
        blocks, channels = [], in_channels
        for width, step, pool_size in zip(filters, strides, pools):
            blocks.append(conv_block(channels, width, norm=norm, pool=pool_size, padding=padding, stride=step))
            channels = width
        self.encoder = nn.Sequential(*blocks)
        kaiming_init_(self.encoder)
        self.feature_dim = output_size(self.encoder, in_channels, image_size)
        self.head_kind = head
        if head == "linear":
            self.fc = nn.Linear(self.feature_dim, num_classes)
            self.head_prefixes = ("fc.",)
        elif head == "mlp":
            sizes = [self.feature_dim, *(hidden or [1024])]
            self.hidden = nn.Sequential(*[m for a, b in zip(sizes, sizes[1:]) for m in (nn.Linear(a, b), nn.ReLU())])
            self.fc = nn.Linear(sizes[-1], num_classes)
            self.head_prefixes = ("hidden.", "fc.")
        elif head == "cosine":
            self.fc = nn.Linear(self.feature_dim, num_classes, bias=False)
            self.scale = nn.Parameter(torch.tensor(float(cosine_scale)))
            self.head_prefixes = ("fc.", "scale")
        else:
            raise ConfigError(f"convnet head {head!r} unknown; valid choices: linear, mlp, cosine")

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        return self.encoder(x).flatten(1)

    def head(self, z: torch.Tensor) -> torch.Tensor:
        if self.head_kind == "mlp":
            return self.fc(self.hidden(z))
        if self.head_kind == "cosine":  # scale * cos(z, class row): a metric head
            return self.scale * F.linear(F.normalize(z, dim=1), F.normalize(self.fc.weight, dim=1))
        return self.fc(z)
