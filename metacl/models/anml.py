"""ANML (Beaulieu et al. 2020) and SANML, its neuromodulation-free variant.

ANML = RLN (representation) gated by NM (neuromodulation): encode(x) = rln(x) * sigmoid(nm(x)).
Parameter prefixes: `rln.`, `nm.` (ANML only), `fc.`. At 28 px the RLN's last block is unpooled
(26 -> 13 -> 11 -> 5 -> 3: 256 * 3 * 3 = 2304 features).
"""

from __future__ import annotations

import torch
from torch import nn

from .convnet import EncoderClassifier, conv_block, kaiming_init_, output_size
from .registry import register_model


def anml_trunk(in_channels: int, channels: int, pool_last: bool) -> nn.Sequential:
    """3 blocks of [3x3 conv pad 0; InstanceNorm (affine); ReLU; 2x2 max-pool]."""
    return nn.Sequential(
        conv_block(in_channels, channels, norm="in"),
        conv_block(channels, channels, norm="in"),
        conv_block(channels, channels, norm="in", pool=2 if pool_last else 0),
    )


@register_model("sanml")
class SANML(EncoderClassifier):
    """The ANML RLN and head without neuromodulation (about 3.49M parameters at 28 px)."""

    def __init__(
        self,
        num_classes: int = 1000,
        in_channels: int = 1,
        image_size: int = 28,
        rln_channels: int = 256,
        pool_rln_output: bool = False,
    ):
        super().__init__()
        self.rln = anml_trunk(in_channels, rln_channels, pool_rln_output)
        kaiming_init_(self.rln)
        self.feature_dim = output_size(self.rln, in_channels, image_size)
        self.fc = nn.Linear(self.feature_dim, num_classes)

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        return self.rln(x).flatten(1)


@register_model("anml")
class ANML(SANML):
    """RLN features gated by the NM's sigmoid mask.

    `nm_pool_output=True` pools the NM's last block, so the mask layer reads 112 features (the
    higherANML refactor, about 3.98M parameters); False keeps it unpooled, 1008 features (the
    original ANML, about 6.04M).

    Stages beyond the base class: `stage="mask"` returns the NM mask alone, and `mask=` feeds a
    precomputed one, so an inner loop that never changes the NM computes it once per episode.
    """

    modulation_prefixes = ("nm.",)
    """Parameters the mask depends on (the meta-trainer precomputes masks when none is adapted)."""

    def __init__(
        self,
        num_classes: int = 1000,
        in_channels: int = 1,
        image_size: int = 28,
        rln_channels: int = 256,
        nm_channels: int = 112,
        pool_rln_output: bool = False,
        nm_pool_output: bool = True,
    ):
        super().__init__(num_classes, in_channels, image_size, rln_channels, pool_rln_output)
        trunk = anml_trunk(in_channels, nm_channels, nm_pool_output)
        kaiming_init_(trunk)
        self.nm = nn.Sequential(
            trunk, nn.Flatten(), nn.Linear(output_size(trunk, in_channels, image_size), self.feature_dim), nn.Sigmoid()
        )

    def encode(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        return self.rln(x).flatten(1) * (self.nm(x) if mask is None else mask)

    def forward(self, x: torch.Tensor, stage: str = "logits", mask: torch.Tensor | None = None) -> torch.Tensor:
        if stage == "mask":
            return self.nm(x)
        if stage == "logits":
            return self.head(self.encode(x, mask))
        if stage == "encode":
            return self.encode(x, mask)
        return super().forward(x, stage)  # type: ignore[arg-type]
