"""Procedural surface patterns of the 10 textures, evaluated on object-space surface points.

A texture turns each surface point into a `Material`: how much of the object's colour it shows
(`tint`), how much neutral white paint (`paint`), and its specular behaviour. The patterns are
box-mapped (the plane facing the dominant normal axis) at a scale of a few repeats per object, so
they stay visible at 160x120. Only luminance is patterned, never hue, so the colour of an object
stays unambiguous.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .features import TEXTURES


@dataclass
class Material:
    tint: torch.Tensor
    """Weight of the object's colour in the diffuse albedo, per point."""
    paint: torch.Tensor
    """Grey albedo added on top (white dots, grout, veins), per point."""
    specular: torch.Tensor
    """Strength of the specular highlight, per point."""
    shininess: float
    """Blinn-Phong exponent."""
    metallic: bool = False
    """Metal: the highlight and an environment reflection take the object's colour."""


def _hash(ix: torch.Tensor, iy: torch.Tensor, iz: torch.Tensor | None = None, salt: int = 0) -> torch.Tensor:
    """Deterministic pseudo-random float in [0, 1) per integer lattice cell."""
    h = ix.long() * 73856093 ^ iy.long() * 19349663 ^ (0 if iz is None else iz.long() * 83492791) ^ salt
    h = (h * 2654435761 + 12345) & 0x7FFFFFFF
    h = (h ^ (h >> 13)) * 1274126177 & 0x7FFFFFFF
    return (h & 0xFFFF).to(torch.float32) / 65536.0


def _value_noise(p: torch.Tensor, salt: int = 0) -> torch.Tensor:
    """Smooth 3-D value noise in [0, 1]."""
    base = torch.floor(p)
    f = p - base
    f = f * f * (3 - 2 * f)
    i = base.long()
    out = 0.0
    for dx in (0, 1):
        for dy in (0, 1):
            for dz in (0, 1):
                w = (
                    (f[:, 0] if dx else 1 - f[:, 0])
                    * (f[:, 1] if dy else 1 - f[:, 1])
                    * (f[:, 2] if dz else 1 - f[:, 2])
                )
                out = out + w * _hash(i[:, 0] + dx, i[:, 1] + dy, i[:, 2] + dz, salt)
    return out


def _fbm(p: torch.Tensor, octaves: int = 3) -> torch.Tensor:
    return sum(_value_noise(p * 2**o, salt=o) * 0.5**o for o in range(octaves)) / (2 - 0.5 ** (octaves - 1))


def box_uv(p: torch.Tensor, n: torch.Tensor) -> torch.Tensor:
    """2-D pattern coordinates from the plane facing the normal's dominant axis."""
    axis = n.abs().argmax(dim=-1)
    u = torch.where(axis == 0, p[:, 1], p[:, 0])
    v = torch.where(axis == 2, p[:, 1], p[:, 2])
    return torch.stack([u, v], -1)


def _smooth_step(edge0: float, edge1: float, x: torch.Tensor) -> torch.Tensor:
    t = ((x - edge0) / (edge1 - edge0)).clamp(0, 1)
    return t * t * (3 - 2 * t)


def _ones(p):
    return torch.ones(p.shape[0], dtype=p.dtype, device=p.device)


def _polka(p, n):
    uv = box_uv(p, n) / 0.62
    row = torch.floor(uv[:, 1])
    uv = torch.stack([uv[:, 0] + 0.5 * (row % 2), uv[:, 1]], -1)
    d = (uv - torch.floor(uv) - 0.5).norm(dim=-1)
    dot = 1 - _smooth_step(0.27, 0.33, d)
    return Material(tint=1 - dot, paint=0.95 * dot, specular=0.15 * _ones(p), shininess=20)


def _tiles(p, n):
    uv = box_uv(p, n) / 0.7
    cell = torch.floor(uv)
    f = uv - cell
    edge = torch.minimum(torch.minimum(f[:, 0], 1 - f[:, 0]), torch.minimum(f[:, 1], 1 - f[:, 1]))
    grout = 1 - _smooth_step(0.06, 0.1, edge)
    shade = 0.7 + 0.3 * _hash(cell[:, 0], cell[:, 1], salt=7)
    return Material(tint=(1 - grout) * shade, paint=0.18 * grout, specular=0.6 * (1 - grout), shininess=60)


def _maze(p, n):
    uv = box_uv(p, n) / 0.42
    cell = torch.floor(uv)
    f = uv - cell
    pick = _hash(cell[:, 0], cell[:, 1], salt=3) < 0.5
    along = torch.where(pick, f[:, 0], f[:, 1])
    wall = 1 - _smooth_step(0.18, 0.28, along)
    return Material(tint=1 - 0.92 * wall, paint=0 * wall, specular=0.1 * _ones(p), shininess=20)


def _chain_mail(p, n):
    uv = box_uv(p, n) / 0.4
    row = torch.floor(uv[:, 1])
    uv = torch.stack([uv[:, 0] + 0.5 * (row % 2), uv[:, 1]], -1)
    d = (uv - torch.floor(uv) - 0.5).norm(dim=-1)
    ring = 1 - _smooth_step(0.08, 0.16, (d - 0.38).abs())
    return Material(tint=0.12 + 0.95 * ring, paint=0.1 * ring, specular=1.2 * ring, shininess=30, metallic=True)


def _marble(p, n):
    turbulence = _fbm(p * 1.6 + 11.0)
    vein = (torch.sin((p[:, 0] * 1.7 + p[:, 1] * 1.1 + p[:, 2] * 0.8 + 5.0 * turbulence) * 3.2)).abs()
    white = 1 - _smooth_step(0.0, 0.35, vein)
    return Material(
        tint=(1 - 0.9 * white) * (0.85 + 0.15 * turbulence), paint=0.9 * white, specular=0.5 * _ones(p), shininess=80
    )


def _wood_plank(p, n):
    uv = box_uv(p, n)
    across = uv[:, 1] / 0.6
    plank = torch.floor(across)
    seam = 1 - _smooth_step(0.0, 0.1, torch.minimum(across - plank, plank + 1 - across))
    grain = 0.5 + 0.5 * torch.sin(
        uv[:, 0] * 9.0 + 4.0 * _fbm(p * torch.tensor([0.5, 3.0, 3.0], dtype=p.dtype, device=p.device) + plank[:, None])
    )
    shade = (0.7 + 0.3 * _hash(plank, plank * 0, salt=5)) * (0.45 + 0.55 * grain)
    return Material(tint=shade * (1 - 0.85 * seam), paint=0 * seam, specular=0.12 * _ones(p), shininess=25)


def _rug(p, n):
    uv = box_uv(p, n)
    zig = (uv[:, 0] / 0.5 - torch.floor(uv[:, 0] / 0.5) - 0.5).abs() * 0.5
    band = torch.floor((uv[:, 1] + zig) / 0.3) % 2
    fuzz = _value_noise(p * 14.0, salt=9)
    return Material(
        tint=(0.3 + 0.7 * band) * (0.65 + 0.35 * fuzz), paint=0.3 * (1 - band) * fuzz, specular=0 * fuzz, shininess=1
    )


def _metal(p, n):
    return Material(tint=0.35 * _ones(p), paint=0 * _ones(p), specular=1.6 * _ones(p), shininess=45, metallic=True)


def _metal_weave(p, n):
    uv = box_uv(p, n) / 0.6
    cell = torch.floor(uv)
    f = uv - cell
    horizontal = ((cell[:, 0] + cell[:, 1]) % 2) == 0
    across = torch.where(horizontal, f[:, 1], f[:, 0])
    ridge = torch.sin(across * torch.pi)
    return Material(tint=0.15 + 0.75 * ridge, paint=0 * ridge, specular=1.0 * ridge**2, shininess=25, metallic=True)


def _rubber(p, n):
    return Material(tint=_ones(p), paint=0 * _ones(p), specular=0.02 * _ones(p), shininess=4)


PATTERNS = {
    "chain_mail": _chain_mail,
    "marble": _marble,
    "maze": _maze,
    "metal": _metal,
    "metal_weave": _metal_weave,
    "polka": _polka,
    "rubber": _rubber,
    "rug": _rug,
    "tiles": _tiles,
    "wood_plank": _wood_plank,
}
assert tuple(PATTERNS) == TEXTURES
