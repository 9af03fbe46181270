"""Signed distance functions of the 10 shapes, each resting on the ground (z = 0) at the origin.

All shapes share one size: they fit a footprint of about 2 * SIZE and are scaled so their
silhouettes have similar areas. Distances may be lower bounds (polyhedra), which is all sphere
tracing needs.
"""

from __future__ import annotations

import math

import torch

from .features import SHAPES

SIZE = 1.15
"""Half-extent of an object in world units; the camera sees about 10 units across at the origin."""


def _box(p: torch.Tensor, half: tuple[float, float, float]) -> torch.Tensor:
    q = p.abs() - p.new_tensor(half)
    return q.clamp(min=0).norm(dim=-1) + q.max(dim=-1).values.clamp(max=0)


def _planes(p: torch.Tensor, normals: torch.Tensor, offset: float) -> torch.Tensor:
    return (p @ normals.T).max(dim=-1).values - offset


def _lift(p: torch.Tensor, z: float) -> torch.Tensor:
    return p - p.new_tensor([0.0, 0.0, z])


def _sphere(p):
    r = 1.02 * SIZE
    return _lift(p, r).norm(dim=-1) - r


def _cube(p):
    a = 0.75 * SIZE
    return _box(_lift(p, a), (a, a, a))


def _rectangle(p):
    h = 0.54 * SIZE
    return _box(_lift(p, h), (1.2 * SIZE, h, h))


def _cylinder(p):
    r, h = 0.85 * SIZE, 0.8 * SIZE
    q = _lift(p, h)
    d = torch.stack([q[..., :2].norm(dim=-1) - r, q[..., 2].abs() - h], -1)
    return d.clamp(min=0).norm(dim=-1) + d.max(dim=-1).values.clamp(max=0)


def _cone(p):
    r, h = 1.1 * SIZE, 2.3 * SIZE
    slope = math.hypot(r, h)
    radial = p[..., :2].norm(dim=-1)
    side = (radial * h + p[..., 2] * r - r * h) / slope
    return torch.maximum(side, -p[..., 2])


def _pyramid(p):
    a, h = 1.0 * SIZE, 1.9 * SIZE
    slope = math.hypot(a, h)
    side = (torch.maximum(p[..., 0].abs(), p[..., 1].abs()) * h + p[..., 2] * a - a * h) / slope
    return torch.maximum(side, -p[..., 2])


def _ellipsoid(p):
    radii = p.new_tensor([0.84, 0.84, 1.42]) * SIZE
    q = _lift(p, float(radii[2])) / radii
    k = q.norm(dim=-1)
    return (k - 1) * radii.min()


def _octahedron(p):
    r = 1.4 * SIZE
    return (_lift(p, r).abs().sum(dim=-1) - r) / math.sqrt(3)


_PHI = (1 + math.sqrt(5)) / 2
_DODECA_NORMALS = torch.tensor(
    [[0, s1, s2 * _PHI] for s1 in (1, -1) for s2 in (1, -1)]
    + [[s1, s2 * _PHI, 0] for s1 in (1, -1) for s2 in (1, -1)]
    + [[s2 * _PHI, 0, s1] for s1 in (1, -1) for s2 in (1, -1)],
    dtype=torch.float64,
)
_DODECA_NORMALS = _DODECA_NORMALS / _DODECA_NORMALS.norm(dim=-1, keepdim=True)
_DODECA_INRADIUS = 0.9 * SIZE


def _face_up_rotation() -> torch.Tensor:
    """Rotation about x taking the face normal (0, 1, phi) onto +z, so the solid rests on a face."""
    n = _DODECA_NORMALS[0]
    angle = math.atan2(float(n[1]), float(n[2]))
    c, s = math.cos(angle), math.sin(angle)
    return torch.tensor([[1, 0, 0], [0, c, -s], [0, s, c]], dtype=torch.float64)


_DODECA_TO_WORLD = _face_up_rotation()


def _dodecahedron(p):
    q = _lift(p, _DODECA_INRADIUS) @ _DODECA_TO_WORLD.to(p)
    return _planes(q, _DODECA_NORMALS.to(p), _DODECA_INRADIUS)


def _torus(p):
    major, minor = 0.76 * SIZE, 0.42 * SIZE
    q = _lift(p, minor)
    ring = q[..., :2].norm(dim=-1) - major
    return torch.stack([ring, q[..., 2]], -1).norm(dim=-1) - minor


SDFS = {
    "cone": _cone,
    "cube": _cube,
    "cylinder": _cylinder,
    "dodecahedron": _dodecahedron,
    "ellipsoid": _ellipsoid,
    "octahedron": _octahedron,
    "pyramid": _pyramid,
    "rectangle": _rectangle,
    "sphere": _sphere,
    "torus": _torus,
}
assert tuple(SDFS) == SHAPES

FOOTPRINT_RADIUS = {
    name: radius * SIZE
    for name, radius in {
        "cone": 1.1,
        "cube": 1.07,
        "cylinder": 0.85,
        "dodecahedron": 1.14,
        "ellipsoid": 0.84,
        "octahedron": 1.4,
        "pyramid": 1.42,
        "rectangle": 1.32,
        "sphere": 1.02,
        "torus": 1.18,
    }.items()
}
"""Radius of the circle on the ground that holds each shape in every orientation (for gaps)."""
assert tuple(FOOTPRINT_RADIUS) == SHAPES

BOUNDING_RADIUS = 1.45 * SIZE
BOUNDING_HEIGHT = 2.9 * SIZE
"""Every shape lies within this cylinder about the z axis (used to size sprites and shadows)."""
