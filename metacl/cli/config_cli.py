"""`metacl config describe|show`: what every config key means, and what a config resolves to."""

from __future__ import annotations

import argparse


def add_commands(commands: argparse._SubParsersAction) -> None:
    config = commands.add_parser("config", help="describe config keys or show a resolved config")
    sub = config.add_subparsers(dest="config_command", required=True, metavar="ACTION")

    describe = sub.add_parser("describe", help="list every key of an experiment's config")
    describe.add_argument("experiment", help="mastery, meta-train or meta-eval")
    describe.add_argument(
        "overrides",
        nargs="*",
        metavar="key=value",
        help="values that choose sections, e.g. algorithm=iid for meta-train",
    )
    describe.set_defaults(handler=_describe)

    show = sub.add_parser("show", help="print a config file resolved with overrides, validated")
    show.add_argument("config", metavar="CONFIG")
    show.add_argument("overrides", nargs="*", metavar="key=value")
    show.set_defaults(handler=_show)


def _describe(args: argparse.Namespace) -> int:
    from ..core.config import apply_overrides, describe, from_dict
    from ..core.experiment import experiment_module

    cls = experiment_module(args.experiment).Config
    instance = from_dict(cls, apply_overrides({}, args.overrides))
    for key, type_name, default, doc in describe(cls, instance=instance):
        print(f"{key}: {type_name} = {default!r}\n    {doc}")
    return 0


def _show(args: argparse.Namespace) -> int:
    from ..core.config import to_yaml
    from ..core.experiment import load_experiment_config

    print(to_yaml(load_experiment_config(args.config, args.overrides)), end="")
    return 0
