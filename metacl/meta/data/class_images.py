"""A labelled image dataset as one dense tensor: every class holds the same number of images.

Meta-learning samplers draw classes and images by tensor indexing, so the whole split lives on
the device as `images[class, image]` and no per-item Python work happens in the training loop.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ...core.errors import ConfigError
from ...core.seeding import torch_generator


@dataclass(eq=False)
class ClassImages:
    """Images (C classes, K per class, channels, H, W), float32 in [0, 1], with class names."""

    images: torch.Tensor
    """float32 tensor of shape (num_classes, per_class, channels, height, width), values in [0, 1]."""
    class_names: list[str]
    """One name per class, e.g. "Alphabet/character01" for Omniglot or the folder name."""

    def __post_init__(self) -> None:
        if self.images.dim() != 5:
            raise ValueError(f"images must be (classes, per_class, channels, H, W), got {tuple(self.images.shape)}")
        if len(self.class_names) != self.images.shape[0]:
            raise ValueError(f"{len(self.class_names)} class names for {self.images.shape[0]} classes")

    @property
    def num_classes(self) -> int:
        return self.images.shape[0]

    @property
    def per_class(self) -> int:
        return self.images.shape[1]

    @property
    def image_shape(self) -> tuple[int, int, int]:
        """(channels, height, width) of one image."""
        return tuple(self.images.shape[2:])

    @property
    def device(self) -> torch.device:
        return self.images.device

    def to(self, device: str | torch.device) -> ClassImages:
        return ClassImages(self.images.to(device), list(self.class_names))

    def select(self, classes: torch.Tensor | list[int]) -> ClassImages:
        """The subset of classes at the given indices, in that order (relabelled 0..n-1)."""
        index = torch.as_tensor(classes, dtype=torch.long)
        return ClassImages(self.images[index.to(self.images.device)], [self.class_names[i] for i in index.tolist()])

    def flatten(self) -> tuple[torch.Tensor, torch.Tensor]:
        """All images as (N, channels, H, W) with their class labels (N,), class-major order."""
        labels = torch.arange(self.num_classes, device=self.device).repeat_interleave(self.per_class)
        return self.images.flatten(0, 1), labels


def split_classes(data: ClassImages, val_classes: int | float, seed: int) -> tuple[ClassImages, ClassImages]:
    """Hold out a seeded random set of classes for validation: (train, val), both in original order.

    `val_classes` is a count (int, 0 <= n < num_classes) or a fraction (float, 0 <= f < 1, rounded
    to the nearest count). The choice depends only on `seed` and the number of classes, so every
    run with the same seed selects hyper-parameters on the same classes, disjoint from training.
    """
    total = data.num_classes
    if isinstance(val_classes, bool) or not isinstance(val_classes, (int, float)):
        raise ConfigError(f"val_classes must be a class count (int) or a fraction (float), got {val_classes!r}")
    if isinstance(val_classes, float):
        if not 0.0 <= val_classes < 1.0:
            raise ConfigError(f"val_classes as a fraction must be in [0, 1), got {val_classes}")
        count = round(val_classes * total)
    else:
        count = val_classes
    if not 0 <= count < total:
        raise ConfigError(
            f"val_classes={val_classes} leaves no training classes: the data has "
            f"{total} classes; use 0 <= val_classes < {total}"
        )
    order = torch.randperm(total, generator=torch_generator(seed, "split_classes"))
    val = order[:count].sort().values
    train = order[count:].sort().values
    return data.select(train), data.select(val)
