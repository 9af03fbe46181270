"""Generate a compositional-scenes file: sample valid layouts, render them, write them in batches.

Each image's content is a pure function of (seed, image index), so the same seed and parameters
give byte-identical X, D, y and object metadata whatever the batch size, and an interrupted
generation resumes exactly where it stopped.
"""

from __future__ import annotations

import concurrent.futures
import fcntl
import multiprocessing
import os
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch

from ..core.device import resolve_device
from ..core.errors import ConfigError, DataError
from ..core.paths import data_dir
from ..core.progress import progress
from . import atlas, shapes
from . import layout as layouts
from .h5 import FORMAT_VERSION, SceneObjects, SceneWriter, empty_objects, read_attrs
from .layout import Layout, layout_to_D, sample_layouts
from .render import SceneRenderer

GENERATOR_VERSION = 2
"""Bump whenever a change alters the images produced for a given seed.

2: objects are painted far to near (version 1 painted farther objects over nearer ones, and its
visibility rule measured that inverted occlusion)."""
MAX_ATTEMPTS = 1000
DEFAULT_BATCH_SIZE = 256
MIN_SIDE = 32


def generator_params() -> dict:
    """Parameters that determine the images besides seed and size (stored in each file)."""
    return {
        "generator_version": GENERATOR_VERSION,
        "object_size": shapes.SIZE,
        "rotations": atlas.ROTATIONS,
        "supersample": atlas.SUPERSAMPLE,
        "objects": [layouts.MIN_OBJECTS, layouts.MAX_OBJECTS],
        "min_gap": layouts.MIN_GAP,
        "ground_region": [layouts.LATERAL_HALF_EXTENT, layouts.DEPTH_HALF_EXTENT],
        "min_visible_pixels_at_160x120": 700,
        "camera": [6.0, -5.0, 6.0],
        "focal_mm": 35.0,
    }


def file_attrs(seed: int) -> dict:
    return {"metacl_seed": int(seed), "metacl_generator": generator_params()}


def default_scenes_path(
    num_images: int, *, seed: int = 0, height: int = 120, width: int = 160, data_root: str | os.PathLike | None = None
) -> Path:
    """Where generated scenes live by default: `<data dir>/scenes/scenes-<N>-<H>x<W>-seed<S>-v<V>.h5`."""
    name = f"scenes-{num_images}-{height}x{width}-seed{seed}-v{GENERATOR_VERSION}.h5"
    return data_dir(data_root) / "scenes" / name


def _select(layout: Layout, rows: np.ndarray) -> Layout:
    return Layout(**{name: getattr(layout, name)[rows] for name in layout.__dataclass_fields__})


def _measured_layouts(seed: int, indices: np.ndarray, renderer: SceneRenderer) -> tuple[Layout, dict[str, np.ndarray]]:
    """Valid layouts for image `indices` and the renderer's measures (visible, centre, box) of them."""
    count = len(indices)
    attempts = np.zeros(count, dtype=np.int64)
    result: Layout | None = None
    measures: dict[str, np.ndarray] = {}
    pending = np.arange(count)
    while len(pending):
        if attempts[pending].max() >= MAX_ATTEMPTS:
            raise DataError(
                f"no valid layout found in {MAX_ATTEMPTS} attempts for image "
                f"{indices[pending[0]]}; the image size may be too small for the objects"
            )
        draft = sample_layouts(seed, indices[pending], attempts[pending], renderer.in_frame)
        ok = draft.placed.copy()
        if ok.any():
            checked = np.flatnonzero(ok)
            with torch.no_grad():
                measured = renderer.measure(_select(draft, checked))
            found = {name: getattr(measured, name).cpu().numpy() for name in ("visible", "centre", "box")}
            enough = np.where(draft.present[checked], found["visible"] >= renderer.min_visible, True).all(axis=1)
            ok[checked] = enough
            for name, values in found.items():
                if name not in measures:
                    measures[name] = np.zeros((count, *values.shape[1:]), dtype=values.dtype)
                measures[name][pending[checked[enough]]] = values[enough]
        if result is None:
            result = _select(draft, np.zeros(count, dtype=np.int64))
        for name in result.__dataclass_fields__:
            getattr(result, name)[pending[ok]] = getattr(draft, name)[ok]
        attempts[pending[~ok]] += 1
        pending = pending[~ok]
    return result, measures


def valid_layouts(seed: int, indices: np.ndarray, renderer: SceneRenderer) -> Layout:
    """Layouts for image `indices`, each redrawn until its objects fit and are all visible enough."""
    return _measured_layouts(seed, indices, renderer)[0]


def object_metadata(layout: Layout, measures: dict[str, np.ndarray], renderer: SceneRenderer) -> SceneObjects:
    """The per-object metadata stored with the images (fill values in absent slots)."""
    objects = empty_objects(len(layout.present))
    present = layout.present
    objects.position[present] = layout.position[present]
    objects.rotation[present] = layout.rotation[present] * (360.0 / atlas.ROTATIONS)
    objects.depth[present] = renderer.depth(layout.position)[present]
    objects.pixel_centre[present] = measures["centre"][present]
    objects.box[present] = measures["box"][present]
    objects.visible_pixels[present] = measures["visible"][present]
    return objects


def render_images(
    seed: int, indices: np.ndarray, renderer: SceneRenderer
) -> tuple[np.ndarray, np.ndarray, SceneObjects]:
    """(X uint8 (B, H, W, 3), D uint8 (B, 5, 3), object metadata) for the given image indices."""
    layout, measures = _measured_layouts(seed, np.asarray(indices, dtype=np.int64), renderer)
    with torch.no_grad():
        images = renderer.render(layout).cpu().numpy()
    return images, layout_to_D(layout), object_metadata(layout, measures, renderer)


_worker_renderer: SceneRenderer | None = None


def _start_worker(height: int, width: int) -> None:
    """Worker processes render on one thread each: on CPU, processes scale and threads do not."""
    global _worker_renderer
    torch.set_num_threads(1)
    _worker_renderer = SceneRenderer(height, width, "cpu")


def _render_in_worker(seed: int, indices: np.ndarray) -> tuple[np.ndarray, np.ndarray, SceneObjects]:
    return render_images(seed, indices, _worker_renderer)


def _rendered_batches(
    seed: int, batches: list[np.ndarray], renderer: SceneRenderer, workers: int, height: int, width: int
) -> Iterator[tuple[np.ndarray, np.ndarray, SceneObjects]]:
    """(images, D, object metadata) per batch, in order; with workers > 1, rendered by a process pool.

    Every image is a pure function of (seed, index), so the pool changes speed, never bytes.
    """
    if workers <= 1:
        yield from (render_images(seed, indices, renderer) for indices in batches)
        return
    context = multiprocessing.get_context("spawn")  # fork is unsafe once torch's threads exist
    with concurrent.futures.ProcessPoolExecutor(
        workers, mp_context=context, initializer=_start_worker, initargs=(height, width)
    ) as pool:
        yield from pool.map(_render_in_worker, [seed] * len(batches), batches)


def _check_arguments(num_images: int, height: int, width: int, batch_size: int) -> None:
    if int(num_images) < 1:
        raise ConfigError(f"num_images must be at least 1, got {num_images}")
    if min(height, width) < MIN_SIDE:
        raise ConfigError(f"image size {height}x{width} is too small; height and width must be >= {MIN_SIDE}")
    if not 1.25 <= width / height <= 1.8:
        raise ConfigError(
            f"aspect ratio {width}x{height} unsupported: the scene is framed for landscape "
            "images; width/height must be within 1.25-1.8 (4:3 and 16:9 work)"
        )
    if int(batch_size) < 1:
        raise ConfigError(f"batch_size must be at least 1, got {batch_size}")


def generate_scenes(
    out_path: str | os.PathLike,
    num_images: int,
    *,
    seed: int = 0,
    height: int = 120,
    width: int = 160,
    device: str | torch.device = "cpu",
    batch_size: int = DEFAULT_BATCH_SIZE,
    workers: int = 1,
    quiet: bool = False,
) -> Path:
    """Write `num_images` scenes to `out_path` (HDF5, reference layout); resumes an interrupted run.

    `workers` > 1 renders batches in that many CPU processes (ignored on CUDA).
    """
    _check_arguments(num_images, height, width, batch_size)
    if int(workers) < 1:
        raise ConfigError(f"workers must be at least 1, got {workers}")
    device = resolve_device(device)
    workers = workers if device.type == "cpu" else 1
    renderer = SceneRenderer(height, width, device)
    if renderer.window_h > height or renderer.window_w > width:
        raise ConfigError(f"image size {height}x{width}: objects do not fit; use a wider aspect ratio")
    with SceneWriter(out_path, num_images, height, width, file_attrs(seed)) as writer:
        bar = progress(total=num_images, initial=writer.start, desc="scenes", unit="img", quiet=quiet)
        batches = [
            np.arange(start, min(num_images, start + batch_size))
            for start in range(writer.start, num_images, batch_size)
        ]
        with bar:
            for indices, (images, D, objects) in zip(
                batches, _rendered_batches(seed, batches, renderer, workers, height, width)
            ):
                writer.write(int(indices[0]), images, D, objects)
                bar.update(len(indices))
        return writer.finish()


def matches(path: str | os.PathLike, num_images: int, *, seed: int, height: int, width: int) -> bool:
    """Whether `path` is a complete metacl scenes file generated with exactly these parameters."""
    try:
        attrs = read_attrs(path)
    except DataError:
        return False
    return (
        attrs.get("metacl_complete") == 1
        and attrs.get("metacl_format_version") == FORMAT_VERSION
        and attrs.get("metacl_num_images") == num_images
        and attrs.get("metacl_seed") == seed
        and attrs.get("metacl_height") == height
        and attrs.get("metacl_width") == width
        and attrs.get("metacl_generator") == generator_params()
    )


def ensure_scenes(
    path: str | os.PathLike | None,
    num_images: int,
    *,
    seed: int = 0,
    height: int = 120,
    width: int = 160,
    device: str | torch.device = "cpu",
    workers: int = 1,
    quiet: bool = False,
) -> Path:
    """The scenes file at `path` (default: under the data dir), generated first unless it already matches."""
    path = Path(path) if path is not None else default_scenes_path(num_images, seed=seed, height=height, width=width)
    if path.exists() and matches(path, num_images, seed=seed, height=height, width=width):
        return path
    # runs of a sweep share one default file: one process generates it, the others wait and reuse it
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path.with_name(path.name + ".lock"), "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if path.exists() and matches(path, num_images, seed=seed, height=height, width=width):
            return path
        return generate_scenes(
            path, num_images, seed=seed, height=height, width=width, device=device, workers=workers, quiet=quiet
        )
