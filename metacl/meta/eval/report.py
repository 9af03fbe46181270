"""Summaries, learning-rate selection and plots of meta-test results (`metacl meta report`).

Selection is per class count. "validation" picks the LR with the best mean final test-image
accuracy on the held-out meta-training classes (the `val` split), then reports the meta-test
(`test` split) at that LR: an honest estimate. "best-on-test" picks the LR on the meta-test
itself, as the reference did; it is optimistic and reported only to compare with published numbers.
"""
from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pandas as pd

from ...core.atomic import atomic_path, write_text
from ...core.errors import ConfigError
from ...core.stats import t_quantile

KEYS = ["model", "dataset", "eval_method", "reinit_method", "reinit_params", "opt_params",
        "train_examples", "test_examples"]
"""Columns that identify one evaluation setting."""
REQUIRED = KEYS + ["split", "classes", "lr", "trial", "classes_trained", "class_id", "train_acc", "test_acc"]


def ci95(std: pd.Series | float, n: pd.Series | int) -> pd.Series | float:
    """Half-width of the 95% confidence interval of a mean of n runs (Student t)."""
    def t(count: int) -> float:
        return float("nan") if count < 2 else t_quantile(0.95, count - 1)
    if isinstance(n, pd.Series):
        return std * n.map(t) / np.sqrt(n)
    return std * t(n) / math.sqrt(n)


RESULT_FILES = ("results.parquet", "meta_test.parquet")
"""A run directory's results: a meta-eval run's, or the meta-tests of a meta-train run's eval_steps."""


def read_results(paths: list[str | Path]) -> pd.DataFrame:
    """Concatenate results tables given as parquet files, meta-eval or meta-train run directories."""
    frames = []
    for path in map(Path, paths):
        file = next((path / n for n in RESULT_FILES if (path / n).is_file()), path) if path.is_dir() else path
        if not file.is_file():
            raise ConfigError(f"no results at {path}: give a results .parquet file, a meta-eval run directory "
                              f"or a meta-train run directory whose config sets meta_test.splits")
        frame = pd.read_parquet(file)
        missing = [c for c in REQUIRED if c not in frame.columns]
        if missing:
            raise ConfigError(f"{file} is not a meta-eval results table: missing columns {', '.join(missing)}")
        frames.append(frame)
    if not frames:
        raise ConfigError("no results given")
    return pd.concat(frames, ignore_index=True)


def final_accuracy(frame: pd.DataFrame) -> pd.DataFrame:
    """Class-averaged accuracy of every trajectory after all its classes (one row per split x classes x lr x trial)."""
    final = frame[frame["classes_trained"] == frame["classes"]]
    keys = [k for k in KEYS if k in final.columns] + ["split", "classes", "lr", "trial"]
    return final.groupby(keys, as_index=False)[["train_acc", "test_acc"]].mean()


def best_learning_rates(frame: pd.DataFrame) -> pd.DataFrame:
    """Per class count: the LR with the best mean final held-out-image accuracy on these very
    results, and that accuracy (columns classes, lr, test_acc). For progress logs only: it is
    selected on the data it reports (see select_learning_rates for honest selection)."""
    means = final_accuracy(frame).groupby(["classes", "lr"])["test_acc"].mean().reset_index()
    return means.loc[means.groupby("classes")["test_acc"].idxmax()].reset_index(drop=True)


def trajectory_accuracy(frame: pd.DataFrame) -> pd.DataFrame:
    """Accuracy at every evaluation point, over all classes and over the classes seen so far."""
    seen = frame["class_id"] < frame["classes_trained"]
    keys = [k for k in KEYS if k in frame.columns] + ["split", "classes", "lr", "trial", "classes_trained"]
    both = frame.assign(seen_train_acc=frame["train_acc"].where(seen), seen_test_acc=frame["test_acc"].where(seen))
    return both.groupby(keys, as_index=False)[["train_acc", "test_acc", "seen_train_acc", "seen_test_acc"]].mean()


def summarize(frame: pd.DataFrame) -> pd.DataFrame:
    """Mean, std and 95% CI over runs of all-class and seen-class accuracy at every evaluation point."""
    per_run = trajectory_accuracy(frame)
    keys = [k for k in KEYS if k in per_run.columns] + ["split", "classes", "lr", "classes_trained"]
    metrics = ["train_acc", "test_acc", "seen_train_acc", "seen_test_acc"]
    grouped = per_run.groupby(keys)
    summary = grouped[metrics].mean()
    std = grouped[metrics].std()
    runs = grouped["trial"].nunique()
    for metric in metrics:
        summary[f"{metric}_std"] = std[metric]
        summary[f"{metric}_ci95"] = ci95(std[metric], runs)
    summary["runs"] = runs
    return summary.reset_index()


def select_learning_rates(frame: pd.DataFrame) -> pd.DataFrame:
    """Per setting and test class count: the validation-selected and the best-on-test LR, with test accuracy.

    Validation uses only `val` rows (held-out meta-training classes); with fewer validation
    classes than the test count, the largest validation count stands in (column val_classes).
    """
    final = final_accuracy(frame)
    keys = [k for k in KEYS if k in final.columns]
    rows = []
    for setting, group in final.groupby(keys):
        test, val = group[group["split"] == "test"], group[group["split"] == "val"]
        val_counts = sorted(val["classes"].unique())
        for classes in sorted(test["classes"].unique()):
            at_test = test[test["classes"] == classes]
            by_lr = at_test.groupby("lr")
            choices = [("best-on-test", by_lr["test_acc"].mean().idxmax(), classes)]
            if val_counts:
                count = max([c for c in val_counts if c <= classes] or [val_counts[0]])
                val_means = val[val["classes"] == count].groupby("lr")["test_acc"].mean()
                choices.insert(0, ("validation", val_means.idxmax(), count))
            for selection, lr, val_classes in choices:
                chosen = at_test[at_test["lr"] == lr]
                n = chosen["trial"].nunique()
                rows.append({**dict(zip(keys, setting)), "selection": selection, "classes": int(classes),
                             "val_classes": int(val_classes) if selection == "validation" else None,
                             "lr": float(lr), "runs": n,
                             "train_acc": chosen["train_acc"].mean(), "train_std": chosen["train_acc"].std(),
                             "train_ci95": ci95(chosen["train_acc"].std(), n),
                             "test_acc": chosen["test_acc"].mean(), "test_std": chosen["test_acc"].std(),
                             "test_ci95": ci95(chosen["test_acc"].std(), n)})
    selection = pd.DataFrame(rows)
    if not selection.empty:
        selection["val_classes"] = selection["val_classes"].astype("Int64")
    return selection


def _label(row: pd.Series | dict, keys: list[str], varying: list[str]) -> str:
    shown = [k for k in keys if k in varying] or ["model"]
    return ", ".join(f"{Path(str(row[k])).name if k == 'model' else row[k]}" for k in shown)


def plot_accuracy_vs_classes(selection: pd.DataFrame, path: Path) -> None:
    """Final train and test accuracy against the number of classes, with 95% CI bands."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    keys = [k for k in KEYS if k in selection.columns]
    varying = [k for k in keys if selection[k].nunique() > 1]
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2), sharey=True)
    for ax, kind in zip(axes, ("train", "test")):
        for _, group in selection.groupby(keys + ["selection"]):
            group = group.sort_values("classes")
            first = group.iloc[0]
            label = f"{_label(first, keys, varying)} [{first['selection']} LR]"
            style = "-" if first["selection"] == "validation" else "--"
            line, = ax.plot(group["classes"], group[f"{kind}_acc"], style, marker="o", label=label)
            ax.fill_between(group["classes"], group[f"{kind}_acc"] - group[f"{kind}_ci95"].fillna(0),
                            group[f"{kind}_acc"] + group[f"{kind}_ci95"].fillna(0), color=line.get_color(),
                            alpha=0.2)
        ax.set_title(f"{'retention (train images)' if kind == 'train' else 'generalisation (test images)'}")
        ax.set_xlabel("classes learned")
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("accuracy after all classes (mean, 95% CI)")
    axes[1].legend(fontsize=7)
    fig.tight_layout()
    _save(fig, path)


def plot_accuracy_vs_lr(frame: pd.DataFrame, path: Path, counts: int = 4) -> None:
    """Final test-image accuracy against the learning rate at up to `counts` class counts, per split."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    final = final_accuracy(frame)
    keys = [k for k in KEYS if k in final.columns]
    varying = [k for k in keys if final[k].nunique() > 1]
    all_counts = sorted(final.loc[final["split"] == "test", "classes"].unique()) or sorted(final["classes"].unique())
    chosen = sorted({all_counts[round(i)] for i in np.linspace(0, len(all_counts) - 1, min(counts, len(all_counts)))})
    fig, axes = plt.subplots(1, len(chosen), figsize=(4 * len(chosen), 3.8), sharey=True, squeeze=False)
    for ax, classes in zip(axes[0], chosen):
        for _, group in final.groupby(keys + ["split"]):
            split = group["split"].iloc[0]
            cap = classes if split == "test" else max([c for c in group["classes"].unique() if c <= classes]
                                                      or [group["classes"].min()])
            at = group[group["classes"] == cap].groupby("lr")["test_acc"]
            mean, std, n = at.mean(), at.std(), at.count()
            if mean.empty:
                continue
            half = ci95(std, n).fillna(0)
            label = f"{_label(group.iloc[0], keys, varying)} ({split}{'' if cap == classes else f', {cap} cl.'})"
            line, = ax.plot(mean.index, mean.values, "-" if split == "test" else ":", marker="o", label=label)
            ax.fill_between(mean.index, mean - half, mean + half, color=line.get_color(), alpha=0.2)
        ax.set_xscale("log")
        ax.set_title(f"{classes} classes")
        ax.set_xlabel("learning rate")
        ax.grid(alpha=0.3)
    axes[0][0].set_ylabel("final test-image accuracy")
    axes[0][-1].legend(fontsize=7)
    fig.tight_layout()
    _save(fig, path)


def _save(fig, path: Path) -> None:
    import matplotlib.pyplot as plt
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=110, format="png")
    plt.close(fig)


def markdown(selection: pd.DataFrame, summary: pd.DataFrame) -> str:
    """The human-readable summary: accuracy per class count under each LR selection."""
    lines = ["# Meta-test results", "",
             "Accuracy after learning all classes (mean ± 95% CI over runs). **validation**: LR chosen on",
             "held-out meta-training classes (honest). **best-on-test**: LR chosen on the meta-test itself,",
             "as the reference did (optimistic; for comparison with published numbers only).", ""]
    keys = [k for k in KEYS if k in selection.columns]
    for setting, group in selection.groupby(keys):
        lines += [f"## {', '.join(f'{k}={v}' for k, v in zip(keys, setting))}", "",
                  "| selection | classes | lr | runs | train acc | test acc |", "|---|---|---|---|---|---|"]
        for row in group.sort_values(["selection", "classes"], ascending=[False, True]).itertuples():
            lines.append(f"| {row.selection}{f' ({int(row.val_classes)} val cl.)' if row.selection == 'validation' else ''}"
                         f" | {row.classes} | {row.lr:g} | {row.runs} | {row.train_acc:.3f} ± {row.train_ci95:.3f}"
                         f" | {row.test_acc:.3f} ± {row.test_ci95:.3f} |")
        lines.append("")
    points = summary[summary["classes_trained"] < summary["classes"]]
    lines.append(f"Evaluation points inside trajectories: {len(points)} summary rows (see summary.csv; "
                 f"seen_* columns average only the classes learned so far).")
    return "\n".join(lines) + "\n"


def write_report(paths: list[str | Path], out: str | Path) -> dict[str, Path]:
    """Read results, write summary.csv, selection.csv, summary.md and the two PNG plots into `out`."""
    frame = read_results(paths)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    summary = summarize(frame)
    selection = select_learning_rates(frame)
    if selection.empty:
        raise ConfigError("the results hold no test split, so there is nothing to report; run with splits=[val,test]")
    files = {"summary": out / "summary.csv", "selection": out / "selection.csv", "markdown": out / "summary.md",
             "classes_plot": out / "accuracy_vs_classes.png", "lr_plot": out / "accuracy_vs_lr.png"}
    with atomic_path(files["summary"]) as tmp:
        summary.to_csv(tmp, index=False)
    with atomic_path(files["selection"]) as tmp:
        selection.to_csv(tmp, index=False)
    write_text(files["markdown"], markdown(selection, summary))
    plot_accuracy_vs_classes(selection, files["classes_plot"])
    plot_accuracy_vs_lr(frame, files["lr_plot"])
    return files
