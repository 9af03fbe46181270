"""Batched compositing of scenes from the sprite atlas: shadows on the floor, then objects far to near.

Per batch of B images with up to 5 objects each, the renderer does three tensor passes:
shadow maps sampled on a half-resolution floor grid and multiplied together, sprites resampled
into fixed-size windows at each object's perspective scale, and a painter's-order blend of the
windows into the canvas (one window per image per step, so the scatter never collides).

Depth order: an object's perspective scale is `anchor_distance / depth`, so the farthest object
has the smallest scale. `render` paints far to near (nearer objects cover farther ones);
`measure` and `visibility` walk near to far, each object keeping the coverage that nearer
objects left.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from .atlas import Atlas, build_atlas
from .camera import Camera
from .features import COLOURS
from .layout import Layout, ground_region_corners

REFERENCE_PIXELS = 160 * 120
REFERENCE_MIN_VISIBLE = 700
"""The reference dataset's minimum of visible pixels per object at 160x120 (scaled with image area)."""


@functools.lru_cache(maxsize=4)
def _cached_atlas(height: int, width: int, device: str) -> Atlas:
    return build_atlas(height, width, device)


@dataclass
class _Placement:
    """Where each object of a batch lands in the image, as tensors on the renderer's device."""

    pixel: torch.Tensor
    scale: torch.Tensor
    x0: torch.Tensor
    y0: torch.Tensor
    order: torch.Tensor
    """(B, 5) object slots sorted far to near (ascending perspective scale)."""
    present: torch.Tensor
    colour: torch.Tensor
    shape: torch.Tensor
    rotation: torch.Tensor
    texture: torch.Tensor


@dataclass
class ObjectMeasures:
    """Per-object measurements of a batch of images, in image pixels (pixel (i, j) spans
    x in [i, i + 1), y in [j, j + 1)); absent objects hold 0 (visible, centre) and -1 (box)."""

    visible: torch.Tensor
    """(B, 5) float: visible pixels, i.e. the object's coverage (alpha) summed over the image after
    nearer objects took theirs. This is what the minimum-visibility rule checks."""
    centre: torch.Tensor
    """(B, 5, 2) float: (x, y) centroid of the object's own coverage, before occlusion."""
    box: torch.Tensor
    """(B, 5, 4) long: left, top, right, bottom (exclusive) of the pixels the object covers at
    all (coverage > 0), before occlusion; so it contains every visible pixel of the object."""


class SceneRenderer:
    """Renders layouts into uint8 images of `height` x `width` on `device`."""

    def __init__(self, height: int, width: int, device: torch.device | str = "cpu"):
        self.height, self.width = int(height), int(width)
        self.device = torch.device(device)
        self.camera = Camera(self.height, self.width)
        self.atlas = _cached_atlas(self.height, self.width, str(self.device))
        self.colours = torch.tensor(list(COLOURS.values()), dtype=torch.float32, device=self.device) / 255
        sprites, self.anchor = self._crop_to_content(self.atlas.sprites, self.atlas.anchor)
        shapes, rotations, textures, _, self.sprite_h, self.sprite_w = sprites.shape
        # A trailing all-zero sprite stands in for absent objects.
        self.sprite_table = self._with_empty(sprites.reshape(-1, 3, self.sprite_h, self.sprite_w))
        self.alpha_table = self._with_empty(sprites[:, :, 0, :1].reshape(-1, 1, self.sprite_h, self.sprite_w))
        self.shadow_table = self.atlas.shadows.reshape(-1, 1, *self.atlas.shadows.shape[-2:])
        self.rotations, self.textures = rotations, textures
        self.min_visible = REFERENCE_MIN_VISIBLE * self.height * self.width / REFERENCE_PIXELS
        self.sprite_bounds = self._measure_sprite_bounds()
        self.max_scale = self._max_scale()
        self.window_h = math.ceil(self.sprite_h * self.max_scale) + 2
        self.window_w = math.ceil(self.sprite_w * self.max_scale) + 2
        half = self.atlas.ground_xy.permute(2, 0, 1)[None]
        self.floor_xy = F.avg_pool2d(half, 2, ceil_mode=True)[0].permute(1, 2, 0).contiguous()

    @staticmethod
    def _crop_to_content(sprites: torch.Tensor, anchor: tuple[float, float]):
        """Trim the atlas frame to the pixels any sprite covers (plus a margin): smaller windows."""
        covered = sprites[:, :, 0, 0].amax(dim=(0, 1)) > 0
        rows, cols = torch.nonzero(covered.any(1)).squeeze(1), torch.nonzero(covered.any(0)).squeeze(1)
        top, left = max(int(rows.min()) - 1, 0), max(int(cols.min()) - 1, 0)
        bottom, right = int(rows.max()) + 2, int(cols.max()) + 2
        cropped = sprites[..., top:bottom, left:right].contiguous()
        return cropped, (anchor[0] - left, anchor[1] - top)

    @staticmethod
    def _with_empty(table: torch.Tensor) -> torch.Tensor:
        return torch.cat([table, torch.zeros_like(table[:1])]).contiguous()

    def _measure_sprite_bounds(self) -> np.ndarray:
        """(shapes, 4) left, top, right, bottom of each shape's pixels relative to its anchor."""
        alpha = self.alpha_table[:-1, 0].reshape(-1, self.rotations, self.sprite_h, self.sprite_w).cpu() > 0.02
        rows, cols = alpha.any(dim=(1, 3)), alpha.any(dim=(1, 2))
        ax, ay = self.anchor
        bounds = []
        for r, c in zip(rows, cols):
            ys, xs = torch.nonzero(r).squeeze(1), torch.nonzero(c).squeeze(1)
            bounds.append([xs.min() - ax, ys.min() - ay, xs.max() + 1 - ax, ys.max() + 1 - ay])
        return np.array(bounds, dtype=np.float64)

    def _max_scale(self) -> float:
        _, scale = self.project(ground_region_corners())
        return float(scale.max())

    def project(self, xy: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Ground positions (..., 2) -> anchor pixel (..., 2) and perspective scale (...)."""
        points = torch.as_tensor(np.concatenate([xy, np.zeros(xy.shape[:-1] + (1,))], -1), dtype=torch.float64)
        pixel, depth = self.camera.project(points)
        return pixel.numpy(), self.camera.anchor_distance / depth.numpy()

    def depth(self, xy: np.ndarray) -> np.ndarray:
        """Ground positions (..., 2) -> distance from the camera along its viewing axis (...)."""
        points = torch.as_tensor(np.concatenate([xy, np.zeros(xy.shape[:-1] + (1,))], -1), dtype=torch.float64)
        return self.camera.project(points)[1].numpy()

    def in_frame(self, shape: np.ndarray, xy: np.ndarray) -> np.ndarray:
        """Whether each object (shape index, ground xy) lies entirely inside the image."""
        pixel, scale = self.project(xy)
        left, top, right, bottom = (self.sprite_bounds[shape, i] * scale for i in range(4))
        x, y = pixel[:, 0], pixel[:, 1]
        return (x + left >= 0) & (x + right <= self.width) & (y + top >= 0) & (y + bottom <= self.height)

    def _place(self, layout: Layout) -> _Placement:
        dev = self.device
        pixel, scale = self.project(layout.position)
        order = torch.as_tensor(np.argsort(scale, axis=1, kind="stable"), device=dev)  # far to near
        pixel = torch.as_tensor(pixel, dtype=torch.float32, device=dev)
        scale = torch.as_tensor(scale, dtype=torch.float32, device=dev)
        # Objects lie inside the image, so shifting a window into the image still covers its object.
        x0 = (torch.floor(pixel[..., 0] - self.anchor[0] * scale).long() - 1).clamp(0, self.width - self.window_w)
        y0 = (torch.floor(pixel[..., 1] - self.anchor[1] * scale).long() - 1).clamp(0, self.height - self.window_h)
        tensors = {
            name: torch.as_tensor(getattr(layout, name), device=dev)
            for name in ("present", "colour", "shape", "rotation", "texture")
        }
        return _Placement(pixel=pixel, scale=scale, x0=x0, y0=y0, order=order, **tensors)

    def _window_sprites(
        self, table: torch.Tensor, index: torch.Tensor, placed: _Placement, slot: torch.Tensor
    ) -> torch.Tensor:
        """Object `slot` of every image resampled from `table[index]` into (B, C, window_h, window_w)."""
        rows = torch.arange(len(slot), device=self.device)
        chosen = torch.where(placed.present[rows, slot], index[rows, slot], len(table) - 1)  # last: empty
        return self._sample_windows(
            table[chosen],
            placed.pixel[rows, slot],
            placed.scale[rows, slot],
            placed.x0[rows, slot],
            placed.y0[rows, slot],
        )

    def _window_pixels(self, placed: _Placement, slot: torch.Tensor) -> torch.Tensor:
        """Flat indices (B * window_h * window_w,) into (B * H * W) of each image's window of `slot`."""
        rows = torch.arange(len(slot), device=self.device)
        y0, x0 = placed.y0[rows, slot], placed.x0[rows, slot]
        r = y0[:, None, None] + torch.arange(self.window_h, device=self.device)[None, :, None]
        c = x0[:, None, None] + torch.arange(self.window_w, device=self.device)[None, None, :]
        return ((rows[:, None, None] * self.height + r) * self.width + c).reshape(-1)

    def measure(self, layout: Layout) -> ObjectMeasures:
        """Visible coverage, silhouette centre and bounding box of every object (see ObjectMeasures).

        Objects are visited near to far; each keeps the coverage that nearer objects left.
        """
        placed = self._place(layout)
        index = placed.shape * self.rotations + placed.rotation
        batch, slots = placed.present.shape
        dev = self.device
        transmit = torch.ones(batch * self.height * self.width, device=dev)
        visible = torch.zeros(batch, slots, device=dev)
        centre = torch.zeros(batch, slots, 2, device=dev)
        box = torch.full((batch, slots, 4), -1, dtype=torch.long, device=dev)
        rows = torch.arange(batch, device=dev)
        cols_at, rows_at = torch.arange(self.window_w, device=dev), torch.arange(self.window_h, device=dev)
        for step in range(slots - 1, -1, -1):  # near to far
            slot = placed.order[:, step]
            window = self._window_sprites(self.alpha_table, index, placed, slot)
            alpha = window.reshape(-1)
            pixels = self._window_pixels(placed, slot)
            t = transmit.index_select(0, pixels)
            visible[rows, slot] = (alpha * t).reshape(batch, -1).sum(dim=1)
            transmit.index_copy_(0, pixels, t - alpha * t)

            window = window.reshape(batch, self.window_h, self.window_w)
            x0, y0 = placed.x0[rows, slot], placed.y0[rows, slot]
            area = window.sum(dim=(1, 2)).clamp(min=1e-12)
            cx = (window.sum(dim=1) * (cols_at + 0.5)).sum(dim=1) / area + x0
            cy = (window.sum(dim=2) * (rows_at + 0.5)).sum(dim=1) / area + y0
            covered = window > 0
            across, down = covered.any(dim=1), covered.any(dim=2)
            left = torch.where(across, cols_at, self.window_w).amin(dim=1)
            right = torch.where(across, cols_at + 1, 0).amax(dim=1)
            top = torch.where(down, rows_at, self.window_h).amin(dim=1)
            bottom = torch.where(down, rows_at + 1, 0).amax(dim=1)
            present = placed.present[rows, slot] & across.any(dim=1)
            centre[rows, slot] = torch.where(present[:, None], torch.stack([cx, cy], -1), 0.0)
            edges = torch.stack([left + x0, top + y0, right + x0, bottom + y0], -1)
            box[rows, slot] = torch.where(present[:, None], edges, -1)
        return ObjectMeasures(visible=visible, centre=centre, box=box)

    def visibility(self, layout: Layout) -> torch.Tensor:
        """(B, 5) visible pixels of each object (coverage left after nearer objects), 0 if absent."""
        return self.measure(layout).visible

    def coverage(self, layout: Layout) -> torch.Tensor:
        """(B, 5, H, W) each object's own coverage (alpha) in the image, ignoring occlusion; 0 if absent."""
        placed = self._place(layout)
        index = placed.shape * self.rotations + placed.rotation
        batch, slots = placed.present.shape
        maps = torch.zeros(slots, batch * self.height * self.width, device=self.device)
        for s in range(slots):
            slot = torch.full((batch,), s, dtype=torch.long, device=self.device)
            alpha = self._window_sprites(self.alpha_table, index, placed, slot).reshape(-1)
            maps[s].index_copy_(0, self._window_pixels(placed, slot), alpha)
        return maps.reshape(slots, batch, self.height, self.width).transpose(0, 1)

    def render(self, layout: Layout) -> torch.Tensor:
        """uint8 images (B, H, W, 3) on the device."""
        placed = self._place(layout)
        index = (placed.shape * self.rotations + placed.rotation) * self.textures + placed.texture
        colour = self.colours[placed.colour]
        canvas = self._floor(layout.position, placed.shape * self.rotations + placed.rotation, placed.present)
        batch = len(canvas)
        canvas = canvas.permute(0, 2, 3, 1).reshape(-1, 3).contiguous()
        rows = torch.arange(batch, device=self.device)
        for step in range(placed.present.shape[1]):  # far to near: painter's order
            slot = placed.order[:, step]
            sprite = self._window_sprites(self.sprite_table, index, placed, slot)
            sprite = sprite.permute(0, 2, 3, 1).reshape(batch, -1, 3)
            pixels = self._window_pixels(placed, slot)
            behind = canvas.index_select(0, pixels).reshape(batch, -1, 3)
            alpha, tint, white = sprite[..., 0:1], sprite[..., 1:2], sprite[..., 2:3]
            blended = behind - alpha * behind + colour[rows, slot][:, None, :] * tint + white
            canvas.index_copy_(0, pixels, blended.reshape(-1, 3))
        canvas = canvas.reshape(batch, self.height, self.width, 3)
        return torch.floor(canvas.clamp(0, 1) * 255 + 0.5).to(torch.uint8)

    def _sample_windows(self, sprites, pixel, scale, x0, y0) -> torch.Tensor:
        """Resample sprites into (N, 3, window_h, window_w) windows whose top-left pixel is (x0, y0)."""
        dev = self.device
        xs = (x0[:, None] + torch.arange(self.window_w, device=dev) + 0.5).float()
        ys = (y0[:, None] + torch.arange(self.window_h, device=dev) + 0.5).float()
        sx = (xs - pixel[:, :1]) / scale[:, None] + self.anchor[0]
        sy = (ys - pixel[:, 1:]) / scale[:, None] + self.anchor[1]
        gx = (sx / self.sprite_w * 2 - 1)[:, None, :].expand(-1, self.window_h, -1)
        gy = (sy / self.sprite_h * 2 - 1)[:, :, None].expand(-1, -1, self.window_w)
        grid = torch.stack([gx, gy], -1)
        return F.grid_sample(sprites, grid, mode="bilinear", padding_mode="zeros", align_corners=False)

    def _floor(self, position: np.ndarray, shadow_index, present) -> torch.Tensor:
        """(B, 3, H, W) floor darkened by every object's shadow (computed at half resolution)."""
        batch, slots = present.shape
        position = torch.as_tensor(position, dtype=torch.float32, device=self.device)
        extent = self.atlas.shadow_extent
        origin = torch.tensor(self.atlas.shadow_origin, device=self.device)
        local = self.floor_xy[None, None] - position[:, :, None, None, :] - origin
        grid = (local / extent * 2 - 1).reshape(batch * slots, *self.floor_xy.shape)
        shade = F.grid_sample(
            self.shadow_table[shadow_index.reshape(-1)],
            grid,
            mode="bilinear",
            padding_mode="zeros",
            align_corners=False,
        )
        shade = shade.reshape(batch, slots, *self.floor_xy.shape[:2]) * present[..., None, None]
        light = torch.prod(1 - shade, dim=1, keepdim=True)
        light = F.interpolate(light, size=(self.height, self.width), mode="bilinear", align_corners=False)
        return self.atlas.ground[None] * light
