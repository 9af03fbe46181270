"""The meta-test's tidy results table, and the choice of learning rate made on it.

One row per split x class count x learning rate x run x evaluation point x class. Meta-eval
(`experiment.py`), meta-training's meta-tests at its eval steps and the report all read and write
it through this module, and choose learning rates with the one rule here:

validation    per class count, the LR with the best mean final test-image accuracy on the `val`
              split (classes held out of meta-training); the meta-test (`test` split) is then
              reported at that LR. A test class count larger than every validated count uses the
              choice of the largest validated count. This is the honest estimate.
best-on-test  the LR chosen on the meta-test itself, as the reference did: optimistic, and only
              available where the test split was swept at every LR (`test_lrs: all`).
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from ...core.errors import ConfigError
from ...core.stats import t_quantile
from .protocol import MetaTestResult, ProtocolConfig, nested_draws

KEYS = [
    "model",
    "dataset",
    "eval_method",
    "reinit_method",
    "reinit_params",
    "opt_params",
    "train_examples",
    "test_examples",
    "class_draws",
]
"""Columns that identify one evaluation setting."""
REQUIRED = KEYS + ["split", "classes", "lr", "run", "classes_trained", "class_id", "train_acc", "test_acc"]
"""Columns every results table has."""
RENAMED = {"trial": "run"}
"""Columns of tables written by older metacl versions, and their names today."""
ADDED = {"class_draws": "independent"}
"""Columns older metacl versions did not write, and what their tables hold in them."""
RESULT_FILES = ("results.parquet", "meta_test.parquet")
"""A run directory's results: a meta-eval run's, or the meta-tests of a meta-train run's eval_steps."""


# ------------------------------------------------------------------------------- the table
def describe(protocol: ProtocolConfig, model: str, dataset: str) -> dict[str, Any]:
    """The columns that identify an evaluation (constant within one meta-eval run)."""
    return {
        "model": model,
        "dataset": dataset,
        "train_examples": protocol.train_examples,
        "test_examples": protocol.test_examples,
        "eval_method": protocol.eval_method,
        "reinit_method": protocol.reinit_method,
        "reinit_params": ",".join(protocol.reinit_params),
        "opt_params": ",".join(protocol.opt_params),
        "class_draws": "nested" if nested_draws(protocol) else "independent",
    }


def result_frame(result: MetaTestResult, info: dict[str, Any], classes: int, split: str) -> pd.DataFrame:
    """The tidy table of one class count: one row per evaluation point x trajectory x class."""
    points, trajectories, num = result.train_acc.shape
    e, t, c = np.meshgrid(np.arange(points), np.arange(trajectories), np.arange(num), indexing="ij")
    return pd.DataFrame(
        {
            **{key: [value] * e.size for key, value in info.items()},
            "split": split,
            "classes": classes,
            "lr": result.trajectories.lr[t.ravel()],
            "run": result.trajectories.run[t.ravel()],
            "classes_trained": np.asarray(result.classes_trained)[e.ravel()],
            "class_id": c.ravel(),
            "train_acc": result.train_acc.ravel(),
            "test_acc": result.test_acc.ravel(),
            "train_acc_top5": result.train_top5.ravel(),
            "test_acc_top5": result.test_top5.ravel(),
        }
    )


def upgrade(frame: pd.DataFrame) -> pd.DataFrame:
    """A results table in today's columns: older tables named the repeat index `trial` and had no `class_draws`."""
    for col, value in ADDED.items():  # rows appended by two metacl versions hold None in it
        frame = frame.assign(**{col: frame[col].fillna(value) if col in frame.columns else value})
    for old, new in RENAMED.items():
        if old not in frame.columns:
            continue
        if new not in frame.columns:
            frame = frame.rename(columns={old: new})
            continue
        merged = frame[new].fillna(frame[old])  # rows appended by two metacl versions
        frame = frame.drop(columns=[old]).assign(**{new: merged if merged.isna().any() else merged.astype("int64")})
    return frame


def read_results(paths: list[str | Path]) -> pd.DataFrame:
    """Concatenate results tables given as parquet files, meta-eval or meta-train run directories."""
    frames = []
    for path in map(Path, paths):
        file = next((path / n for n in RESULT_FILES if (path / n).is_file()), path) if path.is_dir() else path
        if not file.is_file():
            raise ConfigError(
                f"no results at {path}: give a results .parquet file, a meta-eval run directory "
                f"or a meta-train run directory whose config sets meta_test.splits"
            )
        frame = upgrade(pd.read_parquet(file))
        missing = [c for c in REQUIRED if c not in frame.columns]
        if missing:
            raise ConfigError(f"{file} is not a meta-eval results table: missing columns {', '.join(missing)}")
        frames.append(frame)
    if not frames:
        raise ConfigError("no results given")
    return pd.concat(frames, ignore_index=True)


# ------------------------------------------------------------------------------- statistics
def ci95(std: pd.Series | float, n: pd.Series | int) -> pd.Series | float:
    """Half-width of the 95% confidence interval of a mean of n runs (Student t)."""

    def t(count: int) -> float:
        return float("nan") if count < 2 else t_quantile(0.95, count - 1)

    if isinstance(n, pd.Series):
        return std * n.map(t) / np.sqrt(n)
    return std * t(n) / math.sqrt(n)


def final_accuracy(frame: pd.DataFrame) -> pd.DataFrame:
    """Class-averaged accuracy of every trajectory after all its classes (one row per split x classes x lr x run)."""
    final = frame[frame["classes_trained"] == frame["classes"]]
    keys = [k for k in KEYS if k in final.columns] + ["split", "classes", "lr", "run"]
    return final.groupby(keys, as_index=False)[["train_acc", "test_acc"]].mean()


# ------------------------------------------------------------------------- choosing the LR
def best_learning_rates(frame: pd.DataFrame) -> pd.DataFrame:
    """Per class count: the LR with the best mean final held-out-image accuracy on these very
    results, and that accuracy (columns classes, lr, test_acc). For progress logs only: it is
    selected on the data it reports (see validation_choice for honest selection)."""
    means = final_accuracy(frame).groupby(["classes", "lr"])["test_acc"].mean().reset_index()
    return means.loc[means.groupby("classes")["test_acc"].idxmax()].reset_index(drop=True)


def validation_choice(val_final: pd.DataFrame, classes: int) -> tuple[float, int]:
    """(lr, validated class count) chosen for a test of `classes` classes, from one setting's `val`
    rows of `final_accuracy`: the best mean test-image accuracy at the largest validated count
    not above `classes` (the smallest validated count when all are larger)."""
    counts = sorted(val_final["classes"].unique())
    if not counts:
        raise ConfigError("no validation results to choose the learning rate on")
    count = max([c for c in counts if c <= classes] or [counts[0]])
    means = val_final[val_final["classes"] == count].groupby("lr")["test_acc"].mean()
    return float(means.idxmax()), int(count)


def chosen_learning_rates(frame: pd.DataFrame, counts: list[int]) -> dict[int, tuple[float, int]]:
    """{test class count: (lr, validated class count)} from the `val` rows of one setting's results."""
    final = final_accuracy(upgrade(frame))
    val = final[final["split"] == "val"]
    return {classes: validation_choice(val, classes) for classes in counts}


def select_learning_rates(frame: pd.DataFrame) -> pd.DataFrame:
    """Per setting and test class count: the validation-chosen LR (when `val` rows exist) and, where
    the test split was swept at more than one LR, the best-on-test LR, each with the test accuracy."""
    final = final_accuracy(upgrade(frame))
    keys = [k for k in KEYS if k in final.columns]
    rows = []
    for setting, group in final.groupby(keys):
        test, val = group[group["split"] == "test"], group[group["split"] == "val"]
        for classes in sorted(test["classes"].unique()):
            at_test = test[test["classes"] == classes]
            by_lr = at_test.groupby("lr")
            choices = []
            if len(val):
                choices.append(("validation", *validation_choice(val, classes)))
            if by_lr.ngroups > 1:
                choices.append(("best-on-test", by_lr["test_acc"].mean().idxmax(), None))
            for selection, lr, val_classes in choices:
                chosen = at_test[at_test["lr"] == lr]
                n = chosen["run"].nunique()
                rows.append(
                    {
                        **dict(zip(keys, setting)),
                        "selection": selection,
                        "classes": int(classes),
                        "val_classes": val_classes,
                        "lr": float(lr),
                        "runs": n,
                        "train_acc": chosen["train_acc"].mean(),
                        "train_std": chosen["train_acc"].std(),
                        "train_ci95": ci95(chosen["train_acc"].std(), n),
                        "test_acc": chosen["test_acc"].mean(),
                        "test_std": chosen["test_acc"].std(),
                        "test_ci95": ci95(chosen["test_acc"].std(), n),
                    }
                )
    selection = pd.DataFrame(rows)
    if not selection.empty:
        selection["val_classes"] = selection["val_classes"].astype("Int64")
    return selection
