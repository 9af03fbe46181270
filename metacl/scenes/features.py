"""The 30 features of the compositional-scenes dataset, in the reference index order.

Indices are fixed and alphabetical within each dimension: 0-9 colours, 10-19 shapes,
20-29 textures. `D` rows in the HDF5 files hold (colour, 10 + shape, 20 + texture).
"""

from __future__ import annotations

from ..core.errors import DataError

DIMENSIONS = ("colour", "shape", "texture")
VALUES_PER_DIMENSION = 10

COLOURS: dict[str, tuple[int, int, int]] = {
    "blue": (42, 75, 215),
    "brown": (129, 74, 25),
    "cyan": (41, 208, 208),
    "gray": (87, 87, 87),
    "green": (29, 105, 20),
    "orange": (255, 146, 51),
    "pink": (255, 205, 243),
    "purple": (129, 38, 192),
    "red": (173, 35, 35),
    "yellow": (255, 238, 51),
}
SHAPES = (
    "cone",
    "cube",
    "cylinder",
    "dodecahedron",
    "ellipsoid",
    "octahedron",
    "pyramid",
    "rectangle",
    "sphere",
    "torus",
)
TEXTURES = ("chain_mail", "marble", "maze", "metal", "metal_weave", "polka", "rubber", "rug", "tiles", "wood_plank")

FEATURES: tuple[str, ...] = (*COLOURS, *SHAPES, *TEXTURES)
NUM_FEATURES = len(FEATURES)
PAD = 255
"""Fill value of unused object slots in `D`."""


def feature_index(name: str) -> int:
    """Index (0-29) of a feature name such as "cyan", "torus" or "wood_plank"."""
    try:
        return FEATURES.index(name)
    except ValueError:
        raise DataError(f"unknown feature {name!r}; valid features: {', '.join(FEATURES)}") from None


def dimension_of(index: int) -> int:
    """0 for colours, 1 for shapes, 2 for textures."""
    if not 0 <= int(index) < NUM_FEATURES:
        raise DataError(f"feature index {index} out of range 0-{NUM_FEATURES - 1}")
    return int(index) // VALUES_PER_DIMENSION
