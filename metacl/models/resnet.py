"""ResNet-18 (He et al. 2016) as a meta model: encode = global-average-pooled 512 features."""

from __future__ import annotations

import torch
from torch import nn

from ..core.errors import ConfigError
from .convnet import EncoderClassifier
from .registry import register_model


class BasicBlock(nn.Module):
    def __init__(self, in_channels: int, channels: int, stride: int):
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, channels, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(channels)
        self.conv2 = nn.Conv2d(channels, channels, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(channels)
        self.shortcut = nn.Sequential()
        if stride != 1 or in_channels != channels:
            self.shortcut = nn.Sequential(
                nn.Conv2d(in_channels, channels, 1, stride, bias=False), nn.BatchNorm2d(channels)
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = torch.relu(self.bn1(self.conv1(x)))
        return torch.relu(self.bn2(self.conv2(out)) + self.shortcut(x))


@register_model("resnet18")
class ResNet18(EncoderClassifier):
    """ResNet-18. `stem="small"` (3x3 conv, no max-pool) suits 28-84 px images; `"imagenet"` is
    the original 7x7 stride-2 conv plus max-pool."""

    def __init__(self, num_classes: int = 1000, in_channels: int = 1, stem: str = "small", width: int = 64):
        super().__init__()
        if stem == "small":
            self.stem = nn.Sequential(
                nn.Conv2d(in_channels, width, 3, 1, 1, bias=False), nn.BatchNorm2d(width), nn.ReLU()
            )
        elif stem == "imagenet":
            self.stem = nn.Sequential(
                nn.Conv2d(in_channels, width, 7, 2, 3, bias=False),
                nn.BatchNorm2d(width),
                nn.ReLU(),
                nn.MaxPool2d(3, 2, 1),
            )
        else:
            raise ConfigError(f"resnet18 stem {stem!r} unknown; valid choices: small, imagenet")
        stages, channels = [], width
        for index, out_channels in enumerate((width, 2 * width, 4 * width, 8 * width)):
            stride = 1 if index == 0 else 2
            stages.append(
                nn.Sequential(BasicBlock(channels, out_channels, stride), BasicBlock(out_channels, out_channels, 1))
            )
            channels = out_channels
        self.layers = nn.Sequential(*stages)
        self.feature_dim = channels
        self.fc = nn.Linear(channels, num_classes)
        for module in self.modules():
            if isinstance(module, nn.Conv2d):
                nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        return self.layers(self.stem(x)).mean(dim=(2, 3))
