"""Decode and resize image files into one uint8 array, in parallel but always in the given order.

Images are read from a zip archive (no extraction needed) or from plain files. Pixels go through
Pillow exactly as the reference code did (`convert(mode)`, then `resize(..., LANCZOS)`), and stay
uint8 until they reach the device: `x / 255` there equals torchvision's `ToTensor()` bit for bit.
"""

from __future__ import annotations

import io
import os
import zipfile
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from ...core.errors import DataError
from ...core.progress import progress

CHUNK = 256
PARALLEL_MIN_IMAGES = 2 * CHUNK


@dataclass(frozen=True)
class ImageFiles:
    """Images to decode: members of the zip `archive`, or file paths when `archive` is None."""

    names: tuple[str, ...]
    archive: Path | None = None


def default_workers() -> int:
    return max(1, min(8, os.cpu_count() or 1))


def decode_images(
    files: ImageFiles, size: int, mode: str, *, workers: int | None = None, quiet: bool = False, desc: str = "decoding"
) -> np.ndarray:
    """All images as uint8 (N, channels, size, size), in the order of `files.names`."""
    workers = default_workers() if workers is None else workers
    chunks = [files.names[i : i + CHUNK] for i in range(0, len(files.names), CHUNK)]
    jobs = [(ImageFiles(chunk, files.archive), size, mode) for chunk in chunks]
    parts = []
    with progress(total=len(files.names), desc=desc, unit="img", quiet=quiet) as bar:
        if workers <= 1 or len(files.names) < PARALLEL_MIN_IMAGES:
            results = map(_decode_chunk, jobs)
            for part in results:
                parts.append(part)
                bar.update(len(part))
        else:
            with ProcessPoolExecutor(min(workers, len(jobs))) as pool:
                for part in pool.map(_decode_chunk, jobs):  # map keeps the input order
                    parts.append(part)
                    bar.update(len(part))
    channels = 1 if mode == "L" else 3
    if not parts:
        return np.zeros((0, channels, size, size), np.uint8)
    return np.concatenate(parts)


def _decode_chunk(job: tuple[ImageFiles, int, str]) -> np.ndarray:
    files, size, mode = job
    out = []
    archive = zipfile.ZipFile(files.archive) if files.archive is not None else None
    try:
        for name in files.names:
            try:
                data = archive.read(name) if archive is not None else Path(name).read_bytes()
                with Image.open(io.BytesIO(data)) as image:
                    image = image.convert(mode)
                    if image.size != (size, size):
                        image = image.resize((size, size), Image.Resampling.LANCZOS)
                    pixels = np.asarray(image, dtype=np.uint8)
            except (OSError, KeyError, zipfile.BadZipFile) as error:
                where = f"{files.archive}:{name}" if archive is not None else name
                raise DataError(f"cannot read image {where}: {error}") from None
            out.append(pixels[None] if pixels.ndim == 2 else pixels.transpose(2, 0, 1))
    finally:
        if archive is not None:
            archive.close()
    return np.stack(out)
