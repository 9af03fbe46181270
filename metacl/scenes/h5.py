"""Reading and writing compositional-scenes files in the reference HDF5 layout.

| dataset      | dtype, shape          | content                                                 |
|--------------|-----------------------|---------------------------------------------------------|
| `X`          | uint8 (N, H, W, 3)    | images                                                  |
| `D`          | uint8 (N, 5, 3)       | (colour, 10 + shape, 20 + texture) per object, 255 pads |
| `y`          | uint8 (N, 30)         | 1 iff some object has the feature                       |
| `Q`          | uint8 (N, 30, 30)     | one-hot query rows (identity), read by the reference code |
| `properties` | 30 byte strings       | feature names                                           |

metacl adds file attributes prefixed `metacl_` (format version, seed, image size, generator
parameters). Files without them (such as the original meta_learning_50k.h5) load too.

metacl's files (format version 2 on) also hold per-object scene metadata, like CLEVR's scene
files, in datasets that reference readers ignore. Slot k describes the object of `D[:, k]`;
absent objects (the 5th slot of 4-object scenes, where D holds 255) hold the fill value.

- `object_position`, float32 (N, 5, 2): ground (x, y) of the object's base centre, world units.
- `object_rotation`, float32 (N, 5): orientation, degrees anticlockwise about the vertical (z)
  axis seen from above.
- `object_depth`, float32 (N, 5): distance from the camera to the base centre along the camera's
  viewing axis, world units (what CLEVR's pixel_coords[2] gives); nearer objects cover farther ones.
- `object_pixel_centre`, float32 (N, 5, 2): (x, y) centroid of the object's own pixels, before
  occlusion; pixel (i, j) spans x in [i, i + 1), y in [j, j + 1).
- `object_box`, int32 (N, 5, 4): left, top, right, bottom (right and bottom exclusive) of the
  pixels the object covers at all, before occlusion, so it holds all of its visible pixels.
- `object_visible_pixels`, float32 (N, 5): visible pixels after occlusion by nearer objects (the
  object's coverage summed over the image), as the >= 700 rule at 160x120 counts them.

Fill values: NaN for the float datasets, -1 for `object_box`.

Files without these datasets (the reference's, and metacl's before format version 2) load with
`Scenes.objects` None.

A file being generated lives at `<name>.partial` with `metacl_complete = 0` until its last
image is written; only then is it renamed to its final name, so an interrupted generation never
leaves a file that looks complete, and a rerun with the same parameters resumes it.
"""

from __future__ import annotations

import contextlib
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import h5py
import numpy as np

from ..core.errors import DataError
from .features import FEATURES, NUM_FEATURES, PAD, VALUES_PER_DIMENSION

FORMAT_VERSION = 2
"""2: adds the per-object metadata datasets `object_*`."""
MAX_OBJECTS = 5
IMAGE_CHUNK = 16
"""Images per HDF5 chunk of X (about 1 MB at 160x120): cheap random reads, fast contiguous ones."""
ROW_CHUNK = 4096


@dataclass
class SceneObjects:
    """Per-object scene metadata (N, 5, ...); see the module docstring for units and fill values."""

    position: np.ndarray
    rotation: np.ndarray
    depth: np.ndarray
    pixel_centre: np.ndarray
    box: np.ndarray
    visible_pixels: np.ndarray

    def __len__(self) -> int:
        return len(self.position)

    def select(self, rows) -> SceneObjects:
        return SceneObjects(**{name: getattr(self, name)[rows] for name in self.__dataclass_fields__})


OBJECT_DATASETS: dict[str, tuple[str, type, tuple[int, ...], float | int]] = {
    "object_position": ("position", np.float32, (2,), np.nan),
    "object_rotation": ("rotation", np.float32, (), np.nan),
    "object_depth": ("depth", np.float32, (), np.nan),
    "object_pixel_centre": ("pixel_centre", np.float32, (2,), np.nan),
    "object_box": ("box", np.int32, (4,), -1),
    "object_visible_pixels": ("visible_pixels", np.float32, (), np.nan),
}
"""Dataset name -> (SceneObjects field, dtype, per-object shape, fill value for absent objects)."""


def empty_objects(count: int) -> SceneObjects:
    """Metadata of `count` images with every slot absent (all fill values)."""
    return SceneObjects(
        **{
            field_name: np.full((count, MAX_OBJECTS, *tail), fill, dtype=dtype)
            for field_name, dtype, tail, fill in OBJECT_DATASETS.values()
        }
    )


@dataclass
class Scenes:
    """A loaded dataset: images, object rows and labels as numpy arrays, plus file attributes."""

    X: np.ndarray
    """uint8 (N, H, W, 3) images."""
    D: np.ndarray
    """uint8 (N, 5, 3) objects as (colour, 10 + shape, 20 + texture), rows of 255 for no object."""
    y: np.ndarray
    """uint8 (N, 30) multi-hot features present in each image."""
    attrs: dict[str, Any] = field(default_factory=dict)
    """File attributes (metacl_* for metacl's files; empty for reference files)."""
    objects: SceneObjects | None = None
    """Per-object scene metadata (positions, boxes, visibility...); None for files without it."""

    def __len__(self) -> int:
        return len(self.X)


def labels_from_objects(D: np.ndarray) -> np.ndarray:
    """(N, 30) uint8 multi-hot labels implied by object rows D (N, 5, 3)."""
    y = np.zeros((len(D), NUM_FEATURES + 1), dtype=np.uint8)
    flat = np.where(D == PAD, NUM_FEATURES, D).reshape(len(D), -1).astype(np.int64)
    np.put_along_axis(y, flat, 1, axis=1)
    return y[:, :NUM_FEATURES]


def query_rows(count: int) -> np.ndarray:
    """(count, 30, 30) uint8: the 30 one-hot queries for each image, as the reference stores them."""
    return np.broadcast_to(np.eye(NUM_FEATURES, dtype=np.uint8), (count, NUM_FEATURES, NUM_FEATURES))


def _decode(value: Any) -> Any:
    if isinstance(value, bytes):
        value = value.decode()
    if isinstance(value, np.generic):
        value = value.item()
    if isinstance(value, str) and value[:1] in "{[":
        with contextlib.suppress(ValueError):
            return json.loads(value)
    return value


def read_attrs(path: str | os.PathLike) -> dict[str, Any]:
    """File attributes of an HDF5 file, decoded (JSON strings become dicts)."""
    with _open(Path(path)) as f:
        return {key: _decode(value) for key, value in f.attrs.items()}


@contextlib.contextmanager
def _open(path: Path, mode: str = "r"):
    if not path.exists():
        raise DataError(f"{path}: no such file")
    try:
        handle = h5py.File(path, mode)
    except OSError as error:
        raise DataError(f"{path}: not a readable HDF5 file ({error})") from None
    with handle:
        yield handle


def _dataset(f: h5py.File, path: Path, name: str, ndim: int, tail: tuple[int | None, ...]) -> h5py.Dataset:
    if name not in f:
        raise DataError(
            f"{path}: missing dataset {name!r} (has: {', '.join(sorted(f.keys())) or 'nothing'}); "
            "a scenes file needs X, D and y"
        )
    data = f[name]
    if not isinstance(data, h5py.Dataset):
        raise DataError(f"{path}: {name!r} is a group, not a dataset")
    if data.dtype != np.uint8:
        raise DataError(f"{path}: dataset {name!r} has dtype {data.dtype}, expected uint8")
    shape_ok = data.ndim == ndim and all(t is None or s == t for s, t in zip(data.shape[1:], tail))
    if not shape_ok:
        expected = "(N, " + ", ".join("*" if t is None else str(t) for t in tail) + ")"
        raise DataError(f"{path}: dataset {name!r} has shape {data.shape}, expected {expected}")
    return data


def _check_objects(path: Path, D: np.ndarray) -> None:
    padded = D == PAD
    rows_padded = padded.all(axis=-1)
    ranges_ok = np.ones(D.shape, dtype=bool)
    for dim in range(3):
        values = D[..., dim]
        ranges_ok[..., dim] = (values >= dim * VALUES_PER_DIMENSION) & (values < (dim + 1) * VALUES_PER_DIMENSION)
    bad = ~(rows_padded | ranges_ok.all(axis=-1))
    if bad.any():
        image, slot = np.argwhere(bad)[0]
        raise DataError(
            f"{path}: D[{image}, {slot}] = {D[image, slot].tolist()} is not a valid object "
            "(colour 0-9, shape 10-19, texture 20-29, or all 255 for no object)"
        )
    empty = rows_padded.all(axis=1)
    if empty.any():
        raise DataError(f"{path}: image {int(np.argmax(empty))} has no objects in D")


def _read_objects(f: h5py.File, path: Path, images: int, count: int) -> SceneObjects | None:
    """The object_* datasets' first `count` rows, or None if the file has none of them."""
    stored = [name for name in OBJECT_DATASETS if name in f]
    if not stored:
        return None
    missing = [name for name in OBJECT_DATASETS if name not in f]
    if missing:
        raise DataError(f"{path}: has object metadata {stored} but lacks {missing}")
    arrays = {}
    for name, (field_name, dtype, tail, _) in OBJECT_DATASETS.items():
        data = f[name]
        if not isinstance(data, h5py.Dataset):
            raise DataError(f"{path}: {name!r} is a group, not a dataset")
        kind_ok = data.dtype.kind == "f" if np.dtype(dtype).kind == "f" else data.dtype.kind in "iu"
        if not kind_ok:
            raise DataError(f"{path}: dataset {name!r} has dtype {data.dtype}, expected {np.dtype(dtype)}")
        expected = (images, MAX_OBJECTS, *tail)
        if data.shape != expected:
            raise DataError(f"{path}: dataset {name!r} has shape {data.shape}, expected {expected}")
        arrays[field_name] = data[:count]
    return SceneObjects(**arrays)


def load_scenes(path: str | os.PathLike, *, limit: int | None = None) -> Scenes:
    """Load and validate a scenes file (metacl's or the reference layout), reading X in one go.

    `limit` reads only the first `limit` images (for previews and quick looks).
    """
    path = Path(path)
    with _open(path) as f:
        attrs = {key: _decode(value) for key, value in f.attrs.items()}
        if attrs.get("metacl_complete", 1) in (0, False):
            raise DataError(
                f"{path}: incomplete file (generation was interrupted after "
                f"{attrs.get('metacl_images_written', 0)} images); rerun the generation"
            )
        X = _dataset(f, path, "X", 4, (None, None, 3))
        D = _dataset(f, path, "D", 3, (MAX_OBJECTS, 3))
        y = _dataset(f, path, "y", 2, (NUM_FEATURES,))
        sizes = {"X": len(X), "D": len(D), "y": len(y)}
        if len(set(sizes.values())) != 1:
            raise DataError(f"{path}: datasets disagree on the number of images: {sizes}")
        if len(X) == 0:
            raise DataError(
                f"{path}: has no images (X, D and y hold 0 rows); generate a scenes file "
                "with `metacl data scenes --num-images N` or point to another file"
            )
        if "properties" in f and len(f["properties"]) != NUM_FEATURES:
            raise DataError(f"{path}: 'properties' holds {len(f['properties'])} names, expected {NUM_FEATURES}")
        count = len(X) if limit is None else min(len(X), int(limit))
        images = np.empty((count, *X.shape[1:]), dtype=np.uint8)
        if images.size:
            X.read_direct(images, np.s_[:count], np.s_[:count])
        objects, labels = D[:count], y[:count]
        metadata = _read_objects(f, path, len(X), count)
    _check_objects(path, objects)
    expected = labels_from_objects(objects)
    mismatch = np.argwhere(expected != labels)
    if len(mismatch):
        image, feature = mismatch[0]
        raise DataError(
            f"{path}: y[{image}, {feature}] = {labels[image, feature]} but D[{image}] says "
            f"{FEATURES[feature]!r} is {'present' if expected[image, feature] else 'absent'} "
            f"({len(np.unique(mismatch[:, 0]))} image(s) disagree)"
        )
    return Scenes(X=images, D=objects, y=labels, attrs=attrs, objects=metadata)


def partial_path(path: str | os.PathLike) -> Path:
    path = Path(path)
    return path.with_name(path.name + ".partial")


class SceneWriter:
    """Writes a scenes file batch by batch into `<path>.partial`, renamed to `path` when complete.

    `attrs` (format version, seed, size, generator parameters) identify the content; reopening a
    partial file with identical attrs resumes after its last fully written batch (`start`).
    """

    def __init__(self, path: str | os.PathLike, num_images: int, height: int, width: int, attrs: dict[str, Any]):
        self.path = Path(path)
        self.partial = partial_path(self.path)
        self.num_images, self.height, self.width = int(num_images), int(height), int(width)
        self.attrs = {
            "metacl_format_version": FORMAT_VERSION,
            "metacl_num_images": self.num_images,
            "metacl_height": self.height,
            "metacl_width": self.width,
            **attrs,
        }
        self.file: h5py.File | None = None
        self.start = 0

    def __enter__(self) -> SceneWriter:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.start = self._resume_point()
        if self.start == 0:
            self._create()
        return self

    def __exit__(self, kind, error, trace) -> None:
        if self.file is not None:
            self.file.close()
            self.file = None

    def _encoded_attrs(self) -> dict[str, Any]:
        return {k: json.dumps(v, sort_keys=True) if isinstance(v, (dict, list)) else v for k, v in self.attrs.items()}

    def _resume_point(self) -> int:
        if not self.partial.exists():
            return 0
        try:
            handle = h5py.File(self.partial, "r+")
        except OSError:
            self.partial.unlink()
            return 0
        stored = {k: _decode(v) for k, v in handle.attrs.items()}
        if all(stored.get(k) == _decode(v) for k, v in self._encoded_attrs().items()):
            self.file = handle
            return int(stored.get("metacl_images_written", 0))
        handle.close()
        self.partial.unlink()
        return 0

    def _create(self) -> None:
        n, h, w = self.num_images, self.height, self.width
        f = h5py.File(self.partial, "w")
        f.create_dataset("X", (n, h, w, 3), np.uint8, chunks=(min(IMAGE_CHUNK, n), h, w, 3))
        f.create_dataset("D", (n, MAX_OBJECTS, 3), np.uint8, chunks=(min(ROW_CHUNK, n), MAX_OBJECTS, 3), fillvalue=PAD)
        f.create_dataset("y", (n, NUM_FEATURES), np.uint8, chunks=(min(ROW_CHUNK, n), NUM_FEATURES))
        queries = f.create_dataset(
            "Q", (n, NUM_FEATURES, NUM_FEATURES), np.uint8, chunks=(min(ROW_CHUNK // 4, n), NUM_FEATURES, NUM_FEATURES)
        )
        for start in range(0, n, ROW_CHUNK):
            stop = min(n, start + ROW_CHUNK)
            queries[start:stop] = query_rows(stop - start)
        f.create_dataset("properties", data=np.array([name.encode() for name in FEATURES]))
        for name, (_, dtype, tail, fill) in OBJECT_DATASETS.items():
            f.create_dataset(
                name, (n, MAX_OBJECTS, *tail), dtype, chunks=(min(ROW_CHUNK, n), MAX_OBJECTS, *tail), fillvalue=fill
            )
        for key, value in self._encoded_attrs().items():
            f.attrs[key] = value
        f.attrs["metacl_complete"] = 0
        f.attrs["metacl_images_written"] = 0
        f.flush()
        self.file = f

    def write(self, start: int, X: np.ndarray, D: np.ndarray, objects: SceneObjects | None = None) -> None:
        """Store images `start .. start + len(X)` (written in order) and mark them durable.

        `objects` is their per-object metadata; without it those rows keep the fill values.
        """
        stop = start + len(X)
        self.file["X"][start:stop] = X
        self.file["D"][start:stop] = D
        self.file["y"][start:stop] = labels_from_objects(D)
        if objects is not None:
            for name, (field_name, dtype, _, _) in OBJECT_DATASETS.items():
                self.file[name][start:stop] = np.asarray(getattr(objects, field_name), dtype=dtype)
        self.file.attrs["metacl_images_written"] = stop
        self.file.flush()

    def finish(self) -> Path:
        """Mark the file complete and move it to its final name."""
        written = int(self.file.attrs["metacl_images_written"])
        if written != self.num_images:
            raise DataError(f"{self.partial}: only {written} of {self.num_images} images written")
        self.file.attrs["metacl_complete"] = 1
        self.file.close()
        self.file = None
        os.replace(self.partial, self.path)
        return self.path
