"""OML (Javed & White 2019): six strided convs without normalisation, a two-layer head.

At 84 px the strides 2, 1, 2, 1, 2, 2 give 256 * 3 * 3 = 2304 features
(84 -> 41 -> 39 -> 19 -> 17 -> 8 -> 3); the head is fc1 (2304 -> 1024), ReLU, fc.
"""

from __future__ import annotations

import torch
from torch import nn

from .convnet import EncoderClassifier, kaiming_init_, output_size
from .registry import register_model


@register_model("oml")
class OML(EncoderClassifier):
    """The OML network, initialised as the reference's train-omni-oml.yml: kaiming-normal conv
    weights; conv biases and both linear layers keep PyTorch's default initialisation."""

    head_prefixes = ("fc1.", "fc.")

    def __init__(
        self,
        num_classes: int = 1000,
        in_channels: int = 1,
        image_size: int = 84,
        channels: int = 256,
        strides: tuple[int, ...] = (2, 1, 2, 1, 2, 2),
        hidden: int = 1024,
    ):
        super().__init__()
        layers: list[nn.Module] = []
        previous = in_channels
        for stride in strides:
            layers += [nn.Conv2d(previous, channels, 3, stride=stride), nn.ReLU()]
            previous = channels
        self.encoder = nn.Sequential(*layers)
        self.feature_dim = output_size(self.encoder, in_channels, image_size)
        self.fc1 = nn.Linear(self.feature_dim, hidden)
        self.fc = nn.Linear(hidden, num_classes)
        kaiming_init_(self.encoder)

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        return self.encoder(x).flatten(1)

    def head(self, z: torch.Tensor) -> torch.Tensor:
        return self.fc(torch.relu(self.fc1(z)))
