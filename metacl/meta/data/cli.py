"""`metacl data omniglot`: download and preprocess Omniglot ahead of training."""

from __future__ import annotations

import argparse
import math
import time


def _seconds(text: str) -> float:
    """An argparse type: a positive number of seconds."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number of seconds, got {text!r}") from None
    if not (math.isfinite(value) and value > 0):
        raise argparse.ArgumentTypeError(f"must be a positive number of seconds, got {text!r}")
    return value


def add_commands(commands: argparse._SubParsersAction) -> None:
    parser = commands.add_parser(
        "omniglot",
        help="download (if needed), preprocess and cache Omniglot",
        description="Find the Omniglot zips (or their extracted folders) under DATA_DIR, download the "
        "official zips when absent (md5-checked), and cache each split at each size. "
        "Existing local zips and folders are used as they are and never modified.",
    )
    parser.add_argument(
        "--data-dir",
        default=None,
        help="folder holding or receiving the data (default: $METACL_DATA_DIR, else ~/.cache/metacl)",
    )
    parser.add_argument(
        "--size",
        type=int,
        nargs="+",
        default=[28],
        metavar="PX",
        help="image side(s) in pixels to cache: 28 for ANML, 84 for OML (default: 28)",
    )
    parser.add_argument(
        "--split",
        choices=("background", "evaluation"),
        nargs="+",
        default=["background", "evaluation"],
        help="splits to prepare (default: both)",
    )
    parser.add_argument(
        "--timeout",
        type=_seconds,
        default=None,
        metavar="SECONDS",
        help="give a download up after this many seconds without data from the server "
        "(default: $METACL_DOWNLOAD_TIMEOUT, else 30); connecting may take at "
        "most 10 seconds",
    )
    parser.add_argument("--quiet", action="store_true", help="no progress bars")
    parser.set_defaults(handler=_omniglot)


def _omniglot(args: argparse.Namespace) -> int:
    from ...core.atomic import check_writable_dir, write_error_message
    from ...core.errors import ConfigError, DataError
    from ...core.paths import data_dir
    from .download import download_timeout
    from .omniglot import find_source, load_omniglot

    bad = [size for size in args.size if size < 1]
    if bad:
        raise ConfigError(f"--size must be a positive number of pixels, got {bad[0]}")
    timeout_s = download_timeout(args.timeout)  # a bad $METACL_DOWNLOAD_TIMEOUT is refused here
    root = data_dir(args.data_dir)
    for split in args.split:  # every missing split must be downloadable before any work starts
        if find_source(root, split) is None:
            target = root / "omniglot"
            hint = (
                f"Omniglot {split} is not in {root}, so it would be downloaded there; choose a "
                f"writable --data-dir (or $METACL_DATA_DIR), or place images_{split}.zip in it"
            )
            check_writable_dir(target, hint)
            try:  # the download creates it anyway; the kernel may refuse what os.access allowed
                target.mkdir(parents=True, exist_ok=True)
            except OSError as error:
                raise DataError(write_error_message(error, target, hint)) from None
    print(f"Omniglot data directory: {root}")
    for split in args.split:
        for size in args.size:
            start = time.perf_counter()
            images, _ = load_omniglot(split, size, root, quiet=args.quiet, timeout_s=timeout_s)
            print(
                f"{split:>10} {size:>3}px: {images.shape[0]} classes x {images.shape[1]} drawings, "
                f"ready in {time.perf_counter() - start:.1f}s"
            )
    return 0
