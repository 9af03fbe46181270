"""The sequential meta-test protocol (ANML/OML) and its variants: settings, task draws, results.

One sweep = one class count: every (learning rate, run) pair is a trajectory (`Trajectories`).
Run r draws its classes, their train/test split and its re-initialisation from seeded streams
shared by all learning rates, as the reference's separate jobs with one seed did. Trajectories
then learn the classes in order, one image per Adam step (the schedule, `schedule.py`), and are
evaluated on every class's train images (retention) and test images (generalisation).

`sweep.LRSweep` runs it; `reinit.py` re-initialises, `linear_engine.py` and `vmap_engine.py` train.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Annotated, Literal

import numpy as np
import torch

from ...core.config import NonEmpty, NonNegative, Positive, PositiveFloat
from ...core.errors import ConfigError
from ...core.seeding import torch_generator
from .trajectories import Trajectories

REFERENCE_LRS = [0.1, 0.055, 0.01, 0.0055, 0.001, 7e-4, 4e-4, 1e-4, 7e-5, 4e-5, 1e-5, 5.5e-6]
"""The reference's learning-rate sweep."""
REFERENCE_CLASSES = [10, 50, 75, 100, 200, 300, 400, 500, 600]
"""The reference's class counts."""


@dataclass
class ProtocolConfig:
    """How a model is meta-tested: what is re-initialised and trained, on how many classes, at which LRs."""

    eval_method: Literal["sequential", "iid", "zero-shot"] = "sequential"
    """sequential: one image per Adam step, class after class (the ANML/OML meta-test); iid: the
    oracle, shuffled minibatches of the same support set for `epochs`; zero-shot: a least-squares
    head fitted on the support set and no SGD at all (needs reinit_method=lstsq)."""
    reinit_method: Literal["kaiming", "lstsq"] = "kaiming"
    """kaiming: kaiming-normal weights, zero biases; lstsq: least-squares fit of one linear layer
    to one-hot labels, on its input features of `init_size` support images."""
    reinit_params: list[str] = field(default_factory=lambda: ["fc"])
    """Parameter-name prefixes to re-initialise before learning ([] re-initialises nothing)."""
    opt_params: Annotated[list[str], NonEmpty()] = field(default_factory=lambda: ["fc"])
    """Parameter-name prefixes that learn ("all" = every parameter, the unfrozen flavour); the rest are frozen."""
    init_size: Positive | None = None
    """Support images for the lstsq re-initialisation, drawn at random (all of them when it exceeds the
    support set); None takes one image per class, as the reference does."""
    classes: Annotated[list[Positive], NonEmpty()] = field(default_factory=lambda: list(REFERENCE_CLASSES))
    """Class counts to evaluate (how their classes are drawn: class_draws)."""
    class_draws: Literal["auto", "nested", "independent"] = "auto"
    """nested: each run draws the largest count's classes once, learns them in order and is
    measured on its first c classes after learning them, for every count c. The first c of a random
    order are a random c-subset, so each count's expected accuracy is the independent protocol's,
    at the cost of the largest count alone; the largest count's results are identical in both.
    independent: every count draws and learns its own classes, as the reference's separate jobs
    did. auto: nested where it applies (sequential, kaiming or no re-initialisation), else
    independent."""
    train_examples: Positive = 15
    """Images per class learned from (the support set); the retention measurement."""
    test_examples: Positive = 5
    """Held-out images per class; the generalisation measurement."""
    lrs: Annotated[list[PositiveFloat], NonEmpty()] = field(default_factory=lambda: list(REFERENCE_LRS))
    """Adam learning rates to sweep (ignored by zero-shot)."""
    runs: Positive = 10
    """Repeats per learning rate, each with its own class draw, split and re-initialisation."""
    eval_freq: NonNegative = 0
    """Evaluate after the first class, every `eval_freq` classes and at the end; 0 = only at the end."""
    epochs: Positive = 1
    """Passes over the support set (iid only)."""
    batch_size: Positive = 256
    """Minibatch size (iid only)."""
    memory_gb: PositiveFloat = 2.0
    """Memory for trajectory state (weights, Adam moments, temporaries); sets how many trajectories run at once."""
    trajectory_group: int = 0
    """Linear-head trajectories advanced together, step after step, before the next group starts
    (0 = as many as memory_gb allows). Results do not depend on it; only speed does (see
    benchmarks/bench_meta_eval.py --groups)."""
    compile: bool = True
    """Fuse the linear-head Adam step with torch.compile (falls back to eager ops where it cannot compile)."""

    def __post_init__(self) -> None:
        check_protocol(self)

    def learning_rates(self) -> list[float]:
        """The learning rates a sweep trains at: `lrs`, or [0.0] for zero-shot (which learns nothing)."""
        return [0.0] if self.eval_method == "zero-shot" else list(self.lrs)


def nestable(protocol: ProtocolConfig) -> bool:
    """Whether class counts can share one class draw: a sequential trajectory whose start does not
    look at its classes (lstsq fits on every support image; iid learns them all at once)."""
    return protocol.eval_method == "sequential" and (not protocol.reinit_params or protocol.reinit_method == "kaiming")


def nested_draws(protocol: ProtocolConfig) -> bool:
    """Whether this protocol's class counts share one class draw per run (class_draws, auto resolved)."""
    return protocol.class_draws == "nested" or (protocol.class_draws == "auto" and nestable(protocol))


def check_protocol(protocol: ProtocolConfig, per_class: int | None = None) -> None:
    """Raise ConfigError for settings the protocol cannot run."""
    if not protocol.classes or any(c < 1 for c in protocol.classes):
        raise ConfigError(f"protocol.classes must be positive class counts, got {protocol.classes}")
    if protocol.train_examples < 1 or protocol.test_examples < 1:
        raise ConfigError("protocol.train_examples and protocol.test_examples must be at least 1")
    if per_class is not None and protocol.train_examples + protocol.test_examples > per_class:
        raise ConfigError(
            f"train_examples + test_examples = {protocol.train_examples + protocol.test_examples} "
            f"but the data has only {per_class} images per class"
        )
    if protocol.eval_method != "zero-shot" and (not protocol.lrs or any(lr <= 0 for lr in protocol.lrs)):
        raise ConfigError(f"protocol.lrs must be positive learning rates, got {protocol.lrs}")
    if protocol.runs < 1 or protocol.eval_freq < 0 or protocol.epochs < 1 or protocol.batch_size < 1:
        raise ConfigError("protocol.runs, epochs and batch_size must be >= 1 and eval_freq >= 0")
    if protocol.eval_method == "zero-shot" and protocol.reinit_method != "lstsq":
        raise ConfigError("eval_method=zero-shot learns nothing, so it needs reinit_method=lstsq")
    if protocol.class_draws == "nested" and not nestable(protocol):
        raise ConfigError(
            f"protocol.class_draws=nested measures each class count part-way through the largest count's "
            f"sequential trajectory, but eval_method={protocol.eval_method} with reinit_method="
            f"{protocol.reinit_method} starts from or learns on all its classes at once; set "
            f"protocol.class_draws=independent (valid: nested with eval_method=sequential and "
            f"reinit_method=kaiming)"
        )
    if protocol.init_size is not None and protocol.init_size < 1:
        raise ConfigError(f"protocol.init_size must be >= 1 or null, got {protocol.init_size}")
    if protocol.trajectory_group < 0:
        raise ConfigError(
            f"protocol.trajectory_group must be >= 0 (0 = as many as memory_gb allows), got {protocol.trajectory_group}"
        )
    if protocol.memory_gb <= 0:
        raise ConfigError(f"protocol.memory_gb must be positive, got {protocol.memory_gb}")


# ------------------------------------------------------------------------------------ tasks
@dataclass
class Tasks:
    """The classes of every run and their train/test images, as flat indices into the dataset."""

    class_ids: torch.Tensor
    """(runs, classes) dataset class indices, in learning order; they are also the labels."""
    train: torch.Tensor
    """(runs, classes * train_examples) flat image indices (class * per_class + image), learning order."""
    test: torch.Tensor
    """(runs, classes * test_examples) flat image indices, class-major."""

    @property
    def classes(self) -> int:
        return self.class_ids.shape[1]

    def first(self, classes: int) -> Tasks:
        """The tasks of each run's first `classes` classes in learning order (a nested draw's smaller count)."""
        if classes == self.classes:
            return self
        train, test = self.train.shape[1] // self.classes, self.test.shape[1] // self.classes
        return Tasks(self.class_ids[:, :classes], self.train[:, : classes * train], self.test[:, : classes * test])

    def labels(self, images: Literal["train", "test"], runs: torch.Tensor) -> torch.Tensor:
        """(len(runs), images per run) the label of each `train` or `test` image of these runs."""
        per_class = (self.train if images == "train" else self.test).shape[1] // self.classes
        return self.class_ids[runs].repeat_interleave(per_class, dim=1)


def draw_tasks(
    num_classes: int,
    per_class: int,
    classes: int,
    train_examples: int,
    test_examples: int,
    runs: int,
    seed: int,
    *keys: object,
) -> Tasks:
    """Seeded class draws and per-class train/test splits, one per run (shared by all LRs)."""
    if classes > num_classes:
        raise ConfigError(f"cannot draw {classes} classes from a dataset of {num_classes}")
    ids, train, test = [], [], []
    for run in range(runs):
        generator = torch_generator(seed, "meta-eval-tasks", *keys, classes, run)
        chosen = torch.randperm(num_classes, generator=generator)[:classes]
        order = torch.rand(classes, per_class, generator=generator).argsort(1)
        flat = chosen.unsqueeze(1) * per_class + order
        ids.append(chosen)
        train.append(flat[:, :train_examples].flatten())
        test.append(flat[:, train_examples : train_examples + test_examples].flatten())
    return Tasks(torch.stack(ids), torch.stack(train), torch.stack(test))


def nested_groups(counts: list[int], lrs: dict[int, float] | None) -> list[tuple[list[int], list[float] | None]]:
    """The trajectories one nested class draw serves: (counts, their LR) per distinct chosen LR, or
    every count at every LR (`lrs` None). A count's trajectory stops at the largest count of its group."""
    if lrs is None:
        return [(sorted(counts), None)]
    by_lr: dict[float, list[int]] = {}
    for classes in sorted(counts):
        by_lr.setdefault(lrs[classes], []).append(classes)
    return [(group, [lr]) for lr, group in by_lr.items()]


def eval_points(classes: int, eval_freq: int) -> list[int]:
    """Class counts after which to evaluate: the first class, every eval_freq-th, and the last."""
    points = {classes}
    if eval_freq:
        points |= {1, *range(eval_freq, classes + 1, eval_freq)}
    return sorted(points)


def class_counts(protocol: ProtocolConfig, split: str, available: int) -> list[int]:
    """Class counts to meta-test on a split of `available` classes; validation caps them at the classes it holds."""
    if split == "val":
        return sorted({min(c, available) for c in protocol.classes})
    too_many = [c for c in protocol.classes if c > available]
    if too_many:
        raise ConfigError(f"protocol.classes {too_many} exceed the {available} classes of the {split} split")
    return list(protocol.classes)


# ------------------------------------------------------------------------------------ results
@dataclass
class MetaTestResult:
    """Per-class accuracies of every trajectory at every evaluation point of one class count."""

    trajectories: Trajectories
    """The learning rate and run of each of the T trajectories."""
    classes_trained: list[int]
    """(E,) classes learned at each evaluation point."""
    train_acc: np.ndarray
    """(E, T, classes) top-1 accuracy on each class's train images (retention)."""
    test_acc: np.ndarray
    """(E, T, classes) top-1 accuracy on each class's test images (generalisation)."""
    train_top5: np.ndarray
    """(E, T, classes) top-5 accuracy on train images."""
    test_top5: np.ndarray
    """(E, T, classes) top-5 accuracy on test images."""
    weights: torch.Tensor | None = None
    """(T, parameters) the learned parameters of each trajectory at the end, flattened; only with
    `LRSweep.run(..., return_weights=True)` (for checks against one-by-one training)."""
