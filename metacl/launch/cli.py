"""`metacl sweep` and `metacl runs ls|compare`: many runs, locally or on Slurm."""

from __future__ import annotations

import argparse
import math
from typing import Any


def add_commands(commands: argparse._SubParsersAction) -> None:
    sweep = commands.add_parser(
        "sweep",
        help="run a grid of configs x seeds, locally or on Slurm",
        description="Expand CONFIG (an experiment config, or a sweep file like "
        "configs/sweeps/*.yaml) into one run per grid point and seed, under "
        "<out_dir>/<sweep name>/<key=value,...,seed=N>. Launching the same sweep "
        "again skips complete runs and resumes the others.",
    )
    sweep.add_argument("config", metavar="CONFIG", help="experiment config or sweep file")
    sweep.add_argument(
        "overrides",
        nargs="*",
        metavar="key=value",
        help="overrides applied to every run (right after CONFIG), e.g. train.lr=1e-3",
    )
    sweep.add_argument(
        "--grid",
        action="append",
        default=[],
        metavar="KEY=V1,V2",
        help="a swept key and its values (repeat for a product grid)",
    )
    sweep.add_argument("--seeds", help="seeds for every grid point: 0-9, 0-4,10 or 3")
    sweep.add_argument("--name", help="sweep folder name (default: the config file's name)")
    sweep.add_argument("--out-dir", help="parent of the sweep folder (default: the config's out_dir)")
    sweep.add_argument("--launcher", choices=["local", "slurm"])
    sweep.add_argument(
        "--dry-run",
        action="store_true",
        help="validate and list the runs and what would happen to each; launch nothing",
    )
    local = sweep.add_argument_group("local launcher")
    local.add_argument("--workers", type=int, help="runs at once (default: GPU slots or CPU cores)")
    local.add_argument("--threads", type=int, help="CPU threads per run")
    local.add_argument("--gpus", help="GPU indices to use, e.g. 0,1 (default: all)")
    local.add_argument("--runs-per-gpu", type=int, help="runs sharing one GPU")
    local.add_argument(
        "--gpu-memory-gb", type=float, help="GPU memory budget per run (sets runs per GPU and caps each run)"
    )
    slurm = sweep.add_argument_group("slurm launcher")
    slurm.add_argument("--partition")
    slurm.add_argument("--time-min", type=int, help="time limit per job in minutes")
    slurm.add_argument("--cpus-per-task", type=int)
    slurm.add_argument("--gpus-per-task", type=int)
    slurm.add_argument("--mem-gb", type=float)
    slurm.add_argument("--array-parallelism", type=int)
    slurm.add_argument("--wait", action="store_true", help="wait for the jobs and report")
    sweep.set_defaults(handler=_sweep)

    runs = commands.add_parser("runs", help="list and compare runs (e.g. a sweep's)")
    sub = runs.add_subparsers(dest="runs_command", required=True, metavar="ACTION")
    ls = sub.add_parser("ls", help="table of runs: name, status, swept config values, final metrics")
    ls.add_argument("directory", metavar="DIR")
    ls.add_argument("--keys", help="config keys to show (default: those that vary)")
    ls.add_argument("--csv", action="store_true", help="print CSV instead of a table")
    ls.set_defaults(handler=_ls)
    compare = sub.add_parser("compare", help="group runs by config keys: mean and confidence interval")
    compare.add_argument("directory", metavar="DIR")
    compare.add_argument("--by", required=True, help="config keys to group by, e.g. train.lr,model.name")
    compare.add_argument(
        "--metric",
        action="append",
        default=[],
        help="final metric, or TABLE:COLUMN for a table's last row (default: all final metrics)",
    )
    compare.add_argument("--confidence", type=float, default=0.95)
    compare.add_argument("--csv", action="store_true", help="print CSV instead of a table")
    compare.set_defaults(handler=_compare)


# ---------------------------------------------------------------------------------- sweep
def _sweep(args: argparse.Namespace) -> int:
    from ..core.config import from_dict, to_dict
    from . import sweep as sweeps

    if sweeps.is_sweep_file(args.config):
        spec = sweeps.read_sweep_file(args.config)
    else:
        spec = sweeps.SweepConfig(config=args.config)
    data = to_dict(spec)
    data["overrides"] = [*data["overrides"], *args.overrides]
    for option in args.grid:
        key, values = sweeps.parse_grid_option(option)
        data["grid"][key] = values
    fields = {"seeds": args.seeds, "name": args.name, "out_dir": args.out_dir, "launcher": args.launcher}
    data.update({k: v for k, v in fields.items() if v is not None})
    local = {
        "workers": args.workers,
        "threads": args.threads,
        "runs_per_gpu": args.runs_per_gpu,
        "gpu_memory_gb": args.gpu_memory_gb,
        "gpus": [int(g) for g in args.gpus.split(",")] if args.gpus else None,
    }
    data["local"].update({k: v for k, v in local.items() if v is not None})
    slurm = {
        "partition": args.partition,
        "time_min": args.time_min,
        "cpus_per_task": args.cpus_per_task,
        "gpus_per_task": args.gpus_per_task,
        "mem_gb": args.mem_gb,
        "array_parallelism": args.array_parallelism,
    }
    data["slurm"].update({k: v for k, v in slurm.items() if v is not None})
    sweep = sweeps.expand(from_dict(sweeps.SweepConfig, data))

    if args.dry_run:
        from ..core.rundir import read_status

        sweeps.check_existing(sweep)
        print(f"sweep {sweep.directory}: {len(sweep.runs)} runs, launcher {sweep.spec.launcher}")
        for run in sweep.runs:
            status = read_status(run.path)["status"]
            action = {"complete": "skip (complete)", "missing": "start"}.get(status, f"resume ({status})")
            print(f"  {run.name}: {action}")
        return 0
    result = sweeps.launch(sweep, wait=sweep.spec.launcher == "local" or args.wait)
    if isinstance(result, list):
        print(f"{len(result)} runs queued or running; follow them with: metacl runs ls {sweep.directory}")
        return 0
    print(result.format())
    return 1 if result.failed else 0


# ----------------------------------------------------------------------------------- runs
def _ls(args: argparse.Namespace) -> int:
    from .runs import load_runs, metric_names, sweep_keys, varying_keys

    frame = load_runs(args.directory)
    keys = args.keys.split(",") if args.keys else varying_keys(frame, sweep_keys(args.directory))
    columns = ["name", "status", *(f"config.{k}" for k in keys), *(f"final.{m}" for m in metric_names(frame))]
    missing = [c for c in columns if c not in frame]
    if missing:
        from ..core.errors import ConfigError

        raise ConfigError(f"--keys: no such config key {missing[0][7:]!r}")
    table = frame[columns].rename(columns=lambda c: c.split(".", 1)[1] if "." in c else c)
    if args.csv:
        print(table.to_csv(index=False), end="")
        return 0
    print(_text(table))
    for _, row in frame[frame["status"] != "complete"].iterrows():
        if row["error"]:
            print(f"{row['status']}: {row['name']}: {row['error']}")
    return 0


def _compare(args: argparse.Namespace) -> int:
    from .runs import compare, load_runs, metric_names

    frame = load_runs(args.directory)
    by = [k for k in args.by.split(",") if k]
    metrics = [m for option in args.metric for m in option.split(",") if m] or metric_names(frame)
    table = compare(frame, by, metrics, args.confidence)
    excluded = int((frame["status"] != "complete").sum())
    if args.csv:
        print(table.to_csv(index=False), end="")
        return 0
    shown = table[[*by, "n"]].copy()
    for metric in metrics:
        shown[metric] = [_mean_ci(m, c) for m, c in zip(table[f"{metric}.mean"], table[f"{metric}.ci"])]
    print(_text(shown))
    print(
        f"mean ± {args.confidence:.0%} confidence interval (Student t) over complete runs"
        + (f"; {excluded} runs not complete were left out" if excluded else "")
    )
    return 0


def _mean_ci(mean: float, ci: float) -> str:
    if math.isnan(mean):
        return "-"
    return f"{mean:.4g}" if math.isnan(ci) else f"{mean:.4g} ± {ci:.2g}"


def _text(table: Any) -> str:
    return table.to_string(index=False, na_rep="-", float_format=lambda v: f"{v:.4g}")
