"""`load_dataset`: one entry point for every meta-learning dataset, returning ClassImages."""

from __future__ import annotations

import os
from pathlib import Path

import torch

from ...core.device import resolve_device
from ...core.errors import ConfigError
from ...core.paths import data_dir as default_data_dir
from . import omniglot
from .class_images import ClassImages
from .folder import load_folder

DATASETS = ("folder", "omniglot")


def load_dataset(
    name: str,
    split: str,
    *,
    size: int = 28,
    data_dir: str | os.PathLike | None = None,
    device: str | torch.device = "cpu",
    first_963: bool = False,
    quiet: bool = False,
    cache_dir: str | os.PathLike | None = None,
    workers: int | None = None,
) -> ClassImages:
    """Load a split as float32 [0, 1] images resident on `device`.

    name "omniglot": split "background" or "evaluation"; `data_dir` holds (or receives) the zips,
    default metacl's data directory (`METACL_DATA_DIR`, else ~/.cache/metacl). Omniglot is
    greyscale (1 channel); `first_963` keeps the first 963 background classes (OML/ANML).
    name "folder": `data_dir` is the dataset root and `split` one of its sub-folders; RGB images.
    `size` is the square side in pixels (28 for ANML, 84 for OML and Mini-ImageNet).
    The first load preprocesses and caches (in `cache_dir` if given); later loads read the cache.
    `workers` processes decode images (default: the CPU count, at most 8).
    """
    if name not in DATASETS:
        raise ConfigError(f"unknown dataset {name!r}; valid datasets: {', '.join(DATASETS)}")
    if isinstance(size, bool) or not isinstance(size, int) or size < 1:
        raise ConfigError(f"size must be a positive number of pixels, got {size!r}")
    target = resolve_device(device)
    if name == "omniglot":
        if split not in omniglot.SPLITS:
            raise ConfigError(f"unknown Omniglot split {split!r}; valid splits: {', '.join(omniglot.SPLITS)}")
        if first_963 and split != "background":
            raise ConfigError("first_963 applies to the Omniglot background split only")
        images, names = omniglot.load_omniglot(
            split, size, default_data_dir(data_dir), cache_dir=cache_dir, workers=workers, quiet=quiet
        )
        if first_963:
            if len(names) < omniglot.FIRST_963:
                raise ConfigError(
                    f"first_963 needs at least {omniglot.FIRST_963} classes, "
                    f"but this Omniglot background set has {len(names)}"
                )
            images, names = images[: omniglot.FIRST_963], names[: omniglot.FIRST_963]
    else:
        if first_963:
            raise ConfigError("first_963 applies to the Omniglot background split only, not to folder datasets")
        if data_dir is None:
            raise ConfigError("the folder dataset needs data_dir: a folder with one sub-folder per split")
        images, names = load_folder(
            Path(data_dir).expanduser(), split, size, cache_dir=cache_dir, workers=workers, quiet=quiet
        )
    # Move as uint8 (4x less to transfer), then scale on the device: x / 255 as ToTensor() does.
    return ClassImages(images.to(target).float().div_(255), names)
