"""The meta-test report (`metacl meta report`): the final table, summaries and plots.

The final table is the meta-test's answer: per class count, the test accuracy (mean and 95% CI
over runs) at the learning rate chosen on held-out meta-training classes (`results.py` chooses
it). Where the test split was also swept at every LR (`metacl meta eval ... test_lrs=all`, or
meta-training's meta-tests), a second table gives the reference's "best on test" choice, labelled
as such: it is optimistic, for comparison with published numbers only.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np
import pandas as pd

from ...core.atomic import atomic_path, write_text
from ...core.errors import ConfigError
from ...core.plots import pyplot, save_figure
from .results import KEYS, ci95, final_accuracy, read_results, select_learning_rates

SELECTION_LABELS = {"validation": "LR chosen on validation classes", "best-on-test": "best on test (optimistic)"}
"""How each LR choice is named in plots."""


def trajectory_accuracy(frame: pd.DataFrame) -> pd.DataFrame:
    """Accuracy at every evaluation point, over all classes and over the classes seen so far."""
    seen = frame["class_id"] < frame["classes_trained"]
    keys = [k for k in KEYS if k in frame.columns] + ["split", "classes", "lr", "run", "classes_trained"]
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
    runs = grouped["run"].nunique()
    for metric in metrics:
        summary[f"{metric}_std"] = std[metric]
        summary[f"{metric}_ci95"] = ci95(std[metric], runs)
    summary["runs"] = runs
    return summary.reset_index()


def _label(row: pd.Series | dict, keys: list[str], varying: list[str]) -> str:
    shown = [k for k in keys if k in varying] or ["model"]
    return ", ".join(f"{Path(str(row[k])).name if k == 'model' else row[k]}" for k in shown)


def plot_accuracy_vs_classes(selection: pd.DataFrame, path: Path) -> None:
    """Final train and test accuracy against the number of classes, with 95% CI bands."""
    plt = pyplot()
    keys = [k for k in KEYS if k in selection.columns]
    varying = [k for k in keys if selection[k].nunique() > 1]
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2), sharey=True)
    for ax, kind in zip(axes, ("train", "test")):
        for _, group in selection.groupby(keys + ["selection"]):
            group = group.sort_values("classes")
            first = group.iloc[0]
            label = f"{_label(first, keys, varying)} [{SELECTION_LABELS[first['selection']]}]"
            style = "-" if first["selection"] == "validation" else "--"
            (line,) = ax.plot(group["classes"], group[f"{kind}_acc"], style, marker="o", label=label)
            ax.fill_between(
                group["classes"],
                group[f"{kind}_acc"] - group[f"{kind}_ci95"].fillna(0),
                group[f"{kind}_acc"] + group[f"{kind}_ci95"].fillna(0),
                color=line.get_color(),
                alpha=0.2,
            )
        ax.set_title(f"{'retention (train images)' if kind == 'train' else 'generalisation (test images)'}")
        ax.set_xlabel("classes learned")
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("accuracy after all classes (mean, 95% CI)")
    axes[1].legend(fontsize=7)
    fig.tight_layout()
    _save(fig, path)


def plot_accuracy_vs_lr(frame: pd.DataFrame, path: Path, counts: int = 4) -> None:
    """Final test-image accuracy against the learning rate at up to `counts` class counts, per split."""
    plt = pyplot()
    final = final_accuracy(frame)
    keys = [k for k in KEYS if k in final.columns]
    varying = [k for k in keys if final[k].nunique() > 1]
    all_counts = sorted(final.loc[final["split"] == "test", "classes"].unique()) or sorted(final["classes"].unique())
    chosen = sorted({all_counts[round(i)] for i in np.linspace(0, len(all_counts) - 1, min(counts, len(all_counts)))})
    fig, axes = plt.subplots(1, len(chosen), figsize=(4 * len(chosen), 3.8), sharey=True, squeeze=False)
    for ax, classes in zip(axes[0], chosen):
        for _, group in final.groupby(keys + ["split"]):
            split = group["split"].iloc[0]
            cap = (
                classes
                if split == "test"
                else max([c for c in group["classes"].unique() if c <= classes] or [group["classes"].min()])
            )
            at = group[group["classes"] == cap].groupby("lr")["test_acc"]
            mean, std, n = at.mean(), at.std(), at.count()
            if mean.empty:
                continue
            half = ci95(std, n).fillna(0)
            label = f"{_label(group.iloc[0], keys, varying)} ({split}{'' if cap == classes else f', {cap} cl.'})"
            if len(mean) == 1:  # one LR: the test split at the validation-chosen LR
                ax.errorbar(mean.index, mean.values, yerr=half.values, fmt="o", capsize=4, label=f"{label} at one LR")
                continue
            (line,) = ax.plot(mean.index, mean.values, "-" if split == "test" else ":", marker="o", label=label)
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
    save_figure(fig, path, dpi=110)


def final_table(selection: pd.DataFrame) -> str:
    """The meta-test's answer as markdown: per setting and class count, the test accuracy (95% CI)
    at the validation-chosen LR, then, where the test split was swept at every LR, the labelled
    best-on-test table."""
    keys = [k for k in KEYS if k in selection.columns]
    lines = []
    for setting, group in selection.groupby(keys):
        lines += [f"## {', '.join(f'{k}={v}' for k, v in zip(keys, setting))}", ""]
        validated = group[group["selection"] == "validation"].sort_values("classes")
        if len(validated):
            lines += [
                "Test accuracy after learning all classes, at the learning rate chosen per class count on",
                "validation classes held out of meta-training (mean ± 95% CI over runs):",
                "",
                "| classes | test acc | chosen LR | chosen on | runs | train acc |",
                "|---|---|---|---|---|---|",
            ]
            for row in validated.itertuples():
                note = "" if row.val_classes == row.classes else (" †" if row.val_classes < row.classes else " ‡")
                lines.append(
                    f"| {row.classes} | {row.test_acc:.3f} ± {row.test_ci95:.3f} | {row.lr:g} | "
                    f"{row.val_classes} val classes{note} | {row.runs} | "
                    f"{row.train_acc:.3f} ± {row.train_ci95:.3f} |"
                )
            larger = validated[validated["val_classes"] < validated["classes"]]
            if len(larger):
                lines += [
                    "",
                    f"† more classes than the validation pool holds: "
                    f"{', '.join(str(c) for c in larger['classes'])} classes use the choice at "
                    f"the largest validated count ({int(larger['val_classes'].max())} classes).",
                ]
            if (validated["val_classes"] > validated["classes"]).any():
                lines += ["", "‡ fewer classes than any validated count: the choice at the smallest validated count."]
        else:
            lines += [
                "No validation results (split `val`), so no honest learning-rate choice: run "
                "`metacl meta eval` with validation classes (data.val_classes)."
            ]
        best = group[group["selection"] == "best-on-test"].sort_values("classes")
        if len(best):
            lines += [
                "",
                "### Best on test (the reference's choice; optimistic)",
                "",
                "The test split was swept at every learning rate; here each class count takes the LR",
                "with the best test accuracy, chosen on the test classes themselves, as the reference",
                "did. Optimistic: for comparison with published numbers only.",
                "",
                "| classes | test acc | best-on-test LR | runs | train acc |",
                "|---|---|---|---|---|",
            ]
            for row in best.itertuples():
                lines.append(
                    f"| {row.classes} | {row.test_acc:.3f} ± {row.test_ci95:.3f} | {row.lr:g} | "
                    f"{row.runs} | {row.train_acc:.3f} ± {row.train_ci95:.3f} |"
                )
        lines.append("")
    return "\n".join(lines)


def markdown(selection: pd.DataFrame, summary: pd.DataFrame) -> str:
    """summary.md: the final table(s), then where the rest of the numbers are."""
    points = summary[summary["classes_trained"] < summary["classes"]]
    return (
        "\n".join(
            [
                "# Meta-test results",
                "",
                final_table(selection),
                f"Evaluation points inside trajectories: {len(points)} summary rows (see summary.csv; "
                f"seen_* columns average only the classes learned so far). selection.csv has every "
                f"choice; accuracy_vs_classes.png and accuracy_vs_lr.png plot them.",
            ]
        )
        + "\n"
    )


def write_report(
    paths: list[str | Path], out: str | Path, echo: Callable[[str], None] | None = print
) -> dict[str, Path]:
    """Read results; write summary.csv, selection.csv, summary.md and the two PNG plots into `out`;
    `echo` the final table (print by default; None for silence)."""
    frame = read_results(paths)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    summary = summarize(frame)
    selection = select_learning_rates(frame)
    if selection.empty:
        raise ConfigError("the results hold no test split, so there is nothing to report; run with splits=[val,test]")
    files = {
        "summary": out / "summary.csv",
        "selection": out / "selection.csv",
        "markdown": out / "summary.md",
        "classes_plot": out / "accuracy_vs_classes.png",
        "lr_plot": out / "accuracy_vs_lr.png",
    }
    with atomic_path(files["summary"]) as tmp:
        summary.to_csv(tmp, index=False)
    with atomic_path(files["selection"]) as tmp:
        selection.to_csv(tmp, index=False)
    write_text(files["markdown"], markdown(selection, summary))
    plot_accuracy_vs_classes(selection, files["classes_plot"])
    plot_accuracy_vs_lr(frame, files["lr_plot"])
    if echo is not None:
        echo(final_table(selection))
    return files
