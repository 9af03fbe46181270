"""Checkpoint files: written atomically, loaded with `weights_only=True` so loading runs no code."""
from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from .atomic import atomic_path
from .errors import DataError


def save_checkpoint(state: dict[str, Any], path: str | Path) -> Path:
    path = Path(path)
    with atomic_path(path) as tmp:
        torch.save(state, tmp)
    return path


def load_checkpoint(path: str | Path, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    path = Path(path)
    if not path.is_file():
        raise DataError(f"checkpoint not found: {path}")
    try:
        return torch.load(path, map_location=map_location, weights_only=True)
    except Exception as error:  # torch raises several types for corrupt or unsafe files
        raise DataError(f"cannot load checkpoint {path}: {error}") from None
