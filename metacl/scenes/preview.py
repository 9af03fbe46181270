"""Contact sheets: a grid of scenes captioned with their objects, to check a dataset by eye."""
from __future__ import annotations

import math
import os
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from ..core.atomic import atomic_path
from ..core.errors import ConfigError
from .features import FEATURES, PAD
from .h5 import load_scenes

ZOOM = 2
LINE_HEIGHT = 11
MARGIN = 4


def describe_objects(rows: np.ndarray) -> list[str]:
    """'colour texture shape' for each object row of D (padding rows skipped)."""
    return [f"{FEATURES[c]} {FEATURES[t]} {FEATURES[s]}" for c, s, t in rows if c != PAD]


def contact_sheet(images: np.ndarray, objects: np.ndarray, columns: int | None = None) -> Image.Image:
    """A grid of images (N, H, W, 3), each enlarged and captioned with its objects."""
    count, height, width, _ = images.shape
    columns = columns or math.ceil(math.sqrt(count))
    rows = math.ceil(count / columns)
    cell_w, cell_h = width * ZOOM + MARGIN, height * ZOOM + 5 * LINE_HEIGHT + 2 * MARGIN
    sheet = Image.new("RGB", (columns * cell_w + MARGIN, rows * cell_h + MARGIN), "white")
    draw = ImageDraw.Draw(sheet)
    font = ImageFont.load_default()
    for i in range(count):
        x, y = MARGIN + (i % columns) * cell_w, MARGIN + (i // columns) * cell_h
        tile = Image.fromarray(images[i]).resize((width * ZOOM, height * ZOOM), Image.NEAREST)
        sheet.paste(tile, (x, y))
        for line, text in enumerate(describe_objects(objects[i])):
            draw.text((x, y + height * ZOOM + 2 + line * LINE_HEIGHT), text, fill="black", font=font)
    return sheet


def write_preview(scenes_path: str | os.PathLike, out_path: str | os.PathLike, count: int = 16) -> Path:
    """Write a PNG contact sheet of the first `count` scenes of a file."""
    if count < 1:
        raise ConfigError(f"--n must be at least 1, got {count}")
    scenes = load_scenes(scenes_path, limit=count)
    sheet = contact_sheet(scenes.X, scenes.D)
    out_path = Path(out_path)
    with atomic_path(out_path) as tmp:
        sheet.save(tmp, format="PNG")
    return out_path
