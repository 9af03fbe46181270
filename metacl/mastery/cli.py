"""`metacl mastery run|report`: the sequential-mastery benchmark (Davidson & Mozer 2020)."""

from __future__ import annotations

import argparse
import math
from pathlib import Path

from ..core.commands import add_run_arguments, launch


def add_commands(commands: argparse._SubParsersAction) -> None:
    mastery = commands.add_parser("mastery", help="sequential-mastery benchmark: run and report")
    sub = mastery.add_subparsers(dest="mastery_command", required=True, metavar="ACTION")
    run = sub.add_parser("run", help="train one condition from a config (configs/mastery/)")
    add_run_arguments(run)
    run.set_defaults(handler=_run)

    report = sub.add_parser("report", help="tables, plots and a summary from finished runs")
    report.add_argument("run_dirs", nargs="+", metavar="RUN_DIR", help="mastery run directories")
    report.add_argument("--out", default="mastery-report", help="folder for the report (default: ./mastery-report)")
    report.add_argument(
        "--fit-from", type=int, default=2, help="first episode of the power-law fit (default 2, as in the paper)"
    )
    report.set_defaults(handler=_report)


def _run(args: argparse.Namespace) -> int:
    """Launch the run as every experiment is launched, then show what it found."""
    from ..core.experiment import load_experiment_config

    config = load_experiment_config(args.config, args.overrides, "mastery")
    code = launch(args, "mastery", args.config, args.overrides)
    path = Path(config.out_dir) / config.name
    print(run_summary(path, config.train.criterion))
    return code


def run_summary(path: Path, criterion: float) -> str:
    """The run's trials-to-criterion table (and its forgetting tasks), where the run directory
    is, and how to make the report."""
    import pandas as pd

    from ..scenes.features import FEATURES

    def name(task) -> str:
        return f"{FEATURES[int(task)]} ({int(task)})"

    def number(value, digits: int = 0) -> str:
        return "-" if value is None or (isinstance(value, float) and math.isnan(value)) else f"{value:,.{digits}f}"

    lines = []
    table = path / "criterion.parquet"
    frame = pd.read_parquet(table) if table.is_file() else pd.DataFrame()
    if len(frame):
        simultaneous = not frame["is_new"].any()
        rows = frame if simultaneous else frame[frame["is_new"]]
        which = "every task, trained together" if simultaneous else "the new task of each episode"
        lines += [
            "",
            f"Trials to criterion (test accuracy > {criterion:g}; {which}):",
            f"  {'episode':>7}  {'task':<20} {'epochs':>6}  {'trials':>10}  outcome",
        ]
        for row in rows.itertuples():
            outcome = ("passed" if row.episode_passed else "cut short") + f" after {int(row.episode_epochs)} epochs"
            lines.append(
                f"  {int(row.episode):>7}  {name(row.task):<20} "
                f"{number(row.epochs_to_criterion):>6}  "
                f"{number(row.trials_to_criterion):>10}  {outcome}"
            )
        missed = int((~frame["reached"]).sum())
        if missed:
            lines.append(f"  ('-': not reached; {missed} of {len(frame)} episode x task rows never passed)")
    forgetting_path = path / "forgetting.parquet"
    forgetting = pd.read_parquet(forgetting_path) if forgetting_path.is_file() else pd.DataFrame()
    if len(forgetting):
        new = forgetting[forgetting["is_new"]].sort_values("subepoch")
        lines += [
            "",
            "Forgetting (the new task trained alone from the baseline's weights):",
            f"  {'after episode':>13}  {'new task':<20} {'sub-epochs':>10}  "
            f"{'new acc':>7}  {'older acc before -> after':>25}",
        ]
        for after, rows in new.groupby("after_episode"):
            older = forgetting[(forgetting["after_episode"] == after) & ~forgetting["is_new"]]
            first, last = older["subepoch"].min(), older["subepoch"].max()
            before = older[older["subepoch"] == first]["test_acc"].mean()
            end = older[older["subepoch"] == last]["test_acc"].mean()
            lines.append(
                f"  {int(after):>13}  {name(rows['task'].iloc[0]):<20} "
                f"{int(rows['subepoch'].max()):>10}  {rows['test_acc'].iloc[-1]:>7.3f}  "
                f"{number(before, 3):>12} -> {number(end, 3)}"
            )
    lines += [
        "",
        f"Run directory: {path}",
        f"Report (tables, plots, power-law fit): metacl mastery report {path} "
        f"--out {path.parent / (path.name + '-report')}",
    ]
    return "\n".join(lines)


def _report(args: argparse.Namespace) -> int:
    from .report import write_report

    out = write_report(args.run_dirs, args.out, args.fit_from)
    print(f"report written: {out}/summary.md")
    print((out / "summary.md").read_text(), end="")
    return 0
