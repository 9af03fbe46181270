"""`metacl mastery run|report`: the sequential-mastery benchmark (Davidson & Mozer 2020)."""
from __future__ import annotations

import argparse

from ..cli.common import add_run_arguments, launch


def add_commands(commands: argparse._SubParsersAction) -> None:
    mastery = commands.add_parser("mastery", help="sequential-mastery benchmark: run and report")
    sub = mastery.add_subparsers(dest="mastery_command", required=True, metavar="ACTION")
    run = sub.add_parser("run", help="train one condition from a config (configs/mastery/)")
    add_run_arguments(run)
    run.set_defaults(handler=lambda args: launch(args, "mastery", args.config, args.overrides))
