"""Omniglot (Lake et al. 2015) from the official zips: find or download, decode, cache.

Where the data is looked for, under the data directory `D` (in this order, for each split):
`D/omniglot/`, `D/omniglot-py/` (torchvision's and higherANML's folder) and `D/` itself, each
holding `images_<split>.zip` or its extracted folder `images_<split>/<Alphabet>/<character>/*.png`.
A zip found there is read in place (no extraction) and neither it nor a folder is ever modified.
Only files this module downloads are md5-checked: local zips are trusted as they are, because
re-packed copies of the same images (like a mirror's) have other checksums.

Preprocessing follows the reference code (higherANML's `datasets/omniglot.py`): each PNG is
converted to greyscale ("L"), resized with Lanczos to `size` x `size`, and scaled to [0, 1]
without inversion, so the paper's convention holds: background 1 (white), strokes near 0.
Classes are sorted by alphabet then character name and drawings by file name, so class indices
do not depend on the file system; `first_963` then keeps the first 963 of the 964 background
classes, the count used by the original OML and ANML code (which took them in `os.walk` order).
"""

from __future__ import annotations

import hashlib
import logging
import os
import time
import zipfile
from collections import defaultdict
from pathlib import Path

import numpy as np
import torch

from ...core.errors import DataError
from .cache import CACHE_VERSION, choose_cache_dir, load_cache, save_cache
from .decode import ImageFiles, decode_images
from .download import download
from .folder import subdirs

log = logging.getLogger(__name__)

SPLITS = ("background", "evaluation")
URL_PREFIX = "https://github.com/brendenlake/omniglot/raw/master/python/"
URL_PREFIX_ENV = "METACL_OMNIGLOT_URL"
"""Environment variable that replaces URL_PREFIX, e.g. with a mirror or a local file:// folder."""
MD5 = {"background": "68d2efa1b9178cc56df9314c21c6e718", "evaluation": "6b91aef0f799c5bb55b94e3f2daec811"}
SEARCH_SUBDIRS = ("omniglot", "omniglot-py", ".")
FIRST_963 = 963


def find_source(root: Path, split: str) -> Path | None:
    """The local zip or extracted folder for `split` under `root`, or None."""
    for sub in SEARCH_SUBDIRS:
        base = root / sub
        archive, folder = base / f"images_{split}.zip", base / f"images_{split}"
        if archive.is_file():
            return archive
        if folder.is_dir():
            return folder
    return None


def ensure_source(root: Path, split: str, *, quiet: bool = False, timeout_s: float | None = None) -> Path:
    """The local zip or folder for `split`, downloading the official zip when there is none
    (`timeout_s`: see `download.download_timeout`)."""
    source = find_source(root, split)
    if source is not None:
        return source
    prefix = os.environ.get(URL_PREFIX_ENV) or URL_PREFIX
    url = prefix.rstrip("/") + f"/images_{split}.zip"
    dest = root / "omniglot" / f"images_{split}.zip"
    try:
        dest.parent.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise DataError(f"Omniglot {split} not found under {root}, and cannot download it there: {error}") from None
    log.info("downloading Omniglot %s from %s", split, url)
    return download(url, dest, MD5[split], quiet=quiet, timeout_s=timeout_s)


def list_drawings(source: Path) -> tuple[list[str], ImageFiles, int]:
    """Class names ("Alphabet/characterNN"), the drawings in class-major order, drawings per class."""
    groups: dict[str, list[str]] = defaultdict(list)
    if source.is_file():
        try:
            with zipfile.ZipFile(source) as archive:
                members = archive.namelist()
        except (OSError, zipfile.BadZipFile) as error:
            raise DataError(f"cannot read Omniglot zip {source}: {error}") from None
        for member in members:
            parts = member.split("/")
            if (
                len(parts) >= 3
                and parts[-1].lower().endswith(".png")
                and not any(p.startswith((".", "__MACOSX")) for p in parts)
            ):
                groups[f"{parts[-3]}/{parts[-2]}"].append(member)
        archive_path = source
    else:
        for alphabet in subdirs(source):
            for character in subdirs(alphabet):
                groups[f"{alphabet.name}/{character.name}"] = [
                    str(p) for p in character.iterdir() if p.suffix.lower() == ".png" and not p.name.startswith(".")
                ]
        archive_path = None
    groups = {name: files for name, files in groups.items() if files}
    if not groups:
        raise DataError(f"no Omniglot drawings (<Alphabet>/<character>/*.png) found in {source}")
    names = sorted(groups)
    counts = {len(groups[name]) for name in names}
    if len(counts) != 1:
        smallest = min(names, key=lambda n: len(groups[n]))
        raise DataError(
            f"{source}: characters have different numbers of drawings ({sorted(counts)}), "
            f"e.g. {smallest} has {len(groups[smallest])}; the data is incomplete"
        )
    files = [f for name in names for f in sorted(groups[name], key=lambda f: f.rsplit("/", 1)[-1])]
    return names, ImageFiles(tuple(files), archive_path), counts.pop()


def source_fingerprint(source: Path) -> dict[str, object]:
    """Identifies the raw data cheaply (sizes, times, names), so a changed source rebuilds the cache."""
    if source.is_file():
        stat = source.stat()
        return {"file": source.name, "bytes": stat.st_size, "mtime_ns": stat.st_mtime_ns}
    listing = hashlib.sha256()
    total = 0
    for path in sorted(source.rglob("*.png")):
        listing.update(str(path.relative_to(source)).encode())
        total += path.stat().st_size
    return {"folder": source.name, "bytes": total, "listing": listing.hexdigest()}


def load_omniglot(
    split: str,
    size: int,
    root: Path,
    *,
    cache_dir: str | os.PathLike | None = None,
    workers: int | None = None,
    quiet: bool = False,
    timeout_s: float | None = None,
) -> tuple[torch.Tensor, list[str]]:
    """uint8 images (classes, drawings, 1, size, size) and class names, from the cache when valid.

    `timeout_s`: the download time limit if the source must be downloaded (None: the default)."""
    source = ensure_source(root, split, quiet=quiet, timeout_s=timeout_s)
    key = {
        "version": CACHE_VERSION,
        "dataset": "omniglot",
        "split": split,
        "size": size,
        "mode": "L",
        "source": source_fingerprint(source),
    }
    directory = choose_cache_dir(root / "omniglot", "omniglot", cache_dir)
    path = directory / f"omniglot-{split}-{size}.pt" if directory is not None else None
    start = time.perf_counter()
    cached = load_cache(path, key) if path is not None else None
    if cached is not None:
        log.info("Omniglot %s %dpx loaded from cache %s in %.2fs", split, size, path, time.perf_counter() - start)
        return cached
    names, files, per_class = list_drawings(source)
    pixels = decode_images(files, size, "L", workers=workers, quiet=quiet, desc=f"Omniglot {split} {size}px")
    images = torch.from_numpy(np.ascontiguousarray(pixels)).reshape(len(names), per_class, 1, size, size)
    log.info(
        "Omniglot %s preprocessed from %s in %.1fs (%d classes x %d drawings)",
        split,
        source,
        time.perf_counter() - start,
        len(names),
        per_class,
    )
    if path is not None:
        save_cache(path, key, images, names)
    else:
        log.warning("no writable folder for the Omniglot cache; it will be preprocessed again next time")
    return images, names
