"""The sequential-mastery config: data, model, task order, training protocol, forgetting.

Every value is checked when the config loads (`metacl config show`, `metacl sweep --dry-run`),
before any run starts.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Annotated, Literal

from ..core.config import Fraction, NonEmpty, NonNegative, NonNegativeFloat, Positive, PositiveFloat, Range
from ..core.errors import ConfigError
from ..core.experiment import ExperimentConfig
from .epochs import Curriculum


@dataclass
class DataConfig:
    path: str | None = None
    """Scenes HDF5 file (metacl or reference layout). None generates one under data_dir on first use; a path that does not exist yet is generated there."""
    num_images: Positive = 50000
    """Images to generate when the file does not exist yet."""
    height: Positive = 120
    """Image height in pixels when generating."""
    width: Positive = 160
    """Image width in pixels when generating."""
    generator_seed: int = 0
    """Seed of the generated dataset (independent of the run's seed, so runs share one file)."""
    test_fraction: Fraction = 0.1
    """Held-out share: the last round(test_fraction * N) images are never trained on."""


@dataclass
class ModelConfig:
    name: Literal["cnn-mlp", "query-modulated", "task-conditional"] = "cnn-mlp"
    """cnn-mlp (the paper's), query-modulated (per-channel conv bias from the query) or task-conditional (query gate/shift before every conv)."""
    channels: Annotated[list[Positive], NonEmpty()] = field(default_factory=lambda: [16, 32, 48, 64])
    """Filters of each conv block (each block halves the image)."""
    hidden: list[Positive] = field(default_factory=lambda: [512, 512, 512, 512])
    """Units of each hidden MLP layer."""
    dropout: bool = False
    """Spatial dropout 0.2 in the conv blocks and 0.5 in the MLP."""
    levels: Annotated[list[Positive], NonEmpty()] = field(default_factory=lambda: [1])
    """query-modulated only: conv layers (1-based) whose output gets the query bias."""
    conditioning: Literal["multiplicative", "additive", "both"] = "both"
    """task-conditional only: x * sigmoid(W_m q + b_m), x + W_a q + b_a, or both (the reference's: gate, then shift), before every conv."""


@dataclass
class TasksConfig:
    condition: Literal["sequential", "simultaneous", "heterogeneous"] = "sequential"
    """sequential (one new task per episode), simultaneous (all tasks at once) or heterogeneous (sequential, cycling through the 3 dimensions)."""
    dimension: int | None = 0
    """0 colour, 1 shape, 2 texture. simultaneous with None trains all 30 features."""
    num_tasks: Positive = 10
    """Episodes (tasks) of a sequential or heterogeneous run."""
    order: Literal["williams", "legacy", "explicit"] = "williams"
    """williams: balanced Latin square row; legacy: the reference's exact orders; explicit: the `explicit` list."""
    order_index: NonNegative | None = None
    """Row of the square; None uses the run's seed."""
    square_seed: int = 0
    """Seed that relabels the Williams square (legacy: that shuffles the reference square)."""
    explicit: list[int] = field(default_factory=list)
    """Feature ids (0..29) in training order, for order=explicit."""
    with_replacement: bool = False
    """heterogeneous only: draw features with replacement, as the reference did (orders may repeat a task)."""


@dataclass
class TrainConfig:
    lr: PositiveFloat = 5e-4
    """Adam learning rate."""
    weight_decay: NonNegativeFloat = 1e-4
    """Adam weight decay."""
    batch_size: Positive = 1500
    """Trials per optimiser step."""
    eval_batch_size: Positive = 2500
    """Test images per forward pass (memory only; results do not depend on it, except with legacy_batchnorm_train_at_test)."""
    epoch_size: Positive | None = None
    """Trials an epoch is sized against; None uses the whole training split (45,000 for a 50k file). simultaneous: training images per query (None: every one)."""
    new_task_share: Fraction = 0.5
    """Share of epoch_size given to the new task in every episode, episode 1 included (22,500 of 45,000); ignored by the power curriculum."""
    curriculum: Curriculum = "uniform"
    """uniform: earlier tasks share the rest evenly; ratio: by r^(t-1); power: every task t of episode E, the new one included, gets a share of the whole epoch proportional to (E-t+1)^(-alpha)."""
    ratio: PositiveFloat = 1.25
    """r of the ratio curriculum."""
    alpha: NonNegativeFloat = 1.14
    """alpha of the power curriculum."""
    criterion: Fraction = 0.95
    """Test accuracy a task must exceed."""
    criterion_tasks: Literal["all", "new"] = "all"
    """An episode ends when all seen tasks pass the criterion, or only the new one."""
    max_epochs_per_episode: Positive | None = 100
    """Cap: an episode that has not passed by then ends anyway (recorded as not reached). None: no per-episode cap (set max_total_epochs)."""
    max_total_epochs: Positive | None = None
    """Whole-run budget, the reference's (1,000 epochs): the run ends where it stands once this many epochs are trained (the cut episode is recorded as not passed). None: no budget."""
    test_every_trials: Positive | None = None
    """Also test every this many trials within an epoch (at the first batch end at or past each multiple); trials to criterion then counts up to the first passing test point. None: test once per epoch (the paper's protocol). Episodes still end only at epoch ends."""
    min_minority: Annotated[float, Range(0, 0.5)] = 0.2
    """Each task's sample is redrawn until its minority class is at least this share."""
    legacy_test_on_train_images: bool = False
    """The reference's bug: test on the first N images of the training range (N = the held-out count, 5,000 of 50k), which are also trained on, instead of the held-out images."""
    legacy_batchnorm_train_at_test: bool = False
    """The reference's bug: BatchNorm in training mode at test time (batch statistics, results then depend on eval_batch_size; dropout stays off)."""


@dataclass
class ForgettingConfig:
    after_episodes: list[Positive] = field(default_factory=list)
    """Forgetting tasks: for each E, train the task of episode E+1 alone from the baseline's weights at the end of episode E (the reference: 1..9, all in one run). Empty: off."""
    source_run: str | None = None
    """Baseline run directory whose `episode-E` checkpoints to start from; None trains the baseline's episodes 1..max(after_episodes) in this run first."""
    subepoch_trials: Positive = 1500
    """Trials of the new task between tests: consecutive slices of a permutation of the training images, a fresh permutation each pass."""
    max_subepochs: Positive = 1000
    """Cap on the sub-epochs of each forgetting task whose new task never passes the criterion."""
    carry_optimizer: bool = True
    """As the reference: the first forgetting task starts with a fresh Adam (only the weights are loaded) and each later one carries Adam's state on from the one before. False: a fresh Adam for each."""


@dataclass
class Config(ExperimentConfig):
    experiment: str = "mastery"
    """Which experiment this config runs; one of the keys of metacl.core.experiment.EXPERIMENTS."""
    data: DataConfig = field(default_factory=DataConfig)
    """The scenes dataset and its held-out split."""
    model: ModelConfig = field(default_factory=ModelConfig)
    """The network."""
    tasks: TasksConfig = field(default_factory=TasksConfig)
    """Condition and task order."""
    train: TrainConfig = field(default_factory=TrainConfig)
    """Optimiser, epoch composition and criterion."""
    forgetting: ForgettingConfig = field(default_factory=ForgettingConfig)
    """The forgetting experiment."""

    def __post_init__(self) -> None:
        """Checks across fields (each field's own range is checked by its type)."""
        config, train = self, self.train
        if train.max_epochs_per_episode is None and train.max_total_epochs is None:
            raise ConfigError(
                "train.max_epochs_per_episode and train.max_total_epochs are both null: "
                "an episode that never passes would train forever; set one of them"
            )
        if config.tasks.dimension is not None and config.tasks.dimension not in (0, 1, 2):
            raise ConfigError(f"tasks.dimension {config.tasks.dimension}; valid choices: 0, 1, 2, null")
        after = config.forgetting.after_episodes
        if after:
            if config.tasks.condition == "simultaneous":
                raise ConfigError("forgetting needs a sequential or heterogeneous condition")
            if len(set(after)) != len(after):
                raise ConfigError(f"forgetting.after_episodes {after} lists an episode twice")
            bad = [e for e in after if not 1 <= e < config.tasks.num_tasks]
            if bad:
                raise ConfigError(
                    f"forgetting.after_episodes {bad} must be in 1..num_tasks-1 "
                    f"({config.tasks.num_tasks - 1}) so that a new task follows each"
                )
