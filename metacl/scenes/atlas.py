"""Ray-cast every (shape, rotation, texture) once into a sprite atlas, and every shape's shadow.

The camera is fixed and far from the objects (about 10 units away, objects 2-3 units wide), so an
object looks the same wherever it stands, up to a perspective scale. Rendering each combination
once, by sphere tracing its signed distance function with supersampling, and then compositing
sprites per image (see `render.py`) makes a 50k-image dataset cost seconds of ray casting instead
of hours.

Sprites hold three premultiplied channels: alpha, the diffuse weight of the object's colour, and
the untinted (white) light, so one sprite serves all 10 colours: rgb = colour * tint + white.
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .camera import Camera, light_directions
from .features import SHAPES, TEXTURES
from .shapes import BOUNDING_HEIGHT, BOUNDING_RADIUS, SDFS
from .textures import PATTERNS

ROTATIONS = 12
"""Object orientations about the vertical axis, evenly spaced over a full turn."""
SUPERSAMPLE = 2
"""Rays per sprite pixel along each axis (anti-aliasing of edges and patterns)."""
TRACE_STEPS = 72
SHADOW_STEPS = 40
SHADOW_MAP_SIZE = 96
AMBIENT, KEY, FILL, BACK = 0.32, 0.78, 0.32, 0.3
GROUND_ALBEDO = 0.5
DTYPE = torch.float32


@dataclass
class Atlas:
    """Everything per-image compositing needs, for one image size, on one device."""

    sprites: torch.Tensor
    """(shapes, rotations, textures, 3, Sh, Sw): premultiplied alpha, colour weight, white light."""
    anchor: tuple[float, float]
    """Sprite pixel (x, y) where the object's base centre (world origin) falls."""
    shadows: torch.Tensor
    """(shapes, rotations, 1, G, G) ground darkening in [0, 1] from shadow and contact occlusion."""
    shadow_origin: tuple[float, float]
    """World (x, y) of the shadow map's corner (-1, -1) when the object stands at the origin."""
    shadow_extent: float
    """Side of the square shadow map in world units."""
    ground: torch.Tensor
    """(3, H, W) the empty, lit floor."""
    ground_xy: torch.Tensor
    """(H, W, 2) world ground coordinates of each pixel centre."""


def _rotate_z(points: torch.Tensor, angles: torch.Tensor) -> torch.Tensor:
    """Rotate (N, 3) points by -angle (N,) about z: world -> object coordinates."""
    c, s = torch.cos(angles), torch.sin(angles)
    x, y = points[:, 0], points[:, 1]
    return torch.stack([c * x + s * y, -s * x + c * y, points[:, 2]], -1)


def _sdf_world(shape: str, points: torch.Tensor, angles: torch.Tensor) -> torch.Tensor:
    return SDFS[shape](_rotate_z(points, angles))


def _bounds(origins: torch.Tensor, direction: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Entry and exit distances of rays through the cylinder bounding every shape (exit < entry: miss)."""
    dx, dy, dz = (float(v) for v in direction)
    a = dx * dx + dy * dy
    b = 2 * (origins[:, 0] * dx + origins[:, 1] * dy)
    c = origins[:, 0] ** 2 + origins[:, 1] ** 2 - BOUNDING_RADIUS**2
    root = (b * b - 4 * a * c).clamp(min=0).sqrt()
    near, far = (-b - root) / (2 * a), (-b + root) / (2 * a)
    far = torch.where(b * b - 4 * a * c < 0, near - 1, far)
    if abs(dz) > 1e-9:
        z0, z1 = (0 - origins[:, 2]) / dz, (BOUNDING_HEIGHT - origins[:, 2]) / dz
        near, far = torch.maximum(near, torch.minimum(z0, z1)), torch.minimum(far, torch.maximum(z0, z1))
    return near.clamp(min=0), far


def _trace(shape, origins, direction, angles, t_max, steps):
    """Sphere-trace rays (N, 3) along one direction; returns hit mask and distance.

    Rays start where they enter the bounding cylinder, rays missing it never march, and rays
    that have converged or left drop out every few steps, so the cost follows the rays still
    marching rather than all rays.
    """
    near, far = _bounds(origins, direction)
    t = torch.where(far > near, near, torch.full_like(near, t_max))
    index = torch.nonzero(far > near).squeeze(1)
    o, a, tt = origins[index], angles[index], t[index]
    for step in range(steps):
        d = _sdf_world(shape, o + tt[:, None] * direction, a)
        tt = torch.clamp(tt + d, max=t_max)
        if step % 6 == 5:
            t[index] = tt
            keep = (d > 1e-4) & (tt < t_max)
            index, o, a, tt = index[keep], o[keep], a[keep], tt[keep]
    t[index] = tt
    d = _sdf_world(shape, origins + t[:, None] * direction, angles)
    return (d < 2e-3) & (t < t_max), t


def _normals(shape, points, angles, eps=1e-3):
    offsets = torch.eye(3, dtype=points.dtype) * eps
    grad = torch.stack(
        [_sdf_world(shape, points + o, angles) - _sdf_world(shape, points - o, angles) for o in offsets], -1
    )
    return grad / grad.norm(dim=-1, keepdim=True).clamp(min=1e-12)


def _soft_shadow(shape, points, light, angles, steps, k=10.0):
    """Fraction of the key light reaching each point (1 lit, 0 fully shadowed), with penumbra."""
    lit = torch.ones(points.shape[0], dtype=points.dtype)
    near, far = _bounds(points, light)
    index = torch.nonzero(far > 0.03).squeeze(1)
    p, a = points[index], angles[index]
    t = torch.full_like(index, 0.03, dtype=points.dtype)
    shade = lit[index]
    for step in range(steps):
        d = _sdf_world(shape, p + t[:, None] * light, a)
        shade = torch.minimum(shade, (k * d / t).clamp(0, 1))
        t = t + d.clamp(0.02, 0.5)
        if step % 6 == 5:
            lit[index] = shade
            keep = (shade > 0) & (t < far[index])
            index, p, a, t, shade = index[keep], p[keep], a[keep], t[keep], shade[keep]
    lit[index] = shade
    return lit


def _shade(shape, points, normals, angles, view):
    """(textures, 2, N) colour weight and white light of surface points under every texture."""
    key, fill, back = light_directions(points.dtype)
    key_lit = _soft_shadow(shape, points + 0.01 * normals, key, angles, SHADOW_STEPS)
    diffuse = (
        AMBIENT
        + KEY * (normals @ key).clamp(min=0) * key_lit
        + FILL * (normals @ fill).clamp(min=0)
        + BACK * (normals @ back).clamp(min=0)
    )
    to_eye = -view
    obj_points, obj_normals = _rotate_z(points, angles), _rotate_z(normals, angles)
    reflected = view - 2 * (normals @ view)[:, None] * normals
    environment = (0.2 + 0.8 * (0.5 + 0.5 * reflected[:, 2])).clamp(0, 1) ** 2
    out = []
    for texture in TEXTURES:
        m = PATTERNS[texture](obj_points, obj_normals)
        highlight = 0
        for light, strength, shadow in ((key, 1.0, key_lit), (fill, 0.35, 1.0)):
            half = light + to_eye
            half = half / half.norm()
            highlight = highlight + strength * shadow * (normals @ half).clamp(min=0) ** m.shininess
        if m.metallic:
            colour = m.tint * diffuse + m.specular * (0.55 * highlight + 0.45 * environment)
            white = 0.45 * m.specular * highlight
        else:
            colour = m.tint * diffuse
            white = m.paint * diffuse + m.specular * highlight
        out.append(torch.stack([colour, white]))
    return torch.stack(out)


def _angles(rays: int) -> torch.Tensor:
    """Per-ray orientation for `rays` rays repeated once per rotation, rotation-major."""
    turn = torch.arange(ROTATIONS, dtype=DTYPE) * (2 * math.pi / ROTATIONS)
    return turn.repeat_interleave(rays)


def _sprite_frame(camera: Camera) -> tuple[int, int, float, float]:
    """Sprite size (Sh, Sw) in pixels and the anchor, from the projected bounding cylinder."""
    right, up, _ = camera.basis
    angle = torch.linspace(0, 2 * math.pi, 64, dtype=torch.float64)
    ring = torch.stack(
        [BOUNDING_RADIUS * torch.cos(angle), BOUNDING_RADIUS * torch.sin(angle), torch.zeros_like(angle)], -1
    )
    corners = torch.cat([ring, ring + torch.tensor([0, 0, BOUNDING_HEIGHT], dtype=torch.float64)])
    pixel = camera.anchor_distance / camera.focal_px
    x, y = corners @ right / pixel, -(corners @ up) / pixel
    left, top = math.floor(float(x.min())) - 2, math.floor(float(y.min())) - 2
    width, height = math.ceil(float(x.max())) + 2 - left, math.ceil(float(y.max())) + 2 - top
    return height, width, -left, -top


def _render_sprites(camera: Camera) -> tuple[torch.Tensor, tuple[float, float]]:
    height, width, anchor_x, anchor_y = _sprite_frame(camera)
    right, up, forward = camera.basis
    pixel = camera.anchor_distance / camera.focal_px / SUPERSAMPLE
    ys, xs = torch.meshgrid(
        torch.arange(height * SUPERSAMPLE, dtype=torch.float64) + 0.5,
        torch.arange(width * SUPERSAMPLE, dtype=torch.float64) + 0.5,
        indexing="ij",
    )
    plane = (
        (xs - anchor_x * SUPERSAMPLE)[..., None] * pixel * right - (ys - anchor_y * SUPERSAMPLE)[..., None] * pixel * up
    ).reshape(-1, 3)
    back_off = 2 * (BOUNDING_RADIUS + BOUNDING_HEIGHT)
    forward = forward.to(DTYPE)
    origins = (plane - back_off * forward).to(DTYPE)
    rays = origins.shape[0]
    angles = _angles(rays)
    origins = origins.repeat(ROTATIONS, 1)
    per_shape = []
    for shape in SHAPES:
        hit, t = _trace(shape, origins, forward, angles, 2 * back_off, TRACE_STEPS)
        channels = torch.zeros(len(TEXTURES), 3, ROTATIONS * rays, dtype=origins.dtype)
        channels[:, 0] = hit.to(origins.dtype)
        points = origins[hit] + t[hit][:, None] * forward
        normals = _normals(shape, points, angles[hit])
        channels[:, 1:, hit] = _shade(shape, points, normals, angles[hit], forward)
        per_shape.append(channels.reshape(len(TEXTURES), 3, ROTATIONS, rays).permute(2, 0, 1, 3))
    full = torch.stack(per_shape)  # (S, R, T, 3, M)
    full = full.reshape(-1, 1, height * SUPERSAMPLE, width * SUPERSAMPLE)
    pooled = F.avg_pool2d(full, SUPERSAMPLE)
    sprites = pooled.reshape(len(SHAPES), ROTATIONS, len(TEXTURES), 3, height, width)
    return sprites.float(), (float(anchor_x), float(anchor_y))


def _shadow_frame() -> tuple[tuple[float, float], float]:
    key, _, _ = light_directions()
    away = -key[:2] / key[:2].norm()
    reach = BOUNDING_HEIGHT * float(key[:2].norm() / key[2])
    centre = away * reach / 2
    extent = 2 * BOUNDING_RADIUS + reach + 0.6
    return (float(centre[0]) - extent / 2, float(centre[1]) - extent / 2), extent


def _render_shadows() -> torch.Tensor:
    (x0, y0), extent = _shadow_frame()
    key, _, _ = light_directions()
    cells = (torch.arange(SHADOW_MAP_SIZE, dtype=torch.float64) + 0.5) / SHADOW_MAP_SIZE * extent
    ys, xs = torch.meshgrid(y0 + cells, x0 + cells, indexing="ij")
    ground = torch.stack([xs, ys, torch.full_like(xs, 0.01)], -1).reshape(-1, 3).to(DTYPE)
    key = key.to(DTYPE)
    angles = _angles(ground.shape[0])
    ground = ground.repeat(ROTATIONS, 1)
    maps = []
    for shape in SHAPES:
        lit = _soft_shadow(shape, ground, key, angles, SHADOW_STEPS, k=6.0)
        contact = (1 - _sdf_world(shape, ground, angles) / 0.45).clamp(0, 1) ** 2
        maps.append(torch.maximum(0.62 * (1 - lit), 0.45 * contact))
    return torch.stack(maps).reshape(len(SHAPES), ROTATIONS, 1, SHADOW_MAP_SIZE, SHADOW_MAP_SIZE).float()


def _render_ground(camera: Camera) -> tuple[torch.Tensor, torch.Tensor]:
    key, fill, back = light_directions()
    light = AMBIENT + KEY * key[2] + FILL * fill[2] + BACK * back[2]
    xy = camera.ground_points()
    falloff = 0.82 + 0.18 * torch.exp(-(xy - torch.tensor([-1.0, 1.0], dtype=xy.dtype)).pow(2).sum(-1) / 40)
    grey = (GROUND_ALBEDO * light * falloff).clamp(0, 1)
    tone = torch.tensor([1.0, 1.0, 0.96], dtype=grey.dtype)
    return (grey[None] * tone[:, None, None]).float(), xy.float()


@contextlib.contextmanager
def _single_thread():
    """Ray casting runs many small ops: one thread is as fast, immune to oversubscription on a busy
    machine, and makes the atlas bit-identical whatever the caller's thread count."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def build_atlas(height: int, width: int, device: torch.device | str = "cpu") -> Atlas:
    """Ray-cast all sprites and shadow maps for images of `height` x `width` (a few seconds)."""
    camera = Camera(height, width)
    with torch.no_grad(), _single_thread():
        sprites, anchor = _render_sprites(camera)
        shadows = _render_shadows()
        ground, ground_xy = _render_ground(camera)
    origin, extent = _shadow_frame()
    return Atlas(
        sprites=sprites.to(device),
        anchor=anchor,
        shadows=shadows.to(device),
        shadow_origin=origin,
        shadow_extent=extent,
        ground=ground.to(device),
        ground_xy=ground_xy.to(device),
    )
