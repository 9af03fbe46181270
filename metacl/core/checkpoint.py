"""Checkpoint files: written atomically, loaded with `weights_only=True` so loading runs no code."""

from __future__ import annotations

import os
import pickle
import warnings
from pathlib import Path
from typing import Any

import torch

from .atomic import atomic_path
from .errors import DataError


def save_checkpoint(state: dict[str, Any], path: str | Path, previous: Path | None = None) -> Path:
    """Write `state` atomically; with `previous`, the file it replaces is kept there."""
    path = Path(path)
    with atomic_path(path) as tmp:
        torch.save(state, tmp)
        if previous is not None and path.exists():
            os.replace(path, previous)
    return path


def load_checkpoint(path: str | Path, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    path = Path(path)
    if not path.is_file():
        raise DataError(f"checkpoint not found: {path}")
    try:
        with warnings.catch_warnings():  # torch's notes on foreign pickles: the error below says it
            warnings.simplefilter("ignore")
            state = torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError:  # objects outside a plain state (not written by metacl)
        raise DataError(
            f"{path} is not a metacl checkpoint: it holds Python objects that metacl never writes, so it is not loaded"
        ) from None
    except Exception as error:  # torch raises several types for truncated or corrupt files
        reason = str(error).splitlines()[0] if str(error) else type(error).__name__
        raise DataError(f"cannot read checkpoint {path} (truncated or not a checkpoint: {reason})") from None
    if not isinstance(state, dict):
        raise DataError(f"{path} is not a metacl checkpoint (it holds a {type(state).__name__}, not a state dict)")
    return state
