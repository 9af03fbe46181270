"""`metacl data omniglot`: download and preprocess Omniglot ahead of training."""
from __future__ import annotations

import argparse
import time


def add_commands(commands: argparse._SubParsersAction) -> None:
    parser = commands.add_parser(
        "omniglot", help="download (if needed), preprocess and cache Omniglot",
        description="Find the Omniglot zips (or their extracted folders) under DATA_DIR, download the "
                    "official zips when absent (md5-checked), and cache each split at each size. "
                    "Existing local zips and folders are used as they are and never modified.")
    parser.add_argument("--data-dir", default=None,
                        help="folder holding or receiving the data "
                             "(default: $METACL_DATA_DIR, else ~/.cache/metacl)")
    parser.add_argument("--size", type=int, nargs="+", default=[28], metavar="PX",
                        help="image side(s) in pixels to cache: 28 for ANML, 84 for OML (default: 28)")
    parser.add_argument("--split", choices=("background", "evaluation"), nargs="+",
                        default=["background", "evaluation"], help="splits to prepare (default: both)")
    parser.add_argument("--quiet", action="store_true", help="no progress bars")
    parser.set_defaults(handler=_omniglot)


def _omniglot(args: argparse.Namespace) -> int:
    from ...core.errors import ConfigError
    from ...core.paths import data_dir
    from .omniglot import load_omniglot
    bad = [size for size in args.size if size < 1]
    if bad:
        raise ConfigError(f"--size must be a positive number of pixels, got {bad[0]}")
    root = data_dir(args.data_dir)
    print(f"Omniglot data directory: {root}")
    for split in args.split:
        for size in args.size:
            start = time.perf_counter()
            images, _ = load_omniglot(split, size, root, quiet=args.quiet)
            print(f"{split:>10} {size:>3}px: {images.shape[0]} classes x {images.shape[1]} drawings, "
                  f"ready in {time.perf_counter() - start:.1f}s")
    return 0
