"""`metacl data scenes|preview`: generate and inspect the compositional-scenes dataset."""

from __future__ import annotations

import argparse
import errno
import os
from pathlib import Path

from ..core.device import VALID_DEVICES


def _int_at_least(minimum: int):
    """An argparse type: a whole number >= `minimum`, with a message that says so."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from None
        if value < minimum:
            raise argparse.ArgumentTypeError(f"must be at least {minimum}, got {value}")
        return value

    return parse


_positive, _seed = _int_at_least(1), _int_at_least(0)


def add_commands(data_subparsers: argparse._SubParsersAction) -> None:
    scenes = data_subparsers.add_parser(
        "scenes",
        help="generate a compositional-scenes HDF5 file (reference layout)",
        description="Render CLEVR-like scenes of 4-5 objects (10 colours x 10 shapes x 10 textures) "
        "into an HDF5 file with datasets X, D, y, Q and properties.",
    )
    scenes.add_argument("--num-images", type=_positive, required=True, metavar="N", help="images to generate")
    scenes.add_argument(
        "--out", metavar="FILE", help="output .h5 file (default: <data dir>/scenes/scenes-<N>-<H>x<W>-seed<S>-v<V>.h5)"
    )
    scenes.add_argument(
        "--overwrite",
        action="store_true",
        help="replace an existing output file (it is kept until the new one is complete)",
    )
    scenes.add_argument("--seed", type=_seed, default=0, help="seed of every random choice (default 0)")
    scenes.add_argument("--device", default="cpu", help=f"{VALID_DEVICES} (default cpu)")
    scenes.add_argument("--height", type=_positive, default=120, help="image height in pixels (default 120)")
    scenes.add_argument("--width", type=_positive, default=160, help="image width in pixels (default 160)")
    scenes.add_argument("--batch-size", type=_positive, default=256, help="images rendered per batch")
    scenes.add_argument(
        "--workers",
        type=_positive,
        default=os.cpu_count() or 1,
        help="CPU processes rendering in parallel (default: all cores); same bytes for any value",
    )
    scenes.add_argument("--data-dir", metavar="DIR", help="data folder (default $METACL_DATA_DIR or ~/.cache/metacl)")
    scenes.add_argument("--quiet", action="store_true", help="no progress bar")
    scenes.set_defaults(handler=_scenes)

    preview = data_subparsers.add_parser(
        "preview", help="write a contact-sheet PNG of a scenes file, captioned with each image's objects"
    )
    preview.add_argument("file", metavar="FILE", help="scenes .h5 file")
    preview.add_argument("--out", metavar="PNG", required=True, help="PNG to write")
    preview.add_argument("--overwrite", action="store_true", help="replace an existing PNG")
    preview.add_argument("--n", type=_positive, default=16, help="number of images (default 16)")
    preview.add_argument(
        "--boxes", action="store_true", help="outline each object's bounding box (needs a file with object metadata)"
    )
    preview.set_defaults(handler=_preview)


def _scenes(args: argparse.Namespace) -> int:
    from ..core.atomic import check_writable_dir
    from ..core.errors import DataError
    from .generate import default_scenes_path, generate_scenes, matches

    out = (
        Path(args.out).expanduser()
        if args.out
        else default_scenes_path(
            args.num_images, seed=args.seed, height=args.height, width=args.width, data_root=args.data_dir
        )
    )
    flag = "--out" if args.out else "--data-dir"
    if args.out:
        check_output_file(args.out, "--out", "scenes.h5")
    elif out.is_dir():
        raise DataError(f"{out} is a folder where the scenes file should go; move it away or choose another --data-dir")
    if out.exists() and not args.overwrite:
        if matches(out, args.num_images, seed=args.seed, height=args.height, width=args.width):
            print(
                f"{out} already holds these {args.num_images} scenes (same seed, size and generator); "
                "nothing to do (--overwrite generates it again)"
            )
            return 0
        raise DataError(
            f"{out} already exists ({describe_scenes_file(out)}); pass --overwrite to "
            f"replace it, or choose another {flag}"
        )
    check_writable_dir(out.parent, f"choose a writable {flag}")
    try:
        path = generate_scenes(
            out,
            args.num_images,
            seed=args.seed,
            height=args.height,
            width=args.width,
            device=args.device,
            batch_size=args.batch_size,
            workers=args.workers,
            quiet=args.quiet,
        )
    except OSError as error:
        raise write_error(
            error, out.parent, flag, resumable=(f"run the same command again to resume ({out.name}.partial is kept)")
        ) from None
    print(f"wrote {args.num_images} scenes to {path}")
    return 0


def write_error(error: OSError, folder: Path, flag: str, resumable: str = "") -> Exception:
    """The error to raise for an OSError met while writing into `folder`: a DataError saying
    where, why and what to do when the folder cannot take the file, else `error` itself."""
    from ..core.atomic import write_error_message
    from ..core.errors import DataError

    if error.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
        hint = f"choose a writable {flag}"
    elif error.errno in (errno.ENOSPC, errno.EDQUOT):
        hint = (
            f"free some space and {resumable}, or choose another {flag}"
            if resumable
            else f"free some space, or choose another {flag}"
        )
    else:
        return error
    return DataError(write_error_message(error, folder, hint))


def check_output_file(out: str | os.PathLike, flag: str, example: str) -> None:
    """Refuse an output path that is (or, with a trailing slash, names) a folder."""
    text = os.fspath(out)
    path = Path(text).expanduser()
    if path.is_dir() or text.endswith(("/", os.sep)):
        from ..core.errors import DataError

        raise DataError(f"{flag} {text} is a folder; give a file name, e.g. {path / example}")


def describe_scenes_file(path: Path) -> str:
    """'400 images' (or why it could not be read), to say what --overwrite would replace."""
    try:
        import h5py

        with h5py.File(path, "r") as f:
            return f"{len(f['X'])} images" if "X" in f else "an HDF5 file without images"
    except Exception:  # any unreadable file: still not ours to replace silently
        return "not a readable scenes file"


def _preview(args: argparse.Namespace) -> int:
    from ..core.atomic import check_writable_dir
    from ..core.errors import DataError
    from .preview import write_preview

    check_output_file(args.out, "--out", "preview.png")
    out = Path(args.out).expanduser()
    if out.exists() and out.resolve() == Path(args.file).expanduser().resolve():
        raise DataError(f"--out {args.out} is the scenes file itself; choose another --out")
    if out.exists() and not args.overwrite:
        raise DataError(f"{out} already exists; pass --overwrite to replace it, or choose another --out")
    check_writable_dir(out.parent, "choose a writable --out")
    try:
        path = write_preview(args.file, out, args.n, boxes=args.boxes)
    except OSError as error:
        raise write_error(error, out.parent, "--out") from None
    print(f"wrote {path}")
    return 0
