"""`metacl meta train|eval|report|reproduce`: continual meta-learning (ANML, OML) on Omniglot."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from ..core.commands import EXTEND_HELP, add_mode_arguments, add_run_arguments, launch


def add_commands(commands: argparse._SubParsersAction) -> None:
    meta = commands.add_parser("meta", help="continual meta-learning: train, evaluate, report")
    sub = meta.add_subparsers(dest="meta_command", required=True, metavar="ACTION")
    train = sub.add_parser("train", help="meta-train a model from a config (configs/meta/)")
    add_run_arguments(train)
    train.set_defaults(handler=lambda args: launch(args, "meta-train", args.config, args.overrides))

    evaluate = sub.add_parser("eval", help="meta-test a checkpoint: LR x runs x class-count sweeps")
    evaluate.add_argument(
        "checkpoint", metavar="CHECKPOINT|RUN_DIR", help="a model checkpoint (.pt) or a meta-train run directory"
    )
    # REMAINDER, re-parsed intermixed in _evaluate, so options may also follow the overrides
    evaluate.add_argument(
        "overrides",
        nargs=argparse.REMAINDER,
        metavar="key=value",
        help="dotted overrides, e.g. protocol.classes=[10,600] protocol.runs=3",
    )
    _eval_options(evaluate)
    evaluate.set_defaults(handler=_evaluate)

    report = sub.add_parser("report", help="summarise meta-eval results: tables, plots, markdown")
    report.add_argument(
        "results", nargs="+", metavar="RESULTS", help="meta-eval run directories or their results.parquet files"
    )
    report.add_argument("--out", required=True, metavar="DIR", help="folder for the report files")
    report.set_defaults(handler=_report)

    reproduce = sub.add_parser(
        "reproduce", help="meta-train (or resume), meta-test honestly, report beside the published numbers"
    )
    reproduce.add_argument("config", metavar="CONFIG", help="meta-train config, e.g. configs/meta/laptop/anml.yaml")
    reproduce.add_argument(
        "overrides", nargs="*", metavar="key=value", help="dotted overrides of the meta-train config"
    )
    reproduce.add_argument(
        "--eval-config",
        metavar="FILE",
        help="meta-eval config (default: the ANML protocol, configs/meta/eval/anml.yaml)",
    )
    reproduce.add_argument(
        "--eval",
        action="append",
        default=[],
        metavar="key=value",
        help="override of the meta-eval config, e.g. --eval protocol.runs=3 (repeatable)",
    )
    reproduce.add_argument(
        "--curve-runs",
        type=int,
        default=3,
        metavar="N",
        help="runs per meta-test of each model saved at eval_steps (the learning curve); 0: no curve",
    )
    reproduce.add_argument(
        "--curve-classes", default="100,600", metavar="N,N", help="class counts of the learning curve (default 100,600)"
    )
    reproduce.add_argument("--extend", action="store_true", help=EXTEND_HELP)
    reproduce.add_argument("--quiet", action="store_true", help="no progress bars")
    reproduce.set_defaults(handler=_reproduce)


def _eval_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--config",
        metavar="FILE",
        help="meta-eval config (configs/meta/eval/); default: the ANML protocol with the reference sweep",
    )
    add_mode_arguments(parser)


def _evaluate(args: argparse.Namespace) -> int:
    rest = argparse.ArgumentParser(prog="metacl meta eval CHECKPOINT|RUN_DIR")
    rest.add_argument("overrides", nargs="*", metavar="key=value")
    _eval_options(rest)
    defaults = {k: getattr(args, k) for k in ("config", "resume", "extend", "overwrite", "quiet", "accept_data_change")}
    rest.set_defaults(**defaults)
    known = argparse.Namespace(**{k: v for k, v in vars(args).items() if k != "overrides"})
    args = rest.parse_intermixed_args(args.overrides, namespace=known)
    checkpoint = str(Path(args.checkpoint).expanduser().resolve())
    overrides = [f"checkpoint={json.dumps(checkpoint)}", *args.overrides]
    return launch(args, "meta-eval", args.config, overrides)


def _report(args: argparse.Namespace) -> int:
    from .eval.report import write_report

    files = write_report(args.results, args.out)
    print("\n".join(f"{name}: {path}" for name, path in files.items()))
    return 0


def _reproduce(args: argparse.Namespace) -> int:
    from ..core.config import ConfigError
    from ..core.experiment import load_experiment_config
    from .reproduce import Reproduction

    try:
        curve_classes = [int(c) for c in args.curve_classes.split(",")]
    except ValueError:
        raise ConfigError(f"--curve-classes {args.curve_classes!r}: give class counts like 100,600") from None
    if args.curve_runs < 0 or min(curve_classes) < 1:
        raise ConfigError("--curve-runs must be >= 0 and --curve-classes positive")
    overrides = list(args.overrides) + (["quiet=true"] if args.quiet else [])
    config = load_experiment_config(args.config, overrides, "meta-train")
    files = Reproduction(config, args.eval_config, args.eval, args.curve_runs, curve_classes, args.extend).run()
    print("\n".join(f"{name}: {path}" for name, path in files.items()))
    return 0
