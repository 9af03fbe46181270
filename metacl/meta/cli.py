"""`metacl meta train|eval|report`: continual meta-learning (ANML, OML) on Omniglot."""
from __future__ import annotations

import argparse

from ..cli.common import add_run_arguments, launch


def add_commands(commands: argparse._SubParsersAction) -> None:
    meta = commands.add_parser("meta", help="continual meta-learning: train, evaluate, report")
    sub = meta.add_subparsers(dest="meta_command", required=True, metavar="ACTION")
    train = sub.add_parser("train", help="meta-train a model from a config (configs/meta/)")
    add_run_arguments(train)
    train.set_defaults(handler=lambda args: launch(args, "meta-train", args.config, args.overrides))
