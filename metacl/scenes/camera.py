"""The fixed scene camera and lights, after the reference renders.

The reference camera sat at (6, -5, 6) looking at the origin through a 35 mm lens (36 mm sensor,
fitted to the image width), with key, fill and back lights. World units: the ground is z = 0.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

CAMERA_POSITION = (6.0, -5.0, 6.0)
FOCAL_MM = 35.0
SENSOR_MM = 36.0

KEY_LIGHT = (-0.45, -0.75, 0.85)
"""Direction towards the key light: above, left of and behind the camera, so shadows fall back-right."""
FILL_LIGHT = (0.9, -0.35, 0.45)
BACK_LIGHT = (0.1, 0.95, 0.55)


def _unit(v: torch.Tensor) -> torch.Tensor:
    return v / v.norm(dim=-1, keepdim=True)


def light_directions(dtype=torch.float64) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return tuple(_unit(torch.tensor(d, dtype=dtype)) for d in (KEY_LIGHT, FILL_LIGHT, BACK_LIGHT))


@dataclass(frozen=True)
class Camera:
    """Pinhole camera with world-to-image projection for an image of `height` x `width` pixels."""

    height: int
    width: int

    @property
    def position(self) -> torch.Tensor:
        return torch.tensor(CAMERA_POSITION, dtype=torch.float64)

    @property
    def basis(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(right, up, forward) unit vectors of the camera in world coordinates."""
        forward = _unit(-self.position)
        right = _unit(torch.linalg.cross(forward, torch.tensor([0.0, 0.0, 1.0], dtype=torch.float64)))
        up = torch.linalg.cross(right, forward)
        return right, up, forward

    @property
    def focal_px(self) -> float:
        return FOCAL_MM / SENSOR_MM * max(self.width, self.height)

    @property
    def anchor_distance(self) -> float:
        """Depth of the world origin; sprites are drawn at one pixel per image pixel there."""
        return float(self.position.norm())

    def project(self, points: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """World points (..., 3) -> pixel coordinates (..., 2) as (x, y) and depth (...)."""
        right, up, forward = (v.to(points) for v in self.basis)
        d = points - self.position.to(points)
        depth = d @ forward
        x = self.width / 2 + self.focal_px * (d @ right) / depth
        y = self.height / 2 - self.focal_px * (d @ up) / depth
        return torch.stack([x, y], -1), depth

    def ground_points(self, dtype=torch.float64) -> torch.Tensor:
        """World (x, y) where each pixel centre's ray meets the ground plane, shape (H, W, 2)."""
        right, up, forward = (v.to(dtype) for v in self.basis)
        ys, xs = torch.meshgrid(
            torch.arange(self.height, dtype=dtype) + 0.5, torch.arange(self.width, dtype=dtype) + 0.5, indexing="ij"
        )
        rays = (
            forward
            + (xs[..., None] - self.width / 2) / self.focal_px * right
            - (ys[..., None] - self.height / 2) / self.focal_px * up
        )
        origin = self.position.to(dtype)
        t = -origin[2] / rays[..., 2]
        return (origin + t[..., None] * rays)[..., :2]
