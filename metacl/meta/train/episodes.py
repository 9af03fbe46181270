"""Episodes of continual meta-training, sampled by tensor indexing from resident class images.

An episode is one inner-loop trajectory (`num_batches` batches of `batch_size` images) plus the
meta batch: the trajectory's images (unless `remember_only`) and `remember_size` "remember"
images drawn without replacement from every training image. All of it is one tensor, so each
part of the model that the inner loop cannot change runs once per episode.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch

from ...core.errors import ConfigError

SampleMethod = Literal["single", "uniform"]


@dataclass
class Episode:
    images: torch.Tensor
    """(N, C, H, W): the inner trajectory's images, then the remember images."""
    labels: torch.Tensor
    """(N,) class indices of the training pool (rows of the model's `fc`)."""
    inner_size: int
    """How many leading images form the inner trajectory (num_batches * batch_size)."""
    batch_size: int
    """Images per inner step."""
    remember_only: bool
    """The meta batch leaves out the inner trajectory."""

    @property
    def inner_classes(self) -> torch.Tensor:
        """The classes the inner loop learns (the output rows to zap)."""
        return torch.unique(self.labels[: self.inner_size])

    def inner_batches(self, cycles: int = 1) -> list[slice]:
        """Row slices of the inner steps, the whole trajectory repeated `cycles` times."""
        one_pass = [slice(start, start + self.batch_size) for start in range(0, self.inner_size, self.batch_size)]
        return one_pass * cycles

    @property
    def meta_rows(self) -> slice:
        return slice(self.inner_size if self.remember_only else 0, None)


class EpisodeSampler:
    """Draws episodes from `images` (classes, per_class, C, H, W) with one seeded generator."""

    def __init__(
        self,
        images: torch.Tensor,
        generator: torch.Generator,
        *,
        sample_method: SampleMethod = "single",
        batch_size: int = 1,
        num_batches: int = 20,
        remember_size: int = 64,
        remember_only: bool = False,
    ):
        self.images = images
        self.num_classes, self.per_class = images.shape[:2]
        self.generator = generator
        self.sample_method = sample_method
        self.batch_size, self.num_batches = batch_size, num_batches
        self.remember_size, self.remember_only = remember_size, remember_only
        if sample_method not in ("single", "uniform"):
            raise ConfigError(f"unknown sample_method {sample_method!r}; valid: single, uniform")
        inner = batch_size * num_batches
        if sample_method == "single" and inner > self.per_class:
            raise ConfigError(
                f"an episode of num_batches * batch_size = {inner} images exceeds the "
                f"{self.per_class} images per class (sample_method single)"
            )
        if inner > self.num_classes * self.per_class or remember_size > self.num_classes * self.per_class:
            raise ConfigError(
                f"episode sizes ({inner} inner, {remember_size} remember) exceed the "
                f"{self.num_classes * self.per_class} training images"
            )

    def _randperm(self, n: int, k: int) -> torch.Tensor:
        return torch.randperm(n, generator=self.generator)[:k]

    def sample(self) -> Episode:
        inner = self.batch_size * self.num_batches
        if self.sample_method == "single":
            cls = int(torch.randint(self.num_classes, (), generator=self.generator))
            inner_class = torch.full((inner,), cls, dtype=torch.long)
            inner_index = self._randperm(self.per_class, inner)
        else:
            flat = self._randperm(self.num_classes * self.per_class, inner)
            inner_class, inner_index = flat // self.per_class, flat % self.per_class
        remember = self._randperm(self.num_classes * self.per_class, self.remember_size)
        classes = torch.cat([inner_class, remember // self.per_class])
        index = torch.cat([inner_index, remember % self.per_class])
        device = self.images.device
        classes, index = classes.to(device), index.to(device)
        return Episode(self.images[classes, index], classes, inner, self.batch_size, self.remember_only)
