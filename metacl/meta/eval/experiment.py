"""Experiment "meta-eval": meta-test a checkpoint, sweeping LRs x runs x class counts, into a tidy table.

    metacl meta eval runs/meta-train-xyz protocol.classes=[10,600] protocol.runs=3

Writes `results.parquet` in the run directory: one row per split x class count x LR x run x
evaluation point x class. The `val` split (held-out meta-training classes) exists to choose the
learning rate honestly; the `test` split (meta-test classes) is the measurement. `metacl meta
report` summarises it.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np
import pandas as pd
import torch
import yaml
from torch import nn

from ...core.checkpoint import load_checkpoint
from ...core.errors import ConfigError, RunInterrupted
from ...core.experiment import ExperimentConfig
from .protocol import ProtocolConfig, Sweep, SweepResult, check_protocol
from .report import best_learning_rates, select_learning_rates

SPLITS = ("val", "test")
"""Class pools a meta-test can run on: held-out meta-training classes (LR selection) and the test split."""
MODEL_FILES = ("model.pt", "checkpoints/model.pt", "checkpoints/last.pt")
"""Where a run directory's final model is looked for, in this order."""


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
    choose the LR. None reads data.val_classes from the meta-training run's config.yaml (0 when there
    is none); 0 skips validation, leaving only the "best on test" selection."""
    split_seed: int | None = None
    """Seed of the validation split (split_classes); None reads the meta-training run's seed, else uses `seed`."""
    first_963: bool | None = None
    """Use the first 963 background classes; None reads the meta-training run's setting (default false)."""


@dataclass
class Config(ExperimentConfig):
    """A meta-test of one model checkpoint."""

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

    def __post_init__(self) -> None:
        if self.checkpoint:
            resolve_checkpoint(self.checkpoint)
        if not self.splits or set(self.splits) - set(SPLITS):
            raise ConfigError(f"splits={self.splits}: valid splits are {' and '.join(SPLITS)}")


# ------------------------------------------------------------------------------- checkpoints
def resolve_checkpoint(path: str | Path) -> Path:
    """The model file for a checkpoint path or a meta-train run directory."""
    path = Path(path).expanduser()
    if not str(path) or str(path) == ".":
        raise ConfigError("no checkpoint given: pass a model checkpoint file or a meta-train run directory")
    if path.is_file():
        return path
    if path.is_dir():
        for name in MODEL_FILES:
            if (path / name).is_file():
                return path / name
        found = sorted(p.name for p in (path / "checkpoints").glob("*.pt")) if (path / "checkpoints").is_dir() else []
        raise ConfigError(f"{path} holds no model checkpoint (looked for {', '.join(MODEL_FILES)}; "
                          f"checkpoints/ has: {', '.join(found) or 'nothing'})")
    raise ConfigError(f"checkpoint {path} does not exist; pass a model .pt file or a meta-train run directory")


def load_eval_model(path: str | Path, device: str | torch.device = "cpu") -> nn.Module:
    """Build the model of a checkpoint: {model_spec, state_dict}, or a training state {model} whose
    spec comes from the meta-train run's config.yaml (`checkpoints/last.pt` of an unfinished run)."""
    from ...models import build_model
    file = resolve_checkpoint(path)
    state = load_checkpoint(file, "cpu")
    weights = state.get("state_dict", state.get("model"))
    spec = state.get("model_spec") or training_config(file).get("model")
    if not isinstance(spec, dict) or not isinstance(weights, dict):
        raise ConfigError(f"{file} is not a metacl model checkpoint: it needs model_spec and state_dict "
                          f"(or model, next to a meta-train config.yaml); it has keys {', '.join(sorted(state))}")
    model = build_model(spec)
    model.load_state_dict(weights)
    return model.to(device).eval()


def training_config(path: str | Path) -> dict[str, Any]:
    """The meta-training run's config.yaml next to a run directory or its checkpoints ({} if none)."""
    path = Path(path).expanduser()
    for folder in (path, path.parent, path.parent.parent):
        if (folder / "config.yaml").is_file() and folder.is_dir():
            data = yaml.safe_load((folder / "config.yaml").read_text()) or {}
            if data.get("experiment") == "meta-train":
                return data
    return {}


# ------------------------------------------------------------------------------- results
def result_frame(result: SweepResult, info: dict[str, Any], classes: int, split: str) -> pd.DataFrame:
    """The tidy table of one sweep: one row per evaluation point x trajectory x class."""
    points, trajectories, num = result.train_acc.shape
    e, t, c = np.meshgrid(np.arange(points), np.arange(trajectories), np.arange(num), indexing="ij")
    frame = pd.DataFrame({
        **{key: [value] * e.size for key, value in info.items()},
        "split": split,
        "classes": classes,
        "lr": result.lrs[t.ravel()],
        "trial": result.trials[t.ravel()],
        "classes_trained": np.asarray(result.classes_trained)[e.ravel()],
        "class_id": c.ravel(),
        "train_acc": result.train_acc.ravel(),
        "test_acc": result.test_acc.ravel(),
        "train_acc_top5": result.train_top5.ravel(),
        "test_acc_top5": result.test_top5.ravel(),
    })
    return frame


def describe(protocol: ProtocolConfig, model: str, dataset: str) -> dict[str, Any]:
    """The columns that identify an evaluation (constant within one meta-eval run)."""
    return {"model": model, "dataset": dataset, "train_examples": protocol.train_examples,
            "test_examples": protocol.test_examples, "eval_method": protocol.eval_method,
            "reinit_method": protocol.reinit_method, "reinit_params": ",".join(protocol.reinit_params),
            "opt_params": ",".join(protocol.opt_params)}


def evaluate_checkpoint(model: nn.Module, protocol: ProtocolConfig, images: torch.Tensor, *, seed: int = 0,
                        split: str = "test", model_name: str = "model", dataset: str = "omniglot",
                        quiet: bool = True, log: Callable[[str], None] | None = None) -> pd.DataFrame:
    """Meta-test `model` on `images` (C, K, channels, H, W) for every class count of `protocol`.

    For meta-training's evaluations at its eval_steps: returns the tidy results table (see `result_frame`);
    `report.final_accuracy(frame)` reduces it to one accuracy per class count and LR. The model is
    copied, never modified.
    """
    sweep = Sweep(model, images, protocol, seed, split, quiet=quiet, log=log)
    info = describe(protocol, model_name, dataset)
    counts = sweep_counts(protocol, split, images.shape[0])
    return pd.concat([result_frame(sweep.run(c), info, c, split) for c in counts], ignore_index=True)


# ------------------------------------------------------------------------------- the run
def _validation_setup(config: Config) -> tuple[int | float, int, bool]:
    trained = training_config(config.checkpoint) if config.checkpoint else {}
    trained_data = trained.get("data", {}) if isinstance(trained.get("data"), dict) else {}
    val_classes = config.data.val_classes
    if val_classes is None:
        val_classes = trained_data.get("val_classes", 0) or 0
    split_seed = config.data.split_seed
    if split_seed is None:
        split_seed = trained_data.get("split_seed", trained.get("seed", config.seed))
    first_963 = config.data.first_963
    if first_963 is None:
        first_963 = bool(trained_data.get("first_963", False))
    return val_classes, int(split_seed), first_963


def load_splits(config: Config, device: torch.device) -> dict[str, torch.Tensor]:
    """The image tensors of the requested splits ("val": held-out meta-training classes; "test")."""
    from ..data import load_dataset, split_classes
    kwargs = dict(size=config.data.size, data_dir=config.data_dir, device=device, quiet=config.quiet)
    splits = {}
    val_classes, split_seed, first_963 = _validation_setup(config)
    if "val" in config.splits and val_classes:
        background = load_dataset(config.data.dataset, config.data.val_split, first_963=first_963, **kwargs)
        splits["val"] = split_classes(background, val_classes, split_seed)[1].images
    if "test" in config.splits:
        splits["test"] = load_dataset(config.data.dataset, config.data.test_split, **kwargs).images
    return splits


def sweep_counts(protocol: ProtocolConfig, split: str, available: int) -> list[int]:
    """Class counts to sweep on a split; validation caps them at the classes it holds."""
    if split == "val":
        return sorted({min(c, available) for c in protocol.classes})
    too_many = [c for c in protocol.classes if c > available]
    if too_many:
        raise ConfigError(f"protocol.classes {too_many} exceed the {available} classes of the test split")
    return list(protocol.classes)


def run(config: Config, run) -> dict:
    check_protocol(config.protocol)
    model = load_eval_model(config.checkpoint, run.device)
    splits = load_splits(config, run.device)
    state = run.load_checkpoint() or {"done": []}
    table = run.table("results")
    info = describe(config.protocol, str(config.checkpoint), config.data.dataset)
    run.log.info("meta-eval of %s: splits %s, %d LRs x %d runs", resolve_checkpoint(config.checkpoint),
                 ", ".join(f"{k} ({v.shape[0]} classes)" for k, v in splits.items()),
                 len(config.protocol.lrs), config.protocol.runs)
    for split, images in splits.items():
        sweep = Sweep(model, images, config.protocol, config.seed, split, quiet=config.quiet, log=run.log.info)
        for classes in sweep_counts(config.protocol, split, images.shape[0]):
            key = f"{split}/{classes}"
            if key in state["done"]:
                continue
            frame = result_frame(sweep.run(classes), info, classes, split)
            table.append(frame.to_dict("records"))
            best = best_learning_rates(frame).iloc[0]
            run.tracker.log({f"{split}/best_test_acc": float(best.test_acc), f"{split}/best_lr": float(best.lr)},
                            classes)
            run.log.info("%s, %d classes: best mean test accuracy %.4f at lr %g", split, classes,
                         best.test_acc, best.lr)
            state["done"].append(key)
            run.save_checkpoint(state)
            if run.stop_requested:
                raise RunInterrupted(f"stopped after {key}; resume with --resume")
    run.flush()
    frame = table.frame()
    selection = select_learning_rates(frame)
    summary = {}
    for row in selection.itertuples():
        summary[f"{row.selection}/{row.classes}/lr"] = float(row.lr)
        summary[f"{row.selection}/{row.classes}/test_acc"] = float(row.test_acc)
    return summary
