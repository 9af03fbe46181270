"""A generic class-per-folder image dataset, e.g. Mini-ImageNet as `root/<split>/<class>/*.jpg`.

Splits are the sub-folders of `root`, classes the sub-folders of a split (sorted by name), and
images the files inside (sorted by name), decoded as RGB and resized with Lanczos to `size`.
Every class must contribute the same number of images to the dense (classes, K, ...) tensor, so
classes with more images keep only the first K (by file name) and a warning says so.
The cache lives under metacl's data directory (or `cache_dir`), never inside the dataset folder.
"""

from __future__ import annotations

import hashlib
import logging
import os
import time
from pathlib import Path

import numpy as np
import torch

from ...core.errors import ConfigError, DataError
from ...core.paths import data_dir
from .cache import CACHE_VERSION, choose_cache_dir, load_cache, save_cache, short_hash
from .decode import ImageFiles, decode_images

log = logging.getLogger(__name__)

IMAGE_SUFFIXES = frozenset({".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff"})


def folder_splits(root: Path) -> list[str]:
    return [p.name for p in subdirs(root)] if root.is_dir() else []


def list_images(split_dir: Path) -> tuple[list[str], list[list[Path]]]:
    classes = subdirs(split_dir)
    files = [sorted((p for p in c.iterdir() if _is_image(p)), key=lambda p: p.name) for c in classes]
    kept = [(c.name, f) for c, f in zip(classes, files) if f]
    if not kept:
        suffixes = ", ".join(sorted(IMAGE_SUFFIXES))
        raise DataError(f"no class folders with images ({suffixes}) in {split_dir}")
    return [name for name, _ in kept], [f for _, f in kept]


def load_folder(
    root: Path,
    split: str,
    size: int,
    *,
    cache_dir: str | os.PathLike | None = None,
    workers: int | None = None,
    quiet: bool = False,
) -> tuple[torch.Tensor, list[str]]:
    """uint8 images (classes, K, 3, size, size) and class names, from the cache when valid."""
    if not root.is_dir():
        raise ConfigError(
            f"folder dataset: data_dir {str(root)!r} is not a folder; it must hold one "
            "sub-folder per split (e.g. train/, val/, test/), each with one per class"
        )
    splits = folder_splits(root)
    if split not in splits:
        raise ConfigError(
            f"folder dataset {root}: unknown split {split!r}; valid splits: "
            f"{', '.join(splits) or '(none: the folder has no sub-folders)'}"
        )
    names, files = list_images(root / split)
    per_class = min(len(f) for f in files)
    if any(len(f) != per_class for f in files):
        counts = sorted({len(f) for f in files})
        log.warning(
            "folder dataset %s/%s: classes have %s images; keeping the first %d of each", root, split, counts, per_class
        )
    chosen = [p for f in files for p in f[:per_class]]
    listing = hashlib.sha256()
    for path in chosen:
        stat = path.stat()
        listing.update(f"{path.relative_to(root)}|{stat.st_size}|{stat.st_mtime_ns}".encode())
    key = {
        "version": CACHE_VERSION,
        "dataset": "folder",
        "split": split,
        "size": size,
        "mode": "RGB",
        "source": listing.hexdigest(),
    }
    resolved = root.resolve()
    directory = choose_cache_dir(data_dir() / "folder-cache", "folder-cache", cache_dir)
    path = directory / f"{resolved.name}-{short_hash(resolved)}-{split}-{size}.pt" if directory else None
    start = time.perf_counter()
    cached = load_cache(path, key) if path is not None else None
    if cached is not None:
        log.info("%s/%s %dpx loaded from cache %s in %.2fs", root, split, size, path, time.perf_counter() - start)
        return cached
    pixels = decode_images(
        ImageFiles(tuple(str(p) for p in chosen)),
        size,
        "RGB",
        workers=workers,
        quiet=quiet,
        desc=f"{resolved.name}/{split} {size}px",
    )
    images = torch.from_numpy(np.ascontiguousarray(pixels)).reshape(len(names), per_class, 3, size, size)
    log.info(
        "%s/%s preprocessed in %.1fs (%d classes x %d images)",
        root,
        split,
        time.perf_counter() - start,
        len(names),
        per_class,
    )
    if path is not None:
        save_cache(path, key, images, names)
    return images, names


def subdirs(path: Path) -> list[Path]:
    """Visible sub-folders of `path`, sorted by name (not file-system order)."""
    return sorted((p for p in path.iterdir() if p.is_dir() and not p.name.startswith(".")), key=lambda p: p.name)


def _is_image(path: Path) -> bool:
    return path.suffix.lower() in IMAGE_SUFFIXES and not path.name.startswith(".")
