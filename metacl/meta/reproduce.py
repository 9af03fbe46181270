"""`metacl meta reproduce`: one command from a meta-training config to a published table.

    metacl meta reproduce configs/meta/laptop/anml.yaml data_dir=../shared/data/omniglot

Ordinary run directories, side by side in the config's `out_dir`, then a report folder:

    <name>/               the meta-training (resumed where it stopped; skipped when complete)
    <name>-meta-test/     the honest meta-test of its final model: every LR on validation classes
                          held out of meta-training, the test split at the chosen LR only
    <name>-curve-<step>/  a smaller honest meta-test (`curve_runs` runs, 100 and 600 classes) of
                          each model meta-training saved at its `eval_steps`: the learning curve
    <name>-report/        the meta-test report, learning_curve.csv/.png and reproduction.md (our
                          table beside the published ones)

Each step is a run like any other, so running the command again after an interruption continues
the unfinished step from its checkpoint and redoes nothing finished. A model meta-trained without
validation classes (`data.val_classes: 0`, as the reference trained) cannot choose its LR
honestly: its meta-tests sweep the test split at every LR and are labelled best-on-test.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Sequence
from pathlib import Path

import pandas as pd

from ..core.atomic import atomic_path, write_text
from ..core.config import ConfigError, read_yaml
from ..core.experiment import ExperimentConfig, execute, load_experiment_config
from ..core.plots import pyplot, save_figure
from ..core.rundir import is_run_directory
from .eval.checkpoints import checkpoint_fingerprint, training_data
from .eval.reference import PUBLISHED, published
from .eval.report import write_report
from .eval.results import read_results, select_learning_rates

CURVE_CLASSES = (100, 600)
"""Class counts of the learning curve, as the issue of record asks: the largest validation pool
(100 held-out classes) and the full 600-class meta-test."""


class Reproduction:
    """The run directories of one reproduction and how each is made (see the module docstring)."""

    def __init__(
        self,
        train_config: ExperimentConfig,
        eval_config: str | None = None,
        eval_overrides: Sequence[str] = (),
        curve_runs: int = 3,
        curve_classes: Sequence[int] = CURVE_CLASSES,
        extend: bool = False,
    ):
        self.train_config, self.eval_config, self.eval_overrides = train_config, eval_config, list(eval_overrides)
        self.out_dir, self.name = Path(train_config.out_dir), str(train_config.name)
        self.train_path = self.out_dir / self.name
        self.shared = [f"out_dir={json.dumps(str(self.out_dir))}", f"quiet={json.dumps(train_config.quiet)}"]
        if train_config.threads:
            self.shared.append(f"threads={train_config.threads}")
        self.curve_runs, self.curve_classes, self.extend = curve_runs, list(curve_classes), extend
        self.curve = [f"protocol.classes={json.dumps(self.curve_classes)}", f"protocol.runs={max(curve_runs, 1)}"]
        for extra in ([], self.curve):  # refuse bad meta-test settings now, not after hours of training
            load_experiment_config(eval_config, [*self.shared, *self.eval_overrides, *extra], "meta-eval")

    def train(self) -> Path:
        mode = "extend" if self.extend else "resume" if is_run_directory(self.train_path) else "new"
        return execute(self.train_config, mode)[0]

    def meta_test(self, model: Path, run_name: str, extra: Sequence[str] = ()) -> Path:
        """Meta-test `model` into run `run_name` (resumed, or returned at once when complete)."""
        checkpoint = f"checkpoint={json.dumps(str(model.resolve()))}"
        overrides = [*self.shared, *self.eval_overrides, *extra, f"name={run_name}", checkpoint]
        if not training_data(model).val_classes:
            overrides.append("test_lrs=all")  # no validation classes: best on test, labelled so
        config = load_experiment_config(self.eval_config, overrides, "meta-eval")
        path = self.out_dir / run_name
        if is_run_directory(path):
            check_same_model(path, model)
        return execute(config, "resume" if is_run_directory(path) else "new")[0]

    def final_meta_test(self, last: int) -> Path:
        """`<name>-meta-test`, or `<name>-meta-test-<last>` when that one meta-tested an earlier
        end of this run (before --extend): it stays as it was, beside the new one."""
        name = f"{self.name}-meta-test"
        if tested_earlier_model(self.out_dir / name, self.train_path, last):
            name = f"{name}-{last}"
        return self.meta_test(self.train_path / "model.pt", name)

    def curve_meta_test(self, step: int, model: Path) -> Path:
        return self.meta_test(model, f"{self.name}-curve-{step}", self.curve)

    def run(self, echo: Callable[[str], None] = print) -> dict[str, Path]:
        """Meta-train (or resume), meta-test the final model and every saved step, write the report.

        The last saved step is the final model: its curve point is the final meta-test's."""
        self.train()
        echo(f"meta-test of the final model ({self.train_path / 'model.pt'})")
        time = training_time(self.train_path)
        last = int(time["step"].iloc[-1])
        final = self.final_meta_test(last)
        curve_tests = []
        if self.curve_runs:
            for step, model in saved_models(self.train_path):
                if step != last:
                    echo(f"learning curve: meta-test of {model}")
                curve_tests.append((step, final if step == last else self.curve_meta_test(step, model)))
        report = self.out_dir / f"{self.name}-report"
        files = write_report([final], report, echo)
        curve_table = learning_curve(time, curve_tests, self.curve_classes)
        if len(curve_table):
            with atomic_path(report / "learning_curve.csv") as tmp:
                curve_table.to_csv(tmp, index=False)
            files["curve"] = report / "learning_curve.csv"
            files["curve_plot"] = plot_learning_curve(curve_table, report / "learning_curve.png")
        files["reproduction"] = report / "reproduction.md"
        text = reproduction_markdown(self.train_path, time, pd.read_csv(files["selection"]), curve_table)
        write_text(files["reproduction"], text)
        echo(text)
        return files


def tested_model(eval_run: Path) -> dict | None:
    """The fingerprint of the model meta-eval run `eval_run` tested (None: none recorded)."""
    try:
        return json.loads((eval_run / "data.json").read_text())
    except (OSError, ValueError):
        return None  # absent, or a meta-test from before metacl recorded its model


def tested_earlier_model(eval_run: Path, train_path: Path, last: int) -> bool:
    """Whether `eval_run` meta-tested this run's model at a step before `last`, its end before
    an --extend."""
    stored = tested_model(eval_run)
    return stored is not None and any(
        step < last and stored == checkpoint_fingerprint(model) for step, model in saved_models(train_path)
    )


def check_same_model(eval_run: Path, model: Path) -> None:
    """Refuse to reuse a meta-test of another model saved under the same name (a meta-training
    started again with --overwrite, say): its results would be reported as this model's."""
    stored = tested_model(eval_run)
    if stored is not None and stored != checkpoint_fingerprint(model):
        raise ConfigError(
            f"{eval_run} meta-tested a different model than {model} holds now (data.json); "
            f"move it away to meta-test this one, or reproduce under another name="
        )


def saved_models(train_path: Path) -> list[tuple[int, Path]]:
    """(step, file) of every models/step-<n>.pt, in step order."""
    found = []
    for path in (train_path / "models").glob("step-*.pt"):
        match = re.fullmatch(r"step-(\d+)\.pt", path.name)
        if match:
            found.append((int(match.group(1)), path))
    return sorted(found)


def training_time(train_path: Path) -> pd.DataFrame:
    """step -> seconds per step and cumulative wall-clock and CPU seconds of meta-training (from its
    train table)."""
    table = pd.read_parquet(train_path / "train.parquet").sort_values("step")
    steps = table["step"].diff().fillna(table["step"])
    time = pd.DataFrame(
        {
            "step": table["step"],
            "seconds_per_step": table["seconds_per_step"],
            "wall_s": (table["seconds_per_step"] * steps).cumsum(),
        }
    )
    if "cpu_seconds_per_step" in table:
        time["cpu_s"] = (table["cpu_seconds_per_step"] * steps).cumsum()
    return time


def learning_curve(time: pd.DataFrame, runs: Sequence[tuple[int, Path]], classes: Sequence[int]) -> pd.DataFrame:
    """One row per saved step and class count of `classes`: test accuracy (95% CI) at the chosen
    LR, and the meta-training time (`training_time`) spent to reach that step."""
    rows = []
    for step, path in runs:
        selection = select_learning_rates(read_results([path]))
        selection = selection[selection["classes"].isin(list(classes))]
        honest = selection[selection["selection"] == "validation"]
        reached = time[time["step"] >= step]
        at = reached.iloc[0] if len(reached) else None
        for row in (honest if len(honest) else selection).itertuples():
            rows.append(
                {
                    "step": step,
                    "classes": row.classes,
                    "selection": row.selection,
                    "lr": row.lr,
                    "runs": row.runs,
                    "test_acc": row.test_acc,
                    "test_ci95": row.test_ci95,
                    "wall_s": None if at is None else float(at["wall_s"]),
                    "cpu_s": None if at is None or "cpu_s" not in at else float(at["cpu_s"]),
                }
            )
    return pd.DataFrame(rows)


def plot_learning_curve(curve: pd.DataFrame, path: Path) -> Path:
    """Test accuracy at the chosen LR against episodes and against meta-training time."""
    plt = pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2), sharey=True)
    use_cpu = "cpu_s" in curve and curve["cpu_s"].notna().all()
    hours = (curve["cpu_s"] if use_cpu else curve["wall_s"]) / 3600
    for classes, group in curve.groupby("classes"):
        for ax, x in zip(axes, (group["step"], hours[group.index])):
            ax.errorbar(x, group["test_acc"], yerr=group["test_ci95"].fillna(0), marker="o", capsize=3)
            ax.lines[-1].set_label(f"{classes} classes")
    axes[0].set_xlabel("meta-training episodes")
    axes[1].set_xlabel("meta-training CPU hours (all threads)" if use_cpu else "meta-training wall-clock hours")
    axes[0].set_ylabel("test accuracy at the chosen LR (95% CI)")
    for ax in axes:
        ax.grid(alpha=0.3)
    axes[1].legend()
    fig.tight_layout()
    save_figure(fig, path, dpi=110)
    return path


def reproduction_markdown(train_path: Path, time: pd.DataFrame, selection: pd.DataFrame, curve: pd.DataFrame) -> str:
    """Our final table beside the published numbers, then the learning curve."""
    config = read_yaml(train_path / "config.yaml")
    steps, wall = int(time["step"].iloc[-1]), float(time["wall_s"].iloc[-1])
    median = float(time["seconds_per_step"].median())
    cpu = f", {time['cpu_s'].iloc[-1] / 3600:.2f} CPU hours" if "cpu_s" in time else ""
    lines = [
        f"# Reproduction: {train_path.name}",
        "",
        f"Meta-trained with algorithm `{config['algorithm']}`, model `{config['model'].get('name')}`, "
        f"{steps} episodes in {wall / 3600:.2f} wall-clock hours{cpu} "
        f"(threads: {config.get('threads') or 'torch default'}; median {median:.2f} s per episode); "
        f"{config['data'].get('val_classes')} background classes held out for validation.",
        "",
        "| classes | ours: LR chosen on validation | ours: best on test (optimistic) | "
        + " | ".join(result.source for result in PUBLISHED)
        + " |",
        "|---" * (3 + len(PUBLISHED)) + "|",
    ]
    published_counts = {classes for result in PUBLISHED for classes in result.accuracy}
    for classes in sorted({int(c) for c in selection["classes"]} | published_counts):
        cells = []
        for kind in ("validation", "best-on-test"):
            row = selection[(selection["classes"] == classes) & (selection["selection"] == kind)]
            cells.append(f"{row['test_acc'].iloc[0]:.3f} ± {row['test_ci95'].iloc[0]:.3f}" if len(row) else "not run")
        cells += [published(int(classes), result) for result in PUBLISHED]
        lines.append(f"| {classes} | " + " | ".join(cells) + " |")
    if len(curve):
        lines += [
            "",
            "## Learning curve (test accuracy at the validation-chosen LR, smaller meta-tests)",
            "",
            "| episodes | wall-clock h | CPU h | classes | test acc | LR | runs |",
            "|---|---|---|---|---|---|---|",
        ]
        for row in curve.itertuples():
            cpu_h = "" if pd.isna(row.cpu_s) else f"{row.cpu_s / 3600:.2f}"
            wall_h = "" if pd.isna(row.wall_s) else f"{row.wall_s / 3600:.2f}"
            lines.append(
                f"| {row.step} | {wall_h} | {cpu_h} | {row.classes} | {row.test_acc:.3f} ± {row.test_ci95:.3f} | "
                f"{row.lr:g} | {row.runs} |"
            )
    return "\n".join(lines) + "\n"
