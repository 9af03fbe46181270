"""The scenes dataset resident on the training device, split into train and held-out test.

The whole uint8 file lives on the device (2.9 GB at the paper's 50k x 120 x 160); a batch is
one tensor index plus a normalisation, never a per-item read. The held-out split is the last
`test_fraction` of the file, and the per-channel normalisation statistics come from the training
split only (the reference tested on training images and normalised with test images included).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from ..core.errors import ConfigError, DataError


@dataclass
class SceneTensors:
    """Images (N, H, W, 3) uint8 and labels (N, 30) on `device`; rows [0, num_train) train."""

    images: torch.Tensor
    labels: torch.Tensor
    num_train: int
    mean: torch.Tensor
    std: torch.Tensor

    @property
    def num_images(self) -> int:
        return self.images.shape[0]

    @property
    def num_test(self) -> int:
        return self.num_images - self.num_train

    @property
    def image_size(self) -> tuple[int, int]:
        return int(self.images.shape[1]), int(self.images.shape[2])

    @property
    def device(self) -> torch.device:
        return self.images.device

    def train_labels_cpu(self) -> torch.Tensor:
        """Training labels as bool on the CPU, for the epoch sampler."""
        return self.labels[: self.num_train].bool().cpu()

    def batch(self, indices: torch.Tensor) -> torch.Tensor:
        """Normalised float images (B, 3, H, W) for row indices (a tensor on `device`).

        Kept in the rows' own (H, W, 3) memory order, i.e. torch.channels_last, which the models
        also use: oneDNN's CPU convolutions run ~1.6x faster on it than on NCHW (benchmarks/bench_mastery.py).
        """
        x = self.images[indices].permute(0, 3, 1, 2).float()
        return x.sub_(self.mean[:, None, None]).div_(self.std[:, None, None])


def split_sizes(num_images: int, test_fraction: float) -> tuple[int, int]:
    """(train, test): the last round(test_fraction * N) images are held out; both non-empty."""
    if not 0 < test_fraction < 1:
        raise ConfigError(f"data.test_fraction must be in (0, 1), got {test_fraction}")
    num_test = int(round(num_images * test_fraction))
    if num_test < 1 or num_test >= num_images:
        raise DataError(f"{num_images} images cannot be split into train and test with test_fraction {test_fraction}")
    return num_images - num_test, num_test


def channel_stats(images: torch.Tensor, chunk: int = 4096) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-channel mean and std of uint8 NHWC `images`, accumulated in float64 chunks."""
    total = torch.zeros(3, dtype=torch.float64, device=images.device)
    squares = torch.zeros(3, dtype=torch.float64, device=images.device)
    for start in range(0, images.shape[0], chunk):
        x = images[start : start + chunk].reshape(-1, 3).double()
        total += x.sum(0)
        squares += (x * x).sum(0)
    count = images.shape[0] * images.shape[1] * images.shape[2]
    mean = total / count
    std = (squares / count - mean * mean).clamp_min(1e-12).sqrt()
    return mean.float(), std.float().clamp_min(1e-3)


def to_device(images, labels, test_fraction: float, device: torch.device) -> SceneTensors:
    """Place numpy arrays (or tensors) on `device` and compute train-only statistics."""
    images = torch.as_tensor(images).to(device)
    labels = torch.as_tensor(labels).to(device)
    if images.dtype != torch.uint8 or images.ndim != 4 or images.shape[-1] != 3:
        raise DataError(f"images must be uint8 (N, H, W, 3), got {images.dtype} {tuple(images.shape)}")
    if labels.ndim != 2 or labels.shape[0] != images.shape[0]:
        raise DataError(f"labels must be (N, 30) to match {images.shape[0]} images, got {tuple(labels.shape)}")
    num_train, _ = split_sizes(images.shape[0], test_fraction)
    mean, std = channel_stats(images[:num_train])
    return SceneTensors(images, labels, num_train, mean, std)


def load(path: str | Path, test_fraction: float, device: torch.device) -> SceneTensors:
    """Read a scenes HDF5 file (metacl's or the reference's layout) onto `device`."""
    from ..scenes.h5 import load_scenes

    scenes = load_scenes(path)
    return to_device(scenes.X, scenes.y, test_fraction, device)


def resolve_path(config) -> Path:
    """The configured file as is when it exists; otherwise generate it (or the default file)."""
    from ..scenes.generate import default_scenes_path, ensure_scenes

    spec = config.data
    if spec.path and Path(spec.path).expanduser().is_file():
        return Path(spec.path).expanduser()
    path = (
        Path(spec.path).expanduser()
        if spec.path
        else default_scenes_path(
            spec.num_images, seed=spec.generator_seed, height=spec.height, width=spec.width, data_root=config.data_dir
        )
    )
    return Path(
        ensure_scenes(
            path,
            spec.num_images,
            seed=spec.generator_seed,
            height=spec.height,
            width=spec.width,
            device=config.device,
            quiet=config.quiet,
        )
    )
