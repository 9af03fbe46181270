"""Command-line pieces shared by every domain command that launches an experiment run (the
domain `cli` modules import them; the top-level `metacl.cli` only assembles the parser)."""

from __future__ import annotations

import argparse
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # the run module imports torch, which `metacl --help` should not wait for
    from .run import Mode


EXTEND_HELP = (
    "continue a finished (or stopped) run to a larger length given as overrides, e.g. "
    "train.episodes=7000 (meta-training); it ends as a run of that length from the start would"
)


def add_run_arguments(parser: argparse.ArgumentParser, config_help: str = "YAML config file") -> None:
    parser.add_argument("config", metavar="CONFIG", help=config_help)
    parser.add_argument(
        "overrides", nargs="*", metavar="key=value", help="dotted overrides of config values, e.g. seed=3 train.lr=1e-3"
    )
    add_mode_arguments(parser)


def add_mode_arguments(parser: argparse.ArgumentParser) -> None:
    mode = parser.add_mutually_exclusive_group()
    mode.add_argument(
        "--resume", action="store_true", help="continue the run in its directory from its last checkpoint"
    )
    mode.add_argument(
        "--overwrite", action="store_true", help="delete an existing run directory of the same name first"
    )
    mode.add_argument("--extend", action="store_true", help=EXTEND_HELP)
    parser.add_argument("--quiet", action="store_true", help="no progress bars")
    parser.add_argument(
        "--accept-data-change",
        action="store_true",
        help="with --resume: go on although the data differs from what the run trained on (recorded in its data.json)",
    )


def run_mode(args: argparse.Namespace) -> Mode:
    return "resume" if args.resume else "extend" if args.extend else "overwrite" if args.overwrite else "new"


def launch(args: argparse.Namespace, experiment: str, config_path: str | None, overrides: list[str]) -> int:
    """Load, validate and execute one experiment run; print where its results are."""
    from .experiment import execute, load_experiment_config

    overrides = list(overrides) + (["quiet=true"] if args.quiet else [])
    config = load_experiment_config(config_path, overrides, experiment)
    path, final = execute(config, run_mode(args), args.accept_data_change)
    summary = ", ".join(
        f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}"
        for k, v in final.items()
        if not isinstance(v, (list, dict))
    )
    print(f"run complete: {path}" + (f"  ({summary})" if summary else ""))
    return 0
