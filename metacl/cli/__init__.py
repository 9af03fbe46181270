"""The `metacl` command line. Each domain package adds its own commands in its `cli` module."""

from __future__ import annotations

import argparse
import sys

from .. import __version__
from ..core.errors import MetaclError, RunDiverged, RunInterrupted

EXIT_USER_ERROR = 2
EXIT_DIVERGED = 3
EXIT_INTERRUPTED = 130


def build_parser() -> argparse.ArgumentParser:
    from ..launch import cli as launch_cli
    from ..mastery import cli as mastery_cli
    from ..meta import cli as meta_cli
    from ..meta.data import cli as meta_data_cli
    from ..scenes import cli as scenes_cli
    from . import config_cli

    parser = argparse.ArgumentParser(
        prog="metacl", description="Continual-learning and meta-learning research on visual tasks."
    )
    parser.add_argument("--version", action="version", version=f"metacl {__version__}")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    data = commands.add_parser("data", help="generate, download and preview datasets")
    data_commands = data.add_subparsers(dest="data_command", required=True, metavar="DATASET")
    scenes_cli.add_commands(data_commands)
    meta_data_cli.add_commands(data_commands)

    mastery_cli.add_commands(commands)
    meta_cli.add_commands(commands)
    launch_cli.add_commands(commands)
    config_cli.add_commands(commands)
    return parser


def parse(parser: argparse.ArgumentParser, argv: list[str] | None) -> argparse.Namespace:
    """Parse with `key=value` overrides allowed anywhere after the config, flags mixed in
    (`metacl mastery run CONFIG --resume train.lr=0.01`)."""
    args, extra = parser.parse_known_args(argv)
    if extra:
        overrides = [a for a in extra if "=" in a and not a.startswith("-")]
        unknown = [a for a in extra if a not in overrides]
        if unknown or not isinstance(getattr(args, "overrides", None), list):
            parser.error(f"unrecognized arguments: {' '.join(unknown or extra)}")
        args.overrides = [*args.overrides, *overrides]
    return args


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parse(parser, argv)
    try:
        return args.handler(args) or 0
    except RunInterrupted as error:
        print(f"interrupted: {error}", file=sys.stderr)
        return EXIT_INTERRUPTED
    except RunDiverged as error:
        print(f"diverged: {error}", file=sys.stderr)
        return EXIT_DIVERGED
    except MetaclError as error:
        print(f"error: {error}", file=sys.stderr)
        return EXIT_USER_ERROR
    except OSError as error:  # the environment: a read-only folder, a full disk, a missing file
        where = f"{error.filename}: " if error.filename else ""
        print(f"error: {where}{error.strerror or error}", file=sys.stderr)
        return EXIT_USER_ERROR
    except KeyboardInterrupt:
        return EXIT_INTERRUPTED
