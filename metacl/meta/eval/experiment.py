"""Experiment "meta-eval": meta-test a checkpoint into a tidy results table.

    metacl meta eval runs/meta-train-xyz protocol.classes=[10,600] protocol.runs=3

The honest meta-test, by default: every learning rate x run on the `val` split (classes held
out of meta-training), which chooses the LR per class count; then the `test` split (meta-test
classes) at that LR only: `runs` trajectories per class count instead of LRs x runs.
`test_lrs=all` also sweeps the test split at every LR, as the reference did, so the report can
add its (optimistic, labelled) best-on-test table.

Writes `results.parquet` in the run directory: one row per split x class count x LR x run x
evaluation point x class (`results.py`). `metacl meta report` summarises it.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Literal

import pandas as pd
import torch
from torch import nn

from ...core.errors import ConfigError, RunInterrupted
from ...core.experiment import ExperimentConfig
from .checkpoints import TrainingData, checkpoint_fingerprint, load_eval_model, resolve_checkpoint, training_data
from .protocol import ProtocolConfig, check_protocol, class_counts, nested_draws
from .results import best_learning_rates, chosen_learning_rates, describe, result_frame, select_learning_rates
from .sweep import LRSweep

SPLITS = ("val", "test")
"""Class pools a meta-test can run on: held-out meta-training classes (LR selection) and the test split."""


@dataclass
class EvalDataConfig:
    """Which images the meta-test and the validation selection use."""

    dataset: str = "omniglot"
    """Dataset name for metacl.meta.data.load_dataset (omniglot or folder)."""
    size: int = 28
    """Image side in pixels: 28 for ANML, 84 for OML."""
    test_split: str = "evaluation"
    """Split whose classes are meta-tested (never seen in meta-training)."""
    val_split: str = "background"
    """Meta-training split from which validation classes are held out."""
    val_classes: int | float | None = None
    """Held-out validation classes of val_split (count or fraction), exactly as in meta-training: they
    choose the LR. None takes the checkpoint's data record (older checkpoints: data.val_classes of the
    meta-training run's config.yaml; 0 when there is none); 0 runs no validation."""
    split_seed: int | None = None
    """Seed of the validation split (split_classes); None takes the checkpoint's (older: the meta-training
    run's seed), else `seed`."""
    first_963: bool | None = None
    """Use the first 963 background classes; None takes the checkpoint's setting (default false)."""


@dataclass
class Config(ExperimentConfig):
    """A meta-test of one model checkpoint. `data_dir` None: the data folder the checkpoint was
    meta-trained on (its data record), else the default."""

    experiment: str = "meta-eval"
    """Always meta-eval."""
    checkpoint: str = ""
    """A model checkpoint (.pt from metacl.models.save_model) or a meta-train run directory."""
    data: EvalDataConfig = field(default_factory=EvalDataConfig)
    """Datasets and the validation split."""
    protocol: ProtocolConfig = field(default_factory=ProtocolConfig)
    """The meta-test protocol and the sweep."""
    splits: list[str] = field(default_factory=lambda: ["val", "test"])
    """Which sweeps to run: val (LR selection on held-out meta-training classes) and/or test."""
    test_lrs: Literal["chosen", "all"] = "chosen"
    """Learning rates of the test split. chosen: per class count only the LR chosen on the val split
    (needs validation classes unless there is one LR); all: every LR, as the reference did, adding the
    optimistic best-on-test choice to the report."""

    def __post_init__(self) -> None:
        if self.checkpoint:
            resolve_checkpoint(self.checkpoint)
        if not self.splits or set(self.splits) - set(SPLITS):
            raise ConfigError(f"splits={self.splits}: valid splits are {' and '.join(SPLITS)}")
        if "val" not in self.splits and "test" in self.splits:
            needs_validation(self.protocol, self.test_lrs, "splits has no val")


def draws(config: Config) -> str:
    """How this meta-eval draws its class counts' classes: nested or independent (auto resolved)."""
    return "nested" if nested_draws(config.protocol) else "independent"


def needs_validation(protocol: ProtocolConfig, test_lrs: str, why: str) -> None:
    """Refuse a chosen-LR test without validation classes to choose on (unless there is only one LR)."""
    if test_lrs == "chosen" and len(protocol.learning_rates()) > 1:
        raise ConfigError(
            f"test_lrs=chosen runs the test split at the LR chosen on validation classes, but {why}: "
            f"hold out validation classes (splits=[val,test], data.val_classes=N, as in "
            f"meta-training), or set test_lrs=all for the reference's optimistic best-on-test choice"
        )


# ------------------------------------------------------------------------------- data
@dataclass(frozen=True)
class DataSetup:
    """The data meta-eval reads: the validation hold-out and the data folder."""

    val_classes: int | float
    split_seed: int
    first_963: bool
    data_dir: str | None
    notes: tuple[str, ...] = ()
    """What was taken from where, for the log."""


def data_setup(config: Config) -> DataSetup:
    """Config values where given; else the checkpoint's data record (older: its run's config.yaml)."""
    trained = training_data(config.checkpoint) if config.checkpoint else TrainingData()
    data = config.data
    val_classes = trained.val_classes if data.val_classes is None else data.val_classes
    split_seed = (
        data.split_seed
        if data.split_seed is not None
        else trained.split_seed
        if trained.split_seed is not None
        else config.seed
    )
    first_963 = trained.first_963 if data.first_963 is None else data.first_963
    notes = [
        f"validation setup from {trained.source}: val_classes={val_classes}, split_seed={split_seed}, "
        f"first_963={first_963}"
    ]
    data_dir = config.data_dir
    if data_dir is None and trained.data_dir:
        if Path(trained.data_dir).is_dir():
            data_dir = trained.data_dir
            notes.append(f"data_dir {data_dir} (where the checkpoint was meta-trained)")
        else:
            notes.append(
                f"the checkpoint was meta-trained on data_dir {trained.data_dir}, which does not exist "
                f"here; using the default data folder (set data_dir= to choose)"
            )
    if trained.recorded and "val" in config.splits and val_classes:
        for key, ours, theirs in (
            ("dataset", data.dataset, trained.dataset),
            ("val_split", data.val_split, trained.split),
        ):
            if theirs is not None and ours != theirs:
                raise ConfigError(
                    f"data.{key}={ours!r}, but the checkpoint was meta-trained on {theirs!r}: "
                    f"validation classes are held out of the training data; set data.{key}={theirs}"
                )
        if trained.image_size is not None and trained.image_size != data.size:
            notes.append(f"note: data.size={data.size}, but the checkpoint was meta-trained at {trained.image_size} px")
    return DataSetup(val_classes, int(split_seed), bool(first_963), data_dir, tuple(notes))


def load_splits(config: Config, device: torch.device, setup: DataSetup) -> dict[str, torch.Tensor]:
    """The image tensors of the requested splits ("val": held-out meta-training classes; "test")."""
    from ..data import load_dataset, split_classes

    kwargs = dict(size=config.data.size, data_dir=setup.data_dir, device=device, quiet=config.quiet)
    splits = {}
    if "val" in config.splits and setup.val_classes:
        background = load_dataset(config.data.dataset, config.data.val_split, first_963=setup.first_963, **kwargs)
        splits["val"] = split_classes(background, setup.val_classes, setup.split_seed)[1].images
    if "test" in config.splits:
        splits["test"] = load_dataset(config.data.dataset, config.data.test_split, **kwargs).images
    return splits


# ------------------------------------------------------------------------------- a model in memory
def meta_test_model(
    model: nn.Module,
    protocol: ProtocolConfig,
    images: torch.Tensor,
    *,
    seed: int = 0,
    split: str = "test",
    model_name: str = "model",
    dataset: str = "omniglot",
    lrs: dict[int, float] | None = None,
    quiet: bool = True,
    log: Callable[[str], None] | None = None,
) -> pd.DataFrame:
    """Meta-test `model` on `images` (C, K, channels, H, W) at every class count of `protocol`.

    Every LR x run, or with `lrs` ({class count: lr}) each class count at its LR only. Returns the
    tidy results table (`results.result_frame`); `results.final_accuracy(frame)` reduces it to one
    accuracy per class count, LR and run. The model is copied, never modified. Meta-training calls
    this at its eval steps.
    """
    sweep = LRSweep(model, images, protocol, seed, split, quiet=quiet, log=log)
    info = describe(protocol, model_name, dataset)
    results = sweep.run_counts(class_counts(protocol, split, images.shape[0]), lrs)
    return pd.concat([result_frame(r, info, c, split) for c, r in sorted(results.items())], ignore_index=True)


# ------------------------------------------------------------------------------- the run
def run(config: Config, run) -> dict:
    check_protocol(config.protocol)
    run.check_data(checkpoint_fingerprint(config.checkpoint))
    model = load_eval_model(config.checkpoint, run.device)
    setup = data_setup(config)
    for note in setup.notes:
        run.log.info(note)
    splits = load_splits(config, run.device, setup)
    if not splits:
        raise ConfigError(
            f"splits={config.splits}, but the checkpoint holds no validation classes "
            f"(val_classes={setup.val_classes}): nothing to meta-test; set data.val_classes"
        )
    state = run.load_checkpoint()
    # a run started by metacl before test_lrs existed swept the test split at every LR: finish it so,
    state = state if state is not None else {"done": [], "test_lrs": config.test_lrs, "class_draws": draws(config)}
    test_lrs = state.setdefault("test_lrs", "all")
    # and drew every class count on its own: resume it so
    protocol = replace(config.protocol, class_draws=state.setdefault("class_draws", "independent"))
    if "test" in splits and "val" not in splits:
        needs_validation(config.protocol, test_lrs, f"the checkpoint holds none (val_classes={setup.val_classes})")
    table = run.table("results")
    info = describe(protocol, str(config.checkpoint), config.data.dataset)
    run.log.info(
        "meta-eval of %s: splits %s, %d LRs x %d runs (test split: %s)",
        resolve_checkpoint(config.checkpoint),
        ", ".join(f"{k} ({v.shape[0]} classes)" for k, v in splits.items()),
        len(config.protocol.lrs),
        config.protocol.runs,
        "every LR" if test_lrs == "all" else "the validation-chosen LR",
    )
    for split, images in splits.items():
        sweep = LRSweep(model, images, protocol, config.seed, split, quiet=config.quiet, log=run.log.info)
        counts = class_counts(protocol, split, images.shape[0])
        chosen = {}
        if split == "test" and test_lrs == "chosen":
            candidates = protocol.learning_rates()
            chosen = (
                chosen_learning_rates(table.frame(), counts)
                if "val" in splits
                else {classes: (candidates[0], None) for classes in counts}
            )
        for group, trajectories in sweep.groups(counts, {c: lr for c, (lr, _) in chosen.items()} or None):
            keys = [f"{split}/{classes}" for classes in group]
            if all(key in state["done"] for key in keys):
                continue
            for classes, result in sweep.run_group(group, trajectories).items():
                if f"{split}/{classes}" in state["done"]:  # done by an interrupted run before this one
                    continue
                frame = result_frame(result, info, classes, split)
                table.append(frame.to_dict("records"))
                log_progress(run, frame, split, classes, chosen.get(classes))
            state["done"].extend(key for key in keys if key not in state["done"])
            run.save_checkpoint(state)
            if run.stop_requested:
                raise RunInterrupted(f"stopped after {', '.join(keys)}; resume with --resume")
    run.flush()
    summary = {}
    for row in select_learning_rates(table.frame()).itertuples():
        summary[f"{row.selection}/{row.classes}/lr"] = float(row.lr)
        summary[f"{row.selection}/{row.classes}/test_acc"] = float(row.test_acc)
    return summary


def log_progress(run, frame: pd.DataFrame, split: str, classes: int, chosen: tuple[float, int | None] | None) -> None:
    """One line and one tracker point per class count: the best LR of a sweep, or the chosen LR's accuracy."""
    best = best_learning_rates(frame).iloc[0]
    if chosen is None:
        run.tracker.log({f"{split}/best_test_acc": float(best.test_acc), f"{split}/best_lr": float(best.lr)}, classes)
        run.log.info("%s, %d classes: best mean test accuracy %.4f at lr %g", split, classes, best.test_acc, best.lr)
        return
    lr, val_classes = chosen
    run.tracker.log({f"{split}/test_acc": float(best.test_acc), f"{split}/lr": float(lr)}, classes)
    run.log.info(
        "%s, %d classes: mean test accuracy %.4f at lr %g (chosen on %s)",
        split,
        classes,
        best.test_acc,
        lr,
        f"{val_classes} validation classes" if val_classes else "the only LR",
    )
