"""The sequential-mastery experiment (Davidson & Mozer, CVPR 2020) and every training condition.

    sequential      one task per episode; an episode ends when every seen task (or only the new
                    one) passes the criterion on the held-out images. Epochs follow the
                    reference: 22,500 trials of the new task in every episode (episode 1
                    included), the earlier tasks sharing another 22,500 (see epochs.py)
    simultaneous    all tasks of a dimension (or all 30) trained together until all pass; an
                    epoch presents every (training image, query) pair once (450,000 trials for
                    10 queries on 45,000 training images)
    heterogeneous   the sequential protocol on an order that cycles through the 3 dimensions
    forgetting      for each E in `forgetting.after_episodes`, train the task of episode E+1
                    alone in sub-epochs from the baseline's weights at the end of episode E and
                    watch the earlier tasks decay; all of them in one run, as the reference did

Tables written to the run directory:
    epochs       one row per (epoch, trained task): train/test accuracy and loss, position in
                 the order, times trained, cumulative trials, mean test accuracy of older tasks
    criterion    one row per (episode, trained task): epochs and trials to criterion
    tests        with train.test_every_trials: one row per (test point, task), within epochs too
    forgetting   one row per (forgetting task, sub-epoch, tested task); sub-epoch 0 is the test
                 before the first sub-epoch
Checkpoints: `last` after every epoch and sub-epoch (resume is exact), `episode-K` at the end of
episode K.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Literal

import torch
import torch.nn.functional as F
from torch import nn

from ..core.checkpoint import load_checkpoint
from ..core.config import (Fraction, NonEmpty, NonNegative, NonNegativeFloat, Positive,
                           PositiveFloat, Range)
from ..core.errors import ConfigError, DataError, RunDiverged, RunInterrupted
from ..core.experiment import ExperimentConfig
from ..core.progress import progress
from ..core.run import tensor_digest
from ..core.seeding import derive_seed, generator_state, set_generator_state, torch_generator
from ..models import build_model
from ..models.mastery import NUM_QUERIES
from . import data as scene_data
from .allocator import tune_malloc
from .epochs import Curriculum, draw_all_pairs, draw_epoch, episode_counts
from .orders import FEATURES_PER_DIMENSION, NUM_FEATURES, heterogeneous_order, legacy_order, \
    williams_order


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


# ------------------------------------------------------------------------------ task orders
def task_order(config: Config) -> list[int]:
    """The tasks of each episode (sequential, heterogeneous) or the task set (simultaneous)."""
    tasks = config.tasks
    if tasks.condition == "simultaneous":
        if tasks.dimension is None:
            return list(range(NUM_FEATURES))
        return [v + FEATURES_PER_DIMENSION * tasks.dimension for v in range(FEATURES_PER_DIMENSION)]
    if tasks.condition == "heterogeneous":
        order = heterogeneous_order(tasks.num_tasks, config.seed, tasks.with_replacement)
    elif tasks.order == "explicit":
        if not tasks.explicit or any(t not in range(NUM_FEATURES) for t in tasks.explicit):
            raise ConfigError(f"tasks.explicit must list feature ids in 0..{NUM_FEATURES - 1}, "
                              f"got {tasks.explicit}")
        order = list(tasks.explicit)
    else:
        if tasks.dimension is None:
            raise ConfigError("tasks.dimension must be 0, 1 or 2 for a sequential order")
        index = config.seed if tasks.order_index is None else tasks.order_index
        build = williams_order if tasks.order == "williams" else legacy_order
        order = build(tasks.dimension, index, tasks.square_seed)
    if not 1 <= tasks.num_tasks <= len(order):
        raise ConfigError(f"tasks.num_tasks {tasks.num_tasks} must be in 1..{len(order)}")
    return order[:tasks.num_tasks]


def episode_tasks(order: list[int], episode: int) -> tuple[int, list[int]]:
    """(new task, earlier distinct tasks in first-trained order) of 0-based `episode`."""
    new = order[episode]
    old = [t for t in dict.fromkeys(order[:episode]) if t != new]
    return new, old


# ------------------------------------------------------------------------------ data
def resolve_data_path(config: Config) -> Path:
    """The configured file as is when it exists; otherwise generate it (or the default file)."""
    from ..scenes.generate import default_scenes_path, ensure_scenes
    spec = config.data
    if spec.path and Path(spec.path).expanduser().is_file():
        return Path(spec.path).expanduser()
    path = Path(spec.path).expanduser() if spec.path else default_scenes_path(
        spec.num_images, seed=spec.generator_seed, height=spec.height, width=spec.width,
        data_root=config.data_dir)
    return Path(ensure_scenes(path, spec.num_images, seed=spec.generator_seed, height=spec.height,
                              width=spec.width, device=config.device, quiet=config.quiet))


# ------------------------------------------------------------------------------ training
def one_hot(tasks: torch.Tensor) -> torch.Tensor:
    return F.one_hot(tasks, NUM_QUERIES).float()


def train_trials(model, optimizer, data: scene_data.SceneTensors, images: torch.Tensor,
                 task_ids: torch.Tensor, tasks: list[int], batch_size: int, run,
                 test_every: int | None = None, on_test=None) -> dict:
    """One pass over (image, task) trials; returns each task's mean train loss and accuracy.

    With `test_every`, `on_test(trials_done, task_trials)` is called after every batch that
    reaches or passes a multiple of `test_every` trials, except the last batch (the epoch's own
    test follows it); `task_trials` lists each task's trials so far in this pass. Testing does
    not change the training: the same weights come out with or without it."""
    device = data.device
    images, task_ids = images.to(device), task_ids.to(device)
    slot = torch.full((NUM_QUERIES,), -1, dtype=torch.long, device=device)
    slot[torch.tensor(tasks, device=device)] = torch.arange(len(tasks), device=device)
    loss_sum = torch.zeros(len(tasks), device=device)
    correct = torch.zeros(len(tasks), device=device)
    count = torch.zeros(len(tasks), device=device)
    total = images.shape[0]
    model.train()
    for start in range(0, total, batch_size):
        if run.stop_requested:
            raise RunInterrupted("stopped mid-epoch; the last epoch checkpoint is intact, "
                                 "resume with --resume")
        index, task = images[start:start + batch_size], task_ids[start:start + batch_size]
        target = data.labels[index, task].long()
        logits = model(data.batch(index), one_hot(task))
        losses = F.cross_entropy(logits, target, reduction="none")
        optimizer.zero_grad(set_to_none=True)
        losses.mean().backward()
        optimizer.step()
        where = slot[task]
        loss_sum.index_add_(0, where, losses.detach())
        correct.index_add_(0, where, (logits.detach().argmax(1) == target).float())
        count.index_add_(0, where, torch.ones_like(losses))
        end = min(start + batch_size, total)
        crossed = test_every and end // test_every > start // test_every
        if on_test is not None and crossed and end < total:
            on_test(end, [int(c) for c in count.cpu().tolist()])
            model.train()
    count = count.cpu().clamp_min(1)
    return {"loss": (loss_sum.cpu() / count).tolist(), "acc": (correct.cpu() / count).tolist()}


def evaluation_rows(data: scene_data.SceneTensors,
                    on_train_images: bool = False) -> tuple[int, int]:
    """[start, stop) rows the test pass uses: the held-out images, or with the reference's bug
    (`on_train_images`) the first num_test rows of the training range."""
    if on_train_images:
        return 0, min(data.num_test, data.num_train)
    return data.num_train, data.num_images


@torch.no_grad()
def evaluate(model, data: scene_data.SceneTensors, tasks: list[int], batch_size: int, *,
             on_train_images: bool = False, batchnorm_train: bool = False) -> dict:
    """Test accuracy and loss of every task in `tasks` on all held-out images, BatchNorm in eval
    mode. The reference's bugs, for comparison: `on_train_images` tests on the first num_test
    training images instead; `batchnorm_train` keeps BatchNorm in training mode (batch
    statistics; its running statistics, unused then, get updated)."""
    was_training = model.training
    model.eval()
    if batchnorm_train:
        for module in model.modules():
            if isinstance(module, nn.modules.batchnorm._BatchNorm):
                module.train()
    device = data.device
    first, stop = evaluation_rows(data, on_train_images)
    loss_sum = torch.zeros(len(tasks), device=device)
    correct = torch.zeros(len(tasks), device=device)
    queries = one_hot(torch.tensor(tasks, device=device))
    try:
        for start in range(first, stop, batch_size):
            index = torch.arange(start, min(start + batch_size, stop), device=device)
            x = data.batch(index)
            shared = None if model.query_dependent_features else model.features(x)
            for i, task in enumerate(tasks):
                query = queries[i].expand(index.shape[0], -1)
                logits = model(x, query) if shared is None else model.head(shared, query)
                target = data.labels[index, task].long()
                loss_sum[i] += F.cross_entropy(logits, target, reduction="sum")
                correct[i] += (logits.argmax(1) == target).sum()
    finally:
        model.train(was_training)
    return {"loss": (loss_sum.cpu() / (stop - first)).tolist(),
            "acc": (correct.cpu() / (stop - first)).tolist()}


# ------------------------------------------------------------------------------ the run
def make_optimizer(config: Config, model: nn.Module) -> torch.optim.Optimizer:
    return torch.optim.Adam(model.parameters(), lr=config.train.lr,
                            weight_decay=config.train.weight_decay)


def build(config: Config, data: scene_data.SceneTensors, device: torch.device):
    spec = {"name": config.model.name, "channels": list(config.model.channels),
            "hidden": list(config.model.hidden), "image_size": list(data.image_size),
            "dropout": config.model.dropout}
    if config.model.name == "query-modulated":
        spec["levels"] = list(config.model.levels)
    if config.model.name == "task-conditional":
        spec["conditioning"] = config.model.conditioning
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(derive_seed(config.seed, "model-init"))
        try:
            model = build_model(spec).to(device, memory_format=torch.channels_last)  # see SceneTensors.batch
        except ValueError as error:
            raise ConfigError(f"model: {error}") from None
    return model, make_optimizer(config, model)


def check_config(config: Config) -> None:
    train = config.train
    if train.batch_size < 1 or train.eval_batch_size < 1:
        raise ConfigError("train.batch_size and train.eval_batch_size must be positive")
    if not 0 < train.criterion < 1:
        raise ConfigError(f"train.criterion must be in (0, 1), got {train.criterion}")
    if train.max_epochs_per_episode is None and train.max_total_epochs is None:
        raise ConfigError("train.max_epochs_per_episode and train.max_total_epochs are both null: "
                          "an episode that never passes would train forever; set one of them")
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
            raise ConfigError(f"forgetting.after_episodes {bad} must be in 1..num_tasks-1 "
                              f"({config.tasks.num_tasks - 1}) so that a new task follows each")


def check_finite(losses: list[float], where: str) -> None:
    """Stop a run whose training loss is NaN or infinite (its last checkpoint stays finite)."""
    if not all(math.isfinite(loss) for loss in losses):
        raise RunDiverged(f"the training loss became {losses} at {where}; lower train.lr or "
                          f"check the data")


class Mastery:
    """State and loop of one run; `state()` is everything a checkpoint needs to resume exactly."""

    def __init__(self, config: Config, run, data: scene_data.SceneTensors):
        self.config, self.run, self.data = config, run, data
        self.model, self.optimizer = build(config, data, run.device)
        self.sampler = torch_generator(config.seed, "mastery-epochs")
        self.epoch_size = config.train.epoch_size or data.num_train
        if not 0 < self.epoch_size <= data.num_train:
            raise ConfigError(f"train.epoch_size {self.epoch_size} must be in 1..{data.num_train} "
                              f"(the training split)")
        self.train_labels = data.train_labels_cpu()
        self.order = task_order(config)
        self.simultaneous = config.tasks.condition == "simultaneous"
        self.episode = 0            # 0-based episode in progress
        self.epoch_in_episode = 0   # epochs finished in that episode
        self.global_epoch = 0
        self.cumulative_trials = 0
        self.first_pass: dict[int, int] = {}         # task -> epoch (in episode) of its first pass
        self.first_pass_trials: dict[int, int] = {}  # task -> its trials in the episode by then
        self.times_trained: dict[int, int] = {}
        self.budget_cut = False     # train.max_total_epochs ended the episodes
        self.phase = "episodes"
        # the forgetting experiment: one task per entry of forget_plan (after-episodes E)
        self.forget_plan: list[int] = sorted(config.forgetting.after_episodes)
        self.forget_index = 0       # entry in progress
        self.forget_started = False  # its weights are loaded and its sub-epoch 0 test logged
        self.forget_times: dict[int, int] = {}  # times_trained of the baseline at episode E
        self.forget_sampler: torch.Generator | None = None  # the task's own image stream
        self.forget_perm: torch.Tensor | None = None  # permutation of training images in use
        self.forget_pos = 0
        self.subepoch = 0
        self.forget_steps = 0       # sub-epochs over all forgetting tasks (the tracker's step)
        self.forget_subepochs: list[int] = []  # sub-epochs each finished forgetting task ran

    # -------------------------------------------------------------------------- checkpoints
    def state(self) -> dict:
        return {"model": self.model.state_dict(), "optimizer": self.optimizer.state_dict(),
                "sampler": generator_state(self.sampler), "torch_rng": torch.get_rng_state(),
                "cuda_rng": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
                "order": list(self.order), "episode": self.episode,
                "epoch_in_episode": self.epoch_in_episode, "global_epoch": self.global_epoch,
                "cumulative_trials": self.cumulative_trials,
                "first_pass": {int(k): int(v) for k, v in self.first_pass.items()},
                "first_pass_trials": {int(k): int(v) for k, v in self.first_pass_trials.items()},
                "times_trained": {int(k): int(v) for k, v in self.times_trained.items()},
                "budget_cut": self.budget_cut, "phase": self.phase,
                "forget_plan": list(self.forget_plan), "forget_index": self.forget_index,
                "forget_started": self.forget_started,
                "forget_times": {int(k): int(v) for k, v in self.forget_times.items()},
                "forget_sampler": None if self.forget_sampler is None else
                generator_state(self.forget_sampler),
                "forget_perm": self.forget_perm, "forget_pos": self.forget_pos,
                "subepoch": self.subepoch, "forget_steps": self.forget_steps,
                "forget_subepochs": list(self.forget_subepochs)}

    def restore(self, state: dict) -> None:
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        set_generator_state(self.sampler, state["sampler"])
        torch.set_rng_state(state["torch_rng"])
        if torch.cuda.is_available() and state["cuda_rng"]:
            torch.cuda.set_rng_state_all(state["cuda_rng"])
        self.order = list(state["order"])
        self.episode = int(state["episode"])
        self.epoch_in_episode = int(state["epoch_in_episode"])
        self.global_epoch = int(state["global_epoch"])
        self.cumulative_trials = int(state["cumulative_trials"])
        self.first_pass = {int(k): int(v) for k, v in state["first_pass"].items()}
        self.first_pass_trials = {int(k): int(v)
                                  for k, v in state.get("first_pass_trials", {}).items()}
        self.times_trained = {int(k): int(v) for k, v in state["times_trained"].items()}
        self.budget_cut = bool(state.get("budget_cut", False))
        self.phase = state["phase"]
        self.forget_plan = [int(e) for e in state.get("forget_plan", self.forget_plan)]
        self.forget_index = int(state.get("forget_index", 0))
        self.forget_started = bool(state.get("forget_started", False))
        self.forget_times = {int(k): int(v) for k, v in state.get("forget_times", {}).items()}
        self.forget_sampler = None
        if state.get("forget_sampler") is not None:
            self.forget_sampler = torch.Generator()
            set_generator_state(self.forget_sampler, state["forget_sampler"])
        self.forget_perm = state.get("forget_perm")
        self.forget_pos = int(state.get("forget_pos", 0))
        self.subepoch = int(state["subepoch"])
        self.forget_steps = int(state.get("forget_steps", 0))
        self.forget_subepochs = [int(n) for n in state.get("forget_subepochs", [])]

    def checkpoint(self, name: str = "last") -> None:
        self.run.save_checkpoint(self.state(), name)

    def test(self, tasks: list[int]) -> dict:
        """`evaluate` with this run's test options (looked up at call time: tests script it)."""
        train = self.config.train
        return evaluate(self.model, self.data, tasks, train.eval_batch_size,
                        on_train_images=train.legacy_test_on_train_images,
                        batchnorm_train=train.legacy_batchnorm_train_at_test)

    # -------------------------------------------------------------------------- episodes
    @property
    def num_episodes(self) -> int:
        return 1 if self.simultaneous else len(self.order)

    def current_tasks(self) -> tuple[list[int], list[int]]:
        """(tasks trained this episode, trials per epoch of each)."""
        train = self.config.train
        if self.simultaneous:   # every (training image, query) pair once per epoch
            return list(self.order), [self.epoch_size] * len(self.order)
        new, old = episode_tasks(self.order, self.episode)
        counts = episode_counts(self.epoch_size, len(old), self.episode + 1, train.new_task_share,
                                train.curriculum, train.ratio, train.alpha)
        return [new, *old], counts

    def draw(self, tasks: list[int], counts: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
        if self.simultaneous:
            return draw_all_pairs(self.data.num_train, tasks, counts[0], self.sampler)
        return draw_epoch(self.train_labels, tasks, counts, self.sampler,
                          self.config.train.min_minority)

    def position(self, task: int) -> int:
        return self.order.index(task) + 1

    def budget_spent(self) -> bool:
        budget = self.config.train.max_total_epochs
        return budget is not None and self.global_epoch >= budget

    def record_pass(self, task: int, acc: float, epoch: int, trials: int) -> None:
        """Remember a task's first passing test: its epoch and its trials in the episode."""
        if acc > self.config.train.criterion and task not in self.first_pass:
            self.first_pass[task] = epoch
            self.first_pass_trials[task] = trials

    def run_episodes(self, last_episode: int) -> None:
        """Train episodes until 0-based `self.episode` reaches `last_episode` (exclusive), or
        until train.max_total_epochs is spent."""
        train = self.config.train
        while self.episode < last_episode:
            if self.budget_spent():
                self.stop_at_budget()
                return
            tasks, counts = self.current_tasks()
            if self.epoch_in_episode == 0:
                for task in tasks:
                    self.times_trained[task] = self.times_trained.get(task, 0) + 1
            images, task_ids = self.draw(tasks, counts)

            def test_point(done: int, task_trials: list[int]) -> None:
                test = self.test(tasks)
                in_episode = [self.epoch_in_episode * c + n for c, n in zip(counts, task_trials)]
                for task, acc, trials in zip(tasks, test["acc"], in_episode):
                    self.record_pass(task, acc, self.epoch_in_episode + 1, trials)
                self.log_test_point(tasks, done, in_episode, test, epoch_end=False)

            stats = train_trials(self.model, self.optimizer, self.data, images, task_ids, tasks,
                                 train.batch_size, self.run, train.test_every_trials,
                                 test_point if train.test_every_trials else None)
            check_finite(stats["loss"], f"epoch {self.global_epoch + 1} (episode {self.episode + 1})")
            test = self.test(tasks)
            self.epoch_in_episode += 1
            self.global_epoch += 1
            self.cumulative_trials += sum(counts)
            for task, acc, count in zip(tasks, test["acc"], counts):
                self.record_pass(task, acc, self.epoch_in_episode, self.epoch_in_episode * count)
            if train.test_every_trials:
                self.log_test_point(tasks, sum(counts),
                                    [self.epoch_in_episode * c for c in counts], test,
                                    epoch_end=True)
            self.log_epoch(tasks, counts, stats, test)
            judged = tasks if train.criterion_tasks == "all" or self.simultaneous else tasks[:1]
            passed = all(acc > train.criterion for task, acc in zip(tasks, test["acc"])
                         if task in judged)
            cap = train.max_epochs_per_episode
            capped = cap is not None and self.epoch_in_episode >= cap
            if passed or capped:
                if capped and not passed:
                    self.run.log.warning("episode %d hit max_epochs_per_episode=%d before the "
                                         "criterion", self.episode + 1, cap)
                self.log_criterion(tasks, counts, passed)
                self.episode += 1
                self.epoch_in_episode = 0
                self.first_pass, self.first_pass_trials = {}, {}
                self.checkpoint()
                self.checkpoint(f"episode-{self.episode}")
            else:
                self.checkpoint()
            if self.run.stop_requested:
                raise RunInterrupted(f"stopped after epoch {self.global_epoch}; resume with --resume")

    def stop_at_budget(self) -> None:
        """End the episodes where they stand; an episode cut short is recorded as not passed."""
        if self.budget_cut:
            return
        self.run.log.warning("train.max_total_epochs=%d reached in episode %d: the run ends here",
                             self.config.train.max_total_epochs, self.episode + 1)
        if self.epoch_in_episode > 0:
            self.log_criterion(*self.current_tasks(), passed=False)
        self.budget_cut = True
        self.checkpoint()

    def log_epoch(self, tasks, counts, stats, test) -> None:
        older = [acc for task, acc in zip(tasks, test["acc"])
                 if not self.simultaneous and task != tasks[0]]
        mean_older = sum(older) / len(older) if older else math.nan
        rows = []
        for i, task in enumerate(tasks):
            rows.append({"episode": self.episode + 1, "epoch": self.global_epoch,
                         "epoch_in_episode": self.epoch_in_episode, "task": task,
                         "position": self.position(task),
                         "is_new": bool(i == 0 and not self.simultaneous),
                         "times_trained": self.times_trained[task], "trials": counts[i],
                         "train_acc": stats["acc"][i], "train_loss": stats["loss"][i],
                         "test_acc": test["acc"][i], "test_loss": test["loss"][i],
                         "mean_older_test_acc": mean_older,
                         "cumulative_trials": self.cumulative_trials})
        self.run.table("epochs").append(rows)
        metrics = {"mastery/episode": self.episode + 1,
                   "mastery/test_acc/mean_seen": sum(test["acc"]) / len(tasks),
                   "mastery/test_acc/min_seen": min(test["acc"]),
                   "mastery/train_loss/mean": sum(stats["loss"]) / len(tasks)}
        if not self.simultaneous:
            metrics["mastery/test_acc/new"] = test["acc"][0]
            metrics["mastery/test_acc/mean_older"] = mean_older
        self.run.tracker.log(metrics, self.global_epoch)

    def log_test_point(self, tasks, trials_in_epoch: int, task_trials: list[int], test,
                       epoch_end: bool) -> None:
        """A row per task of the `tests` table (train.test_every_trials), epoch ends included;
        `task_trials` counts each task's trials in the episode up to this test."""
        in_progress = 0 if epoch_end else 1   # mid-epoch: the counters still hold the last epoch
        done = self.cumulative_trials + (0 if epoch_end else trials_in_epoch)
        self.run.table("tests").append([
            {"episode": self.episode + 1, "epoch": self.global_epoch + in_progress,
             "epoch_in_episode": self.epoch_in_episode + in_progress,
             "trials_in_epoch": trials_in_epoch, "epoch_end": epoch_end, "task": task,
             "is_new": bool(i == 0 and not self.simultaneous), "task_trials": task_trials[i],
             "cumulative_trials": done, "test_acc": test["acc"][i], "test_loss": test["loss"][i]}
            for i, task in enumerate(tasks)])

    def log_criterion(self, tasks, counts, passed: bool) -> None:
        rows = []
        for i, task in enumerate(tasks):
            epochs = self.first_pass.get(task)
            trials = None if epochs is None else self.first_pass_trials.get(task, epochs * counts[i])
            rows.append({"episode": self.episode + 1, "task": task, "position": self.position(task),
                         "is_new": bool(i == 0 and not self.simultaneous),
                         "times_trained": self.times_trained[task], "trials_per_epoch": counts[i],
                         "epochs_to_criterion": math.nan if epochs is None else epochs,
                         "trials_to_criterion": math.nan if trials is None else trials,
                         "reached": epochs is not None, "episode_passed": passed,
                         "episode_epochs": self.epoch_in_episode})
        self.run.table("criterion").append(rows)

    # -------------------------------------------------------------------------- forgetting
    def forgetting_source(self, after: int) -> Path:
        """The checkpoint a forgetting task after episode `after` starts from."""
        source = self.config.forgetting.source_run
        if source is None:
            return self.run.checkpoint_path(f"episode-{after}")
        return Path(source).expanduser() / "checkpoints" / f"episode-{after}.pt"

    def use_source_run(self) -> None:
        """Forgetting from another run: check its checkpoints and take its task order."""
        missing = [str(self.forgetting_source(e)) for e in self.forget_plan
                   if not self.forgetting_source(e).is_file()]
        if missing:
            raise DataError(f"forgetting.source_run has no checkpoint {', '.join(missing)}; run "
                            f"its sequential condition through episode {max(self.forget_plan)} first")
        last = self.forgetting_source(self.forget_plan[-1])
        self.order = [int(t) for t in load_checkpoint(last)["order"]]
        if len(self.order) <= self.forget_plan[-1]:
            raise DataError(f"{last}: its order {self.order} has no task after episode "
                            f"{self.forget_plan[-1]}")
        self.phase = "forgetting"

    def begin_forgetting(self) -> None:
        """After this run's own baseline episodes: keep the tasks whose episode was reached."""
        reached = [e for e in self.forget_plan if e <= self.episode]
        if len(reached) < len(self.forget_plan):
            self.run.log.warning("the baseline ended after episode %d (train.max_total_epochs): "
                                 "no forgetting task after episodes %s", self.episode,
                                 [e for e in self.forget_plan if e > self.episode])
        self.forget_plan = reached
        self.phase = "forgetting"

    def forgetting_tasks(self, after: int) -> list[int]:
        """[the new task of episode after+1, then the earlier tasks in first-trained order]."""
        new, old = episode_tasks(self.order, after)
        return [new, *old]

    def start_forgetting_task(self, after: int, tasks: list[int]) -> None:
        """Load the baseline's weights at the end of episode `after` (weights only), choose the
        optimizer, and record the test of every task before the first sub-epoch."""
        path = self.forgetting_source(after)
        state = load_checkpoint(path)
        try:
            self.model.load_state_dict(state["model"])
        except RuntimeError as error:
            raise DataError(f"{path}: its model does not fit this config's model "
                            f"({str(error).splitlines()[0]})") from None
        if self.forget_index == 0 or not self.config.forgetting.carry_optimizer:
            self.optimizer = make_optimizer(self.config, self.model)
        self.forget_times = {int(k): int(v) for k, v in state["times_trained"].items()}
        self.subepoch, self.forget_perm, self.forget_pos = 0, None, 0
        # its own stream: the same images whether the baseline ran here or in a source run
        self.forget_sampler = torch_generator(self.config.seed, "mastery-forgetting", after)
        self.log_forgetting(after, tasks, self.test(tasks))
        self.forget_started = True
        self.checkpoint()

    def forgetting_images(self, trials: int) -> torch.Tensor:
        """The next `trials` training images: consecutive slices of a permutation, redrawn when
        it runs out (a sub-epoch may span two)."""
        parts = []
        while trials > 0:
            if self.forget_perm is None or self.forget_pos >= self.forget_perm.shape[0]:
                self.forget_perm = torch.randperm(self.data.num_train,
                                                  generator=self.forget_sampler)
                self.forget_pos = 0
            part = self.forget_perm[self.forget_pos:self.forget_pos + trials]
            parts.append(part)
            self.forget_pos += part.shape[0]
            trials -= part.shape[0]
        return torch.cat(parts)

    def run_forgetting(self) -> None:
        """For each after-episode E: train the task of episode E+1 alone in sub-epochs from the
        baseline's weights at the end of episode E, testing every task before and after each."""
        spec, train = self.config.forgetting, self.config.train
        while self.forget_index < len(self.forget_plan):
            after = self.forget_plan[self.forget_index]
            tasks = self.forgetting_tasks(after)
            if not self.forget_started:
                self.start_forgetting_task(after, tasks)
            finished = False
            while not finished:
                images = self.forgetting_images(spec.subepoch_trials)
                task_ids = torch.full_like(images, tasks[0])
                stats = train_trials(self.model, self.optimizer, self.data, images, task_ids,
                                     tasks[:1], train.batch_size, self.run)
                check_finite(stats["loss"], f"forgetting after episode {after}, sub-epoch "
                                            f"{self.subepoch + 1}")
                test = self.test(tasks)
                self.subepoch += 1
                self.forget_steps += 1
                self.cumulative_trials += spec.subepoch_trials
                self.log_forgetting(after, tasks, test)
                self.run.tracker.log({"forgetting/after_episode": after,
                                      "forgetting/test_acc/new": test["acc"][0],
                                      "forgetting/test_acc/mean_older": sum(test["acc"][1:]) /
                                      max(1, len(tasks) - 1)}, self.forget_steps)
                passed = test["acc"][0] > train.criterion
                finished = passed or self.subepoch >= spec.max_subepochs
                if finished:
                    if not passed:
                        self.run.log.warning("forgetting after episode %d hit max_subepochs=%d "
                                             "before the new task passed", after, spec.max_subepochs)
                    self.forget_subepochs.append(self.subepoch)
                    self.forget_index += 1
                    self.forget_started = False
                self.checkpoint()
                if self.run.stop_requested:
                    raise RunInterrupted(f"stopped after forgetting sub-epoch {self.subepoch} "
                                         f"(after episode {after}); resume with --resume")
        self.phase = "done"

    def log_forgetting(self, after: int, tasks: list[int], test: dict) -> None:
        trials = self.subepoch * self.config.forgetting.subepoch_trials
        self.run.table("forgetting").append([
            {"after_episode": after, "subepoch": self.subepoch, "trials": trials, "task": task,
             "position": self.position(task), "is_new": i == 0,
             "times_trained": 0 if i == 0 else self.forget_times.get(task, 0),
             "test_acc": test["acc"][i], "test_loss": test["loss"][i]}
            for i, task in enumerate(tasks)])


def run(config: Config, run) -> dict:
    check_config(config)
    train = config.train
    if train.legacy_test_on_train_images or train.legacy_batchnorm_train_at_test:
        run.log.warning("legacy test switches on (the reference's bugs): test on training images "
                        "%s, BatchNorm in training mode at test %s",
                        train.legacy_test_on_train_images, train.legacy_batchnorm_train_at_test)
    path = resolve_data_path(config)
    data = scene_data.load(path, config.data.test_fraction, run.device)
    run.check_data({"path": str(path.resolve()), "images": data.num_images,
                    "image_size": list(data.image_size), "num_train": data.num_train,
                    "content": tensor_digest(data.images, data.labels)})
    run.log.info("data %s: %d train + %d held-out test images of %dx%d on %s", path,
                 data.num_train, data.num_test, *data.image_size, data.device)
    if run.device.type == "cpu":   # after loading: the data's own temporaries go back to the OS
        run.log.info("allocator: %s", tune_malloc().detail)
    mastery = Mastery(config, run, data)
    plan = mastery.forget_plan
    state = run.load_checkpoint()
    if state is not None:
        mastery.restore(state)
    elif plan and config.forgetting.source_run:
        mastery.use_source_run()
    run.log.info("model %s: %d parameters; order %s", config.model.name,
                 sum(p.numel() for p in mastery.model.parameters()), mastery.order)
    if mastery.phase == "episodes":
        mastery.run_episodes(max(plan) if plan else mastery.num_episodes)
        if plan:
            mastery.begin_forgetting()
    if mastery.phase == "forgetting":
        mastery.run_forgetting()
    run.flush()
    return summarize(run, mastery)


def summarize(run, mastery: Mastery) -> dict:
    criterion = run.table("criterion").frame()
    final = {"episodes": mastery.episode, "epochs": mastery.global_epoch,
             "cumulative_trials": mastery.cumulative_trials, "order": list(mastery.order)}
    if len(criterion):
        new = criterion[criterion["is_new"]] if not mastery.simultaneous else criterion
        final["new_task_trials"] = [None if math.isnan(v) else int(v)
                                    for v in new["trials_to_criterion"]]
        final["all_reached"] = bool(criterion["reached"].all())
    if mastery.budget_cut:
        final["budget_exhausted"] = True
    if mastery.forget_subepochs:
        final["forgetting_after"] = list(mastery.forget_plan)
        final["forgetting_subepochs"] = list(mastery.forget_subepochs)
    return final
