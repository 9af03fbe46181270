"""`metacl mastery report`: tidy tables, plots and a summary from one or more mastery runs.

Trials to criterion are aggregated across runs by geometric mean (they are ratio-scaled and
roughly log-normal). The learning curve is fitted as a power law, log10 trials = a + b log10
episode, by least squares over every run's new-task points, with a t-based 95% CI on the slope.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import yaml

from ..core import atomic
from ..core.errors import DataError
from ..core.plots import pyplot, save_figure
from ..core.stats import t_quantile


@dataclass
class PowerLaw:
    slope: float
    intercept: float
    slope_ci_low: float
    slope_ci_high: float
    r_squared: float
    points: int
    from_episode: int


def geomean(values: pd.Series) -> float:
    values = values.dropna()
    values = values[values > 0]
    return float(np.exp(np.log(values).mean())) if len(values) else math.nan


PAPER_SLOPES = {"new_task": -0.447, "relearning": -1.603}
"""The authors' analysis notebook (Davidson & Mozer, CVPR 2020), log-log fits on 10-task sequences:
new-task trials against episode, and trials against times trained. Slopes do not depend on the
log base (the paper's intercepts, 12.3 and 11.71, are natural-log; divide by ln 10 for log10)."""


def fit_power_law(points: pd.DataFrame, from_episode: int = 1, x_column: str = "episode") -> PowerLaw | None:
    """Least-squares fit of log10(trials_to_criterion) on log10(x_column) for rows whose x_column
    is at least `from_episode`."""
    points = points[(points[x_column] >= from_episode) & (points["trials_to_criterion"] > 0)]
    points = points.dropna(subset=["trials_to_criterion"])
    if points[x_column].nunique() < 2:
        return None
    x = np.log10(points[x_column].to_numpy(float))
    y = np.log10(points["trials_to_criterion"].to_numpy(float))
    slope, intercept = np.polyfit(x, y, 1)
    residuals = y - (intercept + slope * x)
    total = ((y - y.mean()) ** 2).sum()
    r_squared = 1 - (residuals**2).sum() / total if total > 0 else 1.0
    dof = len(x) - 2
    if dof > 0:
        stderr = math.sqrt((residuals**2).sum() / dof / ((x - x.mean()) ** 2).sum())
        half = t_quantile(0.95, dof) * stderr
    else:
        half = math.nan
    return PowerLaw(
        float(slope), float(intercept), float(slope - half), float(slope + half), float(r_squared), len(x), from_episode
    )


def read_runs(run_dirs: list[str | Path]) -> dict[str, pd.DataFrame]:
    """Concatenate the tables of every run, tagged with run name, condition, model and seed."""
    frames: dict[str, list[pd.DataFrame]] = {"criterion": [], "epochs": [], "tests": [], "forgetting": []}
    names: set[str] = set()
    for run_dir in map(Path, run_dirs):
        config_path = run_dir / "config.yaml"
        if not config_path.is_file():
            raise DataError(f"{run_dir} is not a run directory (no config.yaml)")
        config = yaml.safe_load(config_path.read_text()) or {}
        if config.get("experiment") != "mastery":
            raise DataError(f"{run_dir} is a {config.get('experiment')!r} run, not a mastery run")
        name = run_dir.name if run_dir.name not in names else str(run_dir)
        names.add(name)
        tags = {
            "run": name,
            "condition": config["tasks"]["condition"],
            "model": config["model"]["name"],
            "seed": config["seed"],
        }
        found = False
        for table in frames:
            path = run_dir / f"{table}.parquet"
            if path.is_file():
                frame = pd.read_parquet(path)
                if len(frame):
                    found = True
                    frames[table].append(frame.assign(**tags))
        if not found:
            raise DataError(f"{run_dir} has no mastery tables yet (has it run an epoch?)")
    return {table: pd.concat(parts, ignore_index=True) if parts else pd.DataFrame() for table, parts in frames.items()}


def new_task_trials(criterion: pd.DataFrame) -> pd.DataFrame:
    new = criterion[criterion["is_new"]]
    return (
        new.groupby("episode")["trials_to_criterion"]
        .agg(runs="count", geomean=geomean, min="min", max="max")
        .reset_index()
    )


def relearning_trials(criterion: pd.DataFrame) -> pd.DataFrame:
    seq = criterion[criterion["condition"] != "simultaneous"]
    return seq.groupby("times_trained")["trials_to_criterion"].agg(points="count", geomean=geomean).reset_index()


def forgetting_curves(forgetting: pd.DataFrame) -> pd.DataFrame:
    """Mean test accuracy by times trained and trials of the new task alone (trials 0: the test
    before the first sub-epoch), over every forgetting task of every run."""
    return forgetting.groupby(["times_trained", "trials"])["test_acc"].mean().reset_index()


def forgetting_ends(forgetting: pd.DataFrame) -> pd.DataFrame:
    """Per times trained: mean test accuracy before the first sub-epoch (sub-epoch 0; NaN for
    runs that did not record it) and at the last sub-epoch of each forgetting task."""
    keys = ["run", "after_episode"]
    last = forgetting["subepoch"] == forgetting.groupby(keys)["subepoch"].transform("max")
    before = forgetting[forgetting["subepoch"] == 0].groupby("times_trained")["test_acc"].mean()
    end = forgetting[last].groupby("times_trained")["test_acc"].agg(["mean", "count"])
    return pd.DataFrame(
        {
            "times_trained": end.index,
            "before": before.reindex(end.index).values,
            "end": end["mean"].values,
            "points": end["count"].values,
        }
    )


def forgetting_tasks(forgetting: pd.DataFrame) -> pd.DataFrame:
    """One row per forgetting task: sub-epochs it ran and the new task's final test accuracy."""
    new = forgetting[forgetting["is_new"]].sort_values("subepoch")
    return (
        new.groupby(["run", "after_episode"])
        .agg(subepochs=("subepoch", "max"), trials=("trials", "max"), new_task_acc=("test_acc", "last"))
        .reset_index()
    )


def write_report(run_dirs: list[str | Path], out_dir: str | Path, fit_from: int = 2) -> Path:
    """Write tables (CSV), plots (PNG) and summary.md for `run_dirs` into `out_dir`."""
    plt = pyplot()

    tables = read_runs(run_dirs)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    criterion, epochs, forgetting = tables["criterion"], tables["epochs"], tables["forgetting"]
    written: dict[str, pd.DataFrame] = {"epochs": epochs, "tests": tables["tests"], "criterion": criterion}
    fit = None
    if len(criterion):
        per_episode = new_task_trials(criterion)
        written["new_task_trials"] = per_episode
        written["relearning_trials"] = relearning_trials(criterion)
        sequential = criterion[criterion["is_new"]]
        fit = fit_power_law(sequential, fit_from) if len(sequential) else None
        seq = criterion[criterion["condition"] != "simultaneous"]
        relearning = fit_power_law(seq, 1, "times_trained") if len(seq) else None
        fits = [
            {"finding": n, **f.__dict__, "paper_slope": PAPER_SLOPES[n]}
            for n, f in (("new_task", fit), ("relearning", relearning))
            if f is not None
        ]
        if fits:
            written["power_law_fit"] = pd.DataFrame(fits)
    if len(forgetting):
        written["forgetting"] = forgetting
        written["forgetting_curves"] = forgetting_curves(forgetting)
        written["forgetting_ends"] = forgetting_ends(forgetting)
        written["forgetting_tasks"] = forgetting_tasks(forgetting)
    for name, frame in written.items():
        if len(frame):
            with atomic.atomic_path(out / f"{name}.csv") as tmp:
                frame.to_csv(tmp, index=False)

    plots = []
    if len(criterion) and criterion["is_new"].any():
        plots.append(_plot_trials(plt, criterion, written["new_task_trials"], fit, out / "trials_to_criterion.png"))
        plots.append(_plot_relearning(plt, criterion, out / "relearning.png"))
    if len(tables["tests"]):  # train.test_every_trials: test points within epochs, epoch ends included
        plots.append(_plot_accuracy(plt, tables["tests"], out / "accuracy_curves.png"))
    elif len(epochs):
        plots.append(_plot_accuracy(plt, epochs, out / "accuracy_curves.png"))
    if len(forgetting):
        plots.append(_plot_forgetting(plt, written["forgetting_curves"], out / "forgetting.png"))
    atomic.write_text(out / "summary.md", _summary(run_dirs, written, fit, plots))
    return out


def _save(fig, path: Path) -> str:
    return save_figure(fig, path).name


def _plot_trials(plt, criterion, per_episode, fit, path):
    fig, ax = plt.subplots(figsize=(5.5, 4))
    for _, run in criterion[criterion["is_new"]].groupby("run"):
        ax.plot(run["episode"], run["trials_to_criterion"], color="0.75", lw=0.8, marker=".")
    ax.plot(per_episode["episode"], per_episode["geomean"], "o-", color="C0", label="new task (geometric mean)")
    old = criterion[~criterion["is_new"]]
    if len(old):
        old_mean = old.groupby("episode")["trials_to_criterion"].agg(geomean).reset_index()
        ax.plot(
            old_mean["episode"],
            old_mean["trials_to_criterion"],
            "s--",
            color="C1",
            label="earlier tasks (geometric mean)",
        )
    if fit is not None:
        xs = np.arange(fit.from_episode, per_episode["episode"].max() + 1)
        ax.plot(
            xs,
            10 ** (fit.intercept + fit.slope * np.log10(xs)),
            color="C3",
            label=f"fit: slope {fit.slope:.2f} [{fit.slope_ci_low:.2f}, {fit.slope_ci_high:.2f}]",
        )
    ax.set(
        xscale="log",
        yscale="log",
        xlabel="episode (number of tasks)",
        ylabel="trials to criterion",
        title="Trials to criterion",
    )
    ax.legend(fontsize=8)
    return _save(fig, path)


def _plot_relearning(plt, criterion, path):
    fig, ax = plt.subplots(figsize=(5.5, 4))
    seq = criterion[criterion["condition"] != "simultaneous"]
    for episode, group in seq.groupby("episode"):
        line = group.groupby("times_trained")["trials_to_criterion"].agg(geomean)
        ax.plot(line.index, line.values, marker="o", lw=1, label=f"episode {episode}")
    ax.set(
        xscale="log",
        yscale="log",
        xlabel="times trained (including this episode)",
        ylabel="trials to criterion",
        title="Learning and relearning",
    )
    ax.legend(fontsize=7, ncol=2)
    return _save(fig, path)


def _plot_accuracy(plt, points, path):
    """Test accuracy of every task against cumulative trials, per run: the `epochs` table (one
    point per epoch) or the finer `tests` table."""
    runs = list(points["run"].unique())[:4]
    fig, axes = plt.subplots(len(runs), 1, figsize=(7, 2.6 * len(runs)), squeeze=False)
    for ax, name in zip(axes[:, 0], runs):
        run = points[points["run"] == name]
        for task, group in run.groupby("task"):
            position = f" (pos {int(group['position'].iloc[0])})" if "position" in group else ""
            ax.plot(group["cumulative_trials"], group["test_acc"], lw=1, label=f"task {task}{position}")
        ax.axhline(0.95, color="0.5", ls=":", lw=0.8)
        ax.set(xlabel="cumulative trials", ylabel="test accuracy", title=name, ylim=(0.4, 1.01))
        ax.legend(fontsize=6, ncol=5, loc="lower right")
    fig.tight_layout()
    return _save(fig, path)


def _plot_forgetting(plt, curves, path):
    fig, ax = plt.subplots(figsize=(5.5, 4))
    for times, group in curves.groupby("times_trained"):
        label = "new task" if times == 0 else f"trained {times}x"
        ax.plot(group["trials"], group["test_acc"], lw=1.2, label=label)
    ax.set(xlabel="trials of the new task alone", ylabel="test accuracy", title="Forgetting by times trained")
    ax.legend(fontsize=7)
    return _save(fig, path)


def _summary(run_dirs, written, fit, plots) -> str:
    lines = ["# Sequential-mastery report", "", f"Runs: {len(run_dirs)}", ""]
    per_episode = written.get("new_task_trials")
    if per_episode is not None and len(per_episode):
        lines += [
            "## New-task trials to criterion (geometric mean over runs)",
            "",
            "| episode | runs | geometric mean | min | max |",
            "|---|---|---|---|---|",
        ]
        for row in per_episode.itertuples():
            lines.append(f"| {row.episode} | {row.runs} | {row.geomean:.0f} | {row.min:.0f} | {row.max:.0f} |")
        lines.append("")
        if fit is not None:
            lines += [
                f"Power-law fit from episode {fit.from_episode} ({fit.points} points): "
                f"log10 trials = {fit.intercept:.3f} {fit.slope:+.3f} log10 episode, "
                f"slope 95% CI [{fit.slope_ci_low:.3f}, {fit.slope_ci_high:.3f}], "
                f"R^2 {fit.r_squared:.3f}. "
                + (
                    "New tasks get faster to learn (negative slope)."
                    if fit.slope_ci_high < 0
                    else "The CI does not exclude a flat or rising curve."
                ),
                "",
            ]
    fits = written.get("power_law_fit")
    if fits is not None and len(fits):
        lines += [
            "## Compared with the paper",
            "",
            "Log-log power-law slopes, ours with a 95% CI, beside the authors' (10-task sequences; "
            "new-task trials against episode, and every task's trials against the times it has been "
            "trained, this episode included):",
            "",
            "| finding | ours | 95% CI | points | paper |",
            "|---|---|---|---|---|",
        ]
        for row in fits.itertuples():
            lines.append(
                f"| {row.finding.replace('_', ' ')} | {row.slope:.3f} | [{row.slope_ci_low:.3f}, "
                f"{row.slope_ci_high:.3f}] | {row.points} | {row.paper_slope:.3f} |"
            )
        lines.append("")
    criterion = written.get("criterion")
    if criterion is not None and len(criterion):
        missed = criterion[~criterion["reached"]]
        lines += [f"Episodes x tasks that never reached criterion: {len(missed)} of {len(criterion)}.", ""]
    ends = written.get("forgetting_ends")
    if ends is not None and len(ends):
        tasks = written["forgetting_tasks"]
        lines += [
            "## Forgetting",
            "",
            f"{len(tasks)} forgetting tasks (after episodes "
            f"{', '.join(str(int(e)) for e in sorted(tasks['after_episode'].unique()))}); "
            f"mean test accuracy by times trained (0 = the new task), before the first "
            f"sub-epoch and at each task's last:",
            "",
            "| times trained | before | at the end | points |",
            "|---|---|---|---|",
        ]
        lines += [
            f"| {int(r.times_trained)} | {r.before:.3f} | {r.end:.3f} | {int(r.points)} |" for r in ends.itertuples()
        ]
        lines.append("")
    lines += [
        "## Files",
        "",
        *[f"- {name}.csv" for name, f in written.items() if len(f)],
        *[f"- {p}" for p in plots],
        "",
    ]
    return "\n".join(lines)
