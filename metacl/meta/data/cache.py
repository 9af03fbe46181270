"""Preprocessed datasets cached as one uint8 tensor file, tagged with what produced it.

The file holds a `key` (format version, dataset, split, size, and a fingerprint of the source
files); a cache whose key differs from the one asked for, or that cannot be read, is rebuilt.
Files are written atomically, so an interrupted preprocessing never leaves a usable-looking cache,
with the usual permissions of a new file (0666 minus the umask; see core/atomic.py).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from pathlib import Path
from typing import Any

import torch

from ...core.atomic import atomic_path
from ...core.paths import data_dir as default_data_dir

log = logging.getLogger(__name__)

CACHE_VERSION = 1


def short_hash(*parts: object) -> str:
    return hashlib.sha256(json.dumps([str(p) for p in parts]).encode()).hexdigest()[:10]


def writable_dir(path: Path) -> bool:
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError:
        return False
    return os.access(path, os.W_OK | os.X_OK)


def choose_cache_dir(preferred: Path, fallback_name: str, explicit: str | os.PathLike | None) -> Path | None:
    """`explicit` if given; else `preferred` when writable; else a folder under metacl's data dir.

    None means nowhere is writable: the data is then preprocessed in memory on every load.
    """
    if explicit is not None:
        return Path(explicit).expanduser()
    for candidate in (preferred, default_data_dir() / fallback_name):
        if writable_dir(candidate):
            return candidate
    return None


def load_cache(path: Path, key: dict[str, Any]) -> tuple[torch.Tensor, list[str]] | None:
    """(uint8 images, class names) from `path`, or None if it is missing, unreadable or stale."""
    if not path.is_file():
        return None
    try:
        content = torch.load(path, map_location="cpu", weights_only=True)
        if content["key"] != key:
            log.info("cache %s was made from other data or settings; rebuilding it", path)
            return None
        images, names = content["images"], list(content["class_names"])
    except Exception as error:  # torch raises several types for corrupt files
        log.warning("ignoring unreadable cache %s: %s", path, error)
        return None
    if images.dtype != torch.uint8 or images.dim() != 5 or images.shape[0] != len(names):
        log.warning("ignoring malformed cache %s", path)
        return None
    return images, names


def save_cache(path: Path, key: dict[str, Any], images: torch.Tensor, class_names: list[str]) -> None:
    try:
        with atomic_path(path) as tmp:
            torch.save({"key": key, "images": images, "class_names": list(class_names)}, tmp)
    except OSError as error:
        log.warning("could not write cache %s (%s); the data will be preprocessed again next time", path, error)
