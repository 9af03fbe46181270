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

    report = sub.add_parser("report", help="tables, plots and a summary from finished runs")
    report.add_argument("run_dirs", nargs="+", metavar="RUN_DIR", help="mastery run directories")
    report.add_argument("--out", default="mastery-report",
                        help="folder for the report (default: ./mastery-report)")
    report.add_argument("--fit-from", type=int, default=2,
                        help="first episode of the power-law fit (default 2, as in the paper)")
    report.set_defaults(handler=_report)


def _report(args: argparse.Namespace) -> int:
    from .report import write_report
    out = write_report(args.run_dirs, args.out, args.fit_from)
    print(f"report written: {out}/summary.md")
    print((out / "summary.md").read_text(), end="")
    return 0
