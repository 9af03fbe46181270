"""`metacl data scenes|preview`: generate and inspect the compositional-scenes dataset."""
from __future__ import annotations

import argparse
import os

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
        "scenes", help="generate a compositional-scenes HDF5 file (reference layout)",
        description="Render CLEVR-like scenes of 4-5 objects (10 colours x 10 shapes x 10 textures) "
                    "into an HDF5 file with datasets X, D, y, Q and properties.")
    scenes.add_argument("--num-images", type=_positive, required=True, metavar="N", help="images to generate")
    scenes.add_argument("--out", metavar="FILE",
                        help="output .h5 file (default: <data dir>/scenes/scenes-<N>-<H>x<W>-seed<S>-v<V>.h5)")
    scenes.add_argument("--seed", type=_seed, default=0, help="seed of every random choice (default 0)")
    scenes.add_argument("--device", default="cpu", help=f"{VALID_DEVICES} (default cpu)")
    scenes.add_argument("--height", type=_positive, default=120, help="image height in pixels (default 120)")
    scenes.add_argument("--width", type=_positive, default=160, help="image width in pixels (default 160)")
    scenes.add_argument("--batch-size", type=_positive, default=256, help="images rendered per batch")
    scenes.add_argument("--workers", type=_positive, default=os.cpu_count() or 1,
                        help="CPU processes rendering in parallel (default: all cores); same bytes for any value")
    scenes.add_argument("--data-dir", metavar="DIR", help="data folder (default $METACL_DATA_DIR or ~/.cache/metacl)")
    scenes.add_argument("--quiet", action="store_true", help="no progress bar")
    scenes.set_defaults(handler=_scenes)

    preview = data_subparsers.add_parser(
        "preview", help="write a contact-sheet PNG of a scenes file, captioned with each image's objects")
    preview.add_argument("file", metavar="FILE", help="scenes .h5 file")
    preview.add_argument("--out", metavar="PNG", required=True, help="PNG to write")
    preview.add_argument("--n", type=_positive, default=16, help="number of images (default 16)")
    preview.add_argument("--boxes", action="store_true",
                         help="outline each object's bounding box (needs a file with object metadata)")
    preview.set_defaults(handler=_preview)


def _scenes(args: argparse.Namespace) -> int:
    from .generate import default_scenes_path, generate_scenes
    out = args.out or default_scenes_path(args.num_images, seed=args.seed, height=args.height,
                                          width=args.width, data_root=args.data_dir)
    path = generate_scenes(out, args.num_images, seed=args.seed, height=args.height, width=args.width,
                           device=args.device, batch_size=args.batch_size, workers=args.workers,
                           quiet=args.quiet)
    print(f"wrote {args.num_images} scenes to {path}")
    return 0


def _preview(args: argparse.Namespace) -> int:
    from .preview import write_preview
    path = write_preview(args.file, args.out, args.n, boxes=args.boxes)
    print(f"wrote {path}")
    return 0
