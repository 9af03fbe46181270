"""The sequential-mastery models (Davidson & Mozer 2020): a CNN whose features meet a task query.

Every model maps an image batch (B, 3, H, W) and a one-hot query (B, num_queries) to two logits
("is the queried feature in the image?").

    cnn-mlp            the paper's model: conv blocks, then the query concatenated to the
                       flattened features, then an MLP
    query-modulated    as cnn-mlp, plus a per-channel bias Linear(query -> C_l) added to the
                       output of conv layer l (before its ReLU) for each l in `levels`
    task-conditional   as cnn-mlp, plus a query gate and shift before every conv layer, as in the
                       reference: x * sigmoid(W_m q + b_m) (multiplicative), x + W_a q + b_a
                       (additive) or both (the default: gate, then shift)

In cnn-mlp the conv features do not depend on the query, so `query_dependent_features` is False
and testing many tasks on the same images computes the features once (`features` + `head`).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

import torch
from torch import nn

from ..scenes.features import NUM_FEATURES
from .registry import register_model

NUM_QUERIES = NUM_FEATURES
"""One query per feature of the scenes vocabulary (scenes/features.py)."""


class ConvBlock(nn.Module):
    """[3x3 conv, stride 1, pad 1; ReLU; BatchNorm; 2x2 max-pool], with optional spatial dropout."""

    def __init__(self, in_channels: int, out_channels: int, dropout: float):
        super().__init__()
        self.conv = nn.Conv2d(in_channels, out_channels, 3, stride=1, padding=1)
        self.norm = nn.BatchNorm2d(out_channels)
        self.pool = nn.MaxPool2d(2)
        self.dropout = nn.Dropout2d(dropout) if dropout > 0 else nn.Identity()

    def forward(self, x: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
        x = self.conv(x)
        if bias is not None:
            x = x + bias[:, :, None, None]
        return self.dropout(self.pool(self.norm(torch.relu(x))))


class CnnMlp(nn.Module):
    """Conv blocks -> flatten -> concat query -> MLP -> 2 logits."""

    query_dependent_features = False

    def __init__(
        self,
        channels: Sequence[int] = (16, 32, 48, 64),
        hidden: Sequence[int] = (512, 512, 512, 512),
        image_size: Sequence[int] = (120, 160),
        num_queries: int = NUM_QUERIES,
        dropout: bool = False,
    ):
        super().__init__()
        if not channels:
            raise ValueError("channels must list at least one conv width")
        height, width = image_size
        if height >> len(channels) < 1 or width >> len(channels) < 1:
            raise ValueError(f"image_size {tuple(image_size)} is too small for {len(channels)} 2x2 poolings")
        self.channels, self.num_queries = list(channels), num_queries
        widths = [3, *channels]
        self.blocks = nn.ModuleList(ConvBlock(a, b, 0.2 if dropout else 0.0) for a, b in zip(widths, widths[1:]))
        self.num_features = channels[-1] * (height >> len(channels)) * (width >> len(channels))
        layers: list[nn.Module] = []
        size = self.num_features + num_queries
        for units in hidden:
            layers += [nn.Linear(size, units), nn.ReLU()]
            if dropout:
                layers.append(nn.Dropout(0.5))
            size = units
        layers.append(nn.Linear(size, 2))
        self.mlp = nn.Sequential(*layers)

    def conv_features(self, x: torch.Tensor, query: torch.Tensor) -> torch.Tensor:
        for block in self.blocks:
            x = block(x)
        return x.flatten(1)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """Query-independent image features (only for models with query_dependent_features False)."""
        return self.conv_features(x, None)  # type: ignore[arg-type]  # the plain model ignores the query

    def head(self, features: torch.Tensor, query: torch.Tensor) -> torch.Tensor:
        return self.mlp(torch.cat([features, query], dim=1))

    def forward(self, x: torch.Tensor, query: torch.Tensor) -> torch.Tensor:
        return self.head(self.conv_features(x, query), query)


class QueryModulated(CnnMlp):
    """cnn-mlp plus a query-driven per-channel bias on conv layer l for each l in `levels`."""

    query_dependent_features = True

    def __init__(self, levels: Sequence[int] = (1,), **kwargs):
        super().__init__(**kwargs)
        depth = len(self.channels)
        if not levels or any(not 1 <= level <= depth for level in levels):
            raise ValueError(f"levels {list(levels)} must be a non-empty list of conv layers 1..{depth}")
        self.levels = sorted(set(levels))
        self.modulators = nn.ModuleDict(
            {str(level): nn.Linear(self.num_queries, self.channels[level - 1]) for level in self.levels}
        )

    def conv_features(self, x: torch.Tensor, query: torch.Tensor) -> torch.Tensor:
        for level, block in enumerate(self.blocks, start=1):
            modulator = self.modulators[str(level)] if level in self.levels else None
            x = block(x, modulator(query) if modulator is not None else None)
        return x.flatten(1)


class TaskConditional(CnnMlp):
    """cnn-mlp plus a query gate and/or shift (Linear layers with biases, as in the reference) on
    the input of every conv layer; `conditioning` "both" (the default) applies the gate, then the
    shift."""

    query_dependent_features = True

    def __init__(self, conditioning: Literal["multiplicative", "additive", "both"] = "both", **kwargs):
        super().__init__(**kwargs)
        if conditioning not in ("multiplicative", "additive", "both"):
            raise ValueError(f"conditioning {conditioning!r}; valid choices: multiplicative, additive, both")
        self.conditioning = conditioning
        inputs = [3, *self.channels[:-1]]
        multiplicative = conditioning in ("multiplicative", "both")
        additive = conditioning in ("additive", "both")
        self.gates = nn.ModuleList(nn.Linear(self.num_queries, c) for c in inputs) if multiplicative else None
        self.shifts = nn.ModuleList(nn.Linear(self.num_queries, c) for c in inputs) if additive else None

    def conv_features(self, x: torch.Tensor, query: torch.Tensor) -> torch.Tensor:
        for index, block in enumerate(self.blocks):
            if self.gates is not None:
                x = x * torch.sigmoid(self.gates[index](query))[:, :, None, None]
            if self.shifts is not None:
                x = x + self.shifts[index](query)[:, :, None, None]
            x = block(x)
        return x.flatten(1)


@register_model("cnn-mlp")
def cnn_mlp(**kwargs) -> CnnMlp:
    return CnnMlp(**kwargs)


@register_model("query-modulated")
def query_modulated(**kwargs) -> QueryModulated:
    return QueryModulated(**kwargs)


@register_model("task-conditional")
def task_conditional(**kwargs) -> TaskConditional:
    return TaskConditional(**kwargs)
