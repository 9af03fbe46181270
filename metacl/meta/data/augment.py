"""Batched random-resized-crop augmentation as tensor ops, on whatever device the images are.

The reference code applied torchvision's `RandomResizedCrop(scale=(0.8, 1))` to each 105x105
image before resizing. Here the crop is taken from the already resized images of a whole batch at
once, with one affine sampling grid per image (bilinear `grid_sample`); that is the same family of
crops, resampled from the stored size instead of the original one.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F


def random_resized_crop(
    images: torch.Tensor,
    generator: torch.Generator,
    scale: tuple[float, float] = (0.8, 1.0),
    ratio: tuple[float, float] = (3 / 4, 4 / 3),
) -> torch.Tensor:
    """Crop a random box from each image and resize it back to the input size.

    images: (..., channels, H, W). Each crop covers a fraction of the area drawn uniformly from
    `scale`, with aspect ratio log-uniform in `ratio` (clamped to fit inside the image), at a
    uniform random position. The random numbers come only from `generator`, so equal generator
    states give equal crops on every device.
    """
    if not 0 < scale[0] <= scale[1] <= 1:
        raise ValueError(f"scale must satisfy 0 < low <= high <= 1, got {scale}")
    if not 0 < ratio[0] <= ratio[1]:
        raise ValueError(f"ratio must satisfy 0 < low <= high, got {ratio}")
    shape = images.shape
    batch = images.reshape(-1, *shape[-3:])
    n = batch.shape[0]
    draws = torch.rand(n, 4, generator=generator, device=generator.device, dtype=torch.float64)
    draws = draws.to(device=images.device)
    area = scale[0] + (scale[1] - scale[0]) * draws[:, 0]
    log_ratio = math.log(ratio[0]) + (math.log(ratio[1]) - math.log(ratio[0])) * draws[:, 1]
    aspect = torch.exp(log_ratio)
    width = torch.sqrt(area * aspect).clamp(max=1.0)
    height = torch.sqrt(area / aspect).clamp(max=1.0)
    # The box centre in grid coordinates [-1, 1], so that the box stays inside the image.
    centre_x = (1 - width) * (2 * draws[:, 2] - 1)
    centre_y = (1 - height) * (2 * draws[:, 3] - 1)
    theta = torch.zeros(n, 2, 3, dtype=torch.float64, device=images.device)
    theta[:, 0, 0], theta[:, 0, 2] = width, centre_x
    theta[:, 1, 1], theta[:, 1, 2] = height, centre_y
    theta = theta.to(batch.dtype)
    grid = F.affine_grid(theta, list(batch.shape), align_corners=False)
    out = F.grid_sample(batch, grid, mode="bilinear", padding_mode="border", align_corners=False)
    return out.reshape(shape)
