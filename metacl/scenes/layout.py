"""Random scene layouts: which objects appear, and where, for a batch of image indices.

Every random number is a pure function of (seed, image index, attempt, slot), computed by a
counter-based hash, so an image's content never depends on the batch it is drawn in, on the
number of workers, or on the device. The objects of an image (how many, and their colours,
shapes, textures and orientations) are drawn once; a placement that fails a check (no room for
the objects, or an object hidden behind another) is redrawn with the next attempt number. So
rejection never skews how often each feature or object count appears.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ..core.seeding import derive_seed
from .atlas import ROTATIONS
from .camera import CAMERA_POSITION
from .features import SHAPES, VALUES_PER_DIMENSION
from .shapes import FOOTPRINT_RADIUS

MAX_OBJECTS = 5
MIN_OBJECTS = 4
CANDIDATES = 64
"""Candidate ground positions tried per layout attempt."""
LATERAL_HALF_EXTENT = 4.6
DEPTH_HALF_EXTENT = 2.4
"""Positions are drawn from a rectangle of the ground centred on the origin and aligned with the
camera: +-4.6 across the view and +-2.4 along it, then kept if fully in frame. Keeping the depth
range narrow keeps the perspective scale within about 0.85-1.25, so far objects stay large."""
MIN_GAP = 0.3
"""Smallest distance, in world units, between the footprints of two objects."""

_ALONG = -np.array(CAMERA_POSITION[:2]) / np.linalg.norm(CAMERA_POSITION[:2])
_ACROSS = np.array([_ALONG[1], -_ALONG[0]])
_FOOTPRINT = np.array([FOOTPRINT_RADIUS[s] for s in SHAPES])


def _splitmix(x: np.ndarray) -> np.ndarray:
    x = x + np.uint64(0x9E3779B97F4A7C15)
    x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return x ^ (x >> np.uint64(31))


def uniforms(seed: int, stream: str, indices: np.ndarray, attempts: np.ndarray, count: int) -> np.ndarray:
    """(len(indices), count) floats in [0, 1) determined by (seed, stream, index, attempt, column) alone."""
    key = np.uint64(derive_seed(seed, "scenes-layout", stream))
    with np.errstate(over="ignore"):
        row = _splitmix(
            _splitmix(indices.astype(np.uint64) ^ key) + attempts.astype(np.uint64) * np.uint64(0x632BE59BD9B4E019)
        )
        bits = _splitmix(row[:, None] + np.arange(count, dtype=np.uint64)[None, :] * np.uint64(0xD1B54A32D192ED03))
    return (bits >> np.uint64(11)).astype(np.float64) / float(2**53)


@dataclass
class Layout:
    """Objects of a batch of images; slots beyond `count` are unused (`present` False)."""

    present: np.ndarray
    """(B, 5) bool."""
    colour: np.ndarray
    """(B, 5) int 0-9."""
    shape: np.ndarray
    """(B, 5) int 0-9."""
    texture: np.ndarray
    """(B, 5) int 0-9."""
    rotation: np.ndarray
    """(B, 5) int, index of one of the atlas orientations."""
    position: np.ndarray
    """(B, 5, 2) ground coordinates of the objects' base centres."""
    placed: np.ndarray
    """(B,) False where no non-overlapping, in-frame placement was found in this attempt."""


def ground_region_corners() -> np.ndarray:
    """(4, 2) corners of the ground rectangle positions are drawn from."""
    return np.array(
        [a * LATERAL_HALF_EXTENT * _ACROSS + b * DEPTH_HALF_EXTENT * _ALONG for a in (-1, 1) for b in (-1, 1)]
    )


def sample_layouts(seed: int, indices: np.ndarray, attempts: np.ndarray, in_frame) -> Layout:
    """Draw layouts; `in_frame(shape (N,), xy (N, 2)) -> bool (N,)` says if an object fits the image."""
    batch = len(indices)
    u = uniforms(seed, "objects", indices, np.zeros_like(attempts), 1 + 3 * VALUES_PER_DIMENSION + MAX_OBJECTS)
    count = np.where(u[:, 0] < 0.5, MIN_OBJECTS, MAX_OBJECTS)
    present = np.arange(MAX_OBJECTS)[None, :] < count[:, None]
    picks = [np.argsort(u[:, 1 + d * 10 : 11 + d * 10], axis=1, kind="stable")[:, :MAX_OBJECTS] for d in range(3)]
    colour, shape, texture = picks
    column = 1 + 3 * VALUES_PER_DIMENSION
    rotation = np.floor(u[:, column : column + MAX_OBJECTS] * ROTATIONS).astype(np.int64)
    draws = uniforms(seed, "positions", indices, attempts, 2 * CANDIDATES).reshape(batch, CANDIDATES, 2) * 2 - 1
    candidates = draws[..., :1] * LATERAL_HALF_EXTENT * _ACROSS + draws[..., 1:] * DEPTH_HALF_EXTENT * _ALONG

    position = np.zeros((batch, MAX_OBJECTS, 2))
    filled = np.zeros(batch, dtype=np.int64)
    radius = _FOOTPRINT[shape]
    rows = np.arange(batch)
    for c in range(CANDIDATES):
        xy = candidates[:, c]
        slot = np.minimum(filled, MAX_OBJECTS - 1)
        r = radius[rows, slot]
        distance = np.linalg.norm(position - xy[:, None, :], axis=-1)
        clear = distance >= r[:, None] + radius + MIN_GAP
        clear |= np.arange(MAX_OBJECTS)[None, :] >= filled[:, None]
        ok = clear.all(axis=1) & (filled < count) & in_frame(shape[rows, slot], xy)
        position[rows[ok], slot[ok]] = xy[ok]
        filled += ok
    return Layout(
        present=present,
        colour=colour,
        shape=shape,
        texture=texture,
        rotation=rotation,
        position=position,
        placed=filled == count,
    )


def layout_to_D(layout: Layout) -> np.ndarray:
    """(B, 5, 3) uint8 rows (colour, 10 + shape, 20 + texture), 255 for unused slots."""
    rows = np.stack([layout.colour, 10 + layout.shape, 20 + layout.texture], -1).astype(np.uint8)
    rows[~layout.present] = 255
    return rows
