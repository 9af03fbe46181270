"""The sequential-mastery experiment (Davidson & Mozer, CVPR 2020) and every training condition.

    sequential      one task per episode; an episode ends when every seen task (or only the new
                    one) passes the criterion on the held-out images
    simultaneous    all tasks of a dimension (or all 30) trained together until all pass
    heterogeneous   the sequential protocol on an order that cycles through the 3 dimensions
    forgetting      after episode E, train the next task alone in short sub-epochs and watch
                    the earlier tasks decay (`forgetting.after_episode`)

Tables written to the run directory:
    epochs       one row per (epoch, trained task): train/test accuracy and loss, position in
                 the order, times trained, cumulative trials, mean test accuracy of older tasks
    criterion    one row per (episode, trained task): epochs and trials to criterion
    forgetting   one row per (sub-epoch, task) of the forgetting phase
Checkpoints: `last` after every epoch (resume is exact), `episode-K` at the end of episode K.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Literal

import torch
import torch.nn.functional as F

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
from .epochs import Curriculum, allocate, draw_epoch, episode_counts
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
    conditioning: Literal["multiplicative", "additive", "both"] = "multiplicative"
    """task-conditional only: x * sigmoid(W_m q), x + W_a q, or both, before every conv."""


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
    """Test images per forward pass (memory only; results do not depend on it)."""
    epoch_size: Positive | None = None
    """Trials per epoch; None uses the whole training split (45,000 for a 50k file)."""
    new_task_share: Fraction = 0.5
    """Share of an epoch given to the new task once earlier tasks exist (22,500 of 45,000)."""
    curriculum: Curriculum = "uniform"
    """How earlier tasks share the rest: uniform, ratio (r^(t-1)) or power ((E-t+1)^(-alpha))."""
    ratio: PositiveFloat = 1.25
    """r of the ratio curriculum."""
    alpha: NonNegativeFloat = 1.14
    """alpha of the power curriculum."""
    criterion: Fraction = 0.95
    """Test accuracy a task must exceed."""
    criterion_tasks: Literal["all", "new"] = "all"
    """An episode ends when all seen tasks pass the criterion, or only the new one."""
    max_epochs_per_episode: Positive = 100
    """Cap: an episode that has not passed by then ends anyway (recorded as not reached)."""
    min_minority: Annotated[float, Range(0, 0.5)] = 0.2
    """Each task's sample is redrawn until its minority class is at least this share."""


@dataclass
class ForgettingConfig:
    after_episode: Positive | None = None
    """Run the forgetting experiment from the end of episode E (None: off)."""
    source_run: str | None = None
    """Run directory whose `episode-E` checkpoint to start from; None trains episodes 1..E here first."""
    subepoch_trials: Positive = 1500
    """Trials of the new task between tests."""
    max_subepochs: Positive = 200
    """Cap on sub-epochs if the new task never passes the criterion."""


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
                 task_ids: torch.Tensor, tasks: list[int], batch_size: int, run) -> dict:
    """One pass over (image, task) trials; returns each task's mean train loss and accuracy."""
    device = data.device
    images, task_ids = images.to(device), task_ids.to(device)
    slot = torch.full((NUM_QUERIES,), -1, dtype=torch.long, device=device)
    slot[torch.tensor(tasks, device=device)] = torch.arange(len(tasks), device=device)
    loss_sum = torch.zeros(len(tasks), device=device)
    correct = torch.zeros(len(tasks), device=device)
    count = torch.zeros(len(tasks), device=device)
    model.train()
    for start in range(0, images.shape[0], batch_size):
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
    count = count.cpu().clamp_min(1)
    return {"loss": (loss_sum.cpu() / count).tolist(), "acc": (correct.cpu() / count).tolist()}


@torch.no_grad()
def evaluate(model, data: scene_data.SceneTensors, tasks: list[int], batch_size: int) -> dict:
    """Test accuracy and loss of every task in `tasks` on all held-out images (BatchNorm in eval)."""
    was_training = model.training
    model.eval()
    device = data.device
    loss_sum = torch.zeros(len(tasks), device=device)
    correct = torch.zeros(len(tasks), device=device)
    queries = one_hot(torch.tensor(tasks, device=device))
    for start in range(data.num_train, data.num_images, batch_size):
        index = torch.arange(start, min(start + batch_size, data.num_images), device=device)
        x = data.batch(index)
        shared = None if model.query_dependent_features else model.features(x)
        for i, task in enumerate(tasks):
            query = queries[i].expand(index.shape[0], -1)
            logits = model(x, query) if shared is None else model.head(shared, query)
            target = data.labels[index, task].long()
            loss_sum[i] += F.cross_entropy(logits, target, reduction="sum")
            correct[i] += (logits.argmax(1) == target).sum()
    model.train(was_training)
    return {"loss": (loss_sum.cpu() / data.num_test).tolist(),
            "acc": (correct.cpu() / data.num_test).tolist()}


# ------------------------------------------------------------------------------ the run
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
    optimizer = torch.optim.Adam(model.parameters(), lr=config.train.lr,
                                 weight_decay=config.train.weight_decay)
    return model, optimizer


def check_config(config: Config) -> None:
    train = config.train
    if train.batch_size < 1 or train.eval_batch_size < 1:
        raise ConfigError("train.batch_size and train.eval_batch_size must be positive")
    if not 0 < train.criterion < 1:
        raise ConfigError(f"train.criterion must be in (0, 1), got {train.criterion}")
    if train.max_epochs_per_episode < 1:
        raise ConfigError("train.max_epochs_per_episode must be at least 1")
    if config.tasks.dimension is not None and config.tasks.dimension not in (0, 1, 2):
        raise ConfigError(f"tasks.dimension {config.tasks.dimension}; valid choices: 0, 1, 2, null")
    after = config.forgetting.after_episode
    if after is not None:
        if config.tasks.condition == "simultaneous":
            raise ConfigError("forgetting needs a sequential or heterogeneous condition")
        if not 1 <= after < config.tasks.num_tasks:
            raise ConfigError(f"forgetting.after_episode {after} must be in 1..num_tasks-1 "
                              f"({config.tasks.num_tasks - 1}) so that a new task follows it")


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
        self.first_pass: dict[int, int] = {}   # task -> epoch_in_episode it first passed
        self.times_trained: dict[int, int] = {}
        self.phase = "episodes"
        self.subepoch = 0

    # -------------------------------------------------------------------------- checkpoints
    def state(self) -> dict:
        return {"model": self.model.state_dict(), "optimizer": self.optimizer.state_dict(),
                "sampler": generator_state(self.sampler), "torch_rng": torch.get_rng_state(),
                "cuda_rng": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
                "order": list(self.order), "episode": self.episode,
                "epoch_in_episode": self.epoch_in_episode, "global_epoch": self.global_epoch,
                "cumulative_trials": self.cumulative_trials,
                "first_pass": {int(k): int(v) for k, v in self.first_pass.items()},
                "times_trained": {int(k): int(v) for k, v in self.times_trained.items()},
                "phase": self.phase, "subepoch": self.subepoch}

    def restore(self, state: dict, weights_only: bool = False) -> None:
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.order = list(state["order"])
        self.times_trained = {int(k): int(v) for k, v in state["times_trained"].items()}
        self.cumulative_trials = int(state["cumulative_trials"])
        self.global_epoch = int(state["global_epoch"])
        self.episode = int(state["episode"])
        if weights_only:
            return
        set_generator_state(self.sampler, state["sampler"])
        torch.set_rng_state(state["torch_rng"])
        if torch.cuda.is_available() and state["cuda_rng"]:
            torch.cuda.set_rng_state_all(state["cuda_rng"])
        self.epoch_in_episode = int(state["epoch_in_episode"])
        self.first_pass = {int(k): int(v) for k, v in state["first_pass"].items()}
        self.phase, self.subepoch = state["phase"], int(state["subepoch"])

    def checkpoint(self, name: str = "last") -> None:
        self.run.save_checkpoint(self.state(), name)

    # -------------------------------------------------------------------------- episodes
    @property
    def num_episodes(self) -> int:
        return 1 if self.simultaneous else len(self.order)

    def current_tasks(self) -> tuple[list[int], list[int]]:
        """(tasks trained this episode, trials per epoch of each)."""
        train = self.config.train
        if self.simultaneous:
            return list(self.order), allocate(self.epoch_size, [1.0] * len(self.order))
        new, old = episode_tasks(self.order, self.episode)
        counts = episode_counts(self.epoch_size, len(old), self.episode + 1, train.new_task_share,
                                train.curriculum, train.ratio, train.alpha)
        return [new, *old], counts

    def position(self, task: int) -> int:
        return self.order.index(task) + 1

    def run_episodes(self, last_episode: int) -> None:
        """Train episodes until 0-based `self.episode` reaches `last_episode` (exclusive)."""
        train = self.config.train
        while self.episode < last_episode:
            tasks, counts = self.current_tasks()
            if self.epoch_in_episode == 0:
                for task in tasks:
                    self.times_trained[task] = self.times_trained.get(task, 0) + 1
            images, task_ids = draw_epoch(self.train_labels, tasks, counts, self.sampler,
                                          train.min_minority)
            stats = train_trials(self.model, self.optimizer, self.data, images, task_ids, tasks,
                                 train.batch_size, self.run)
            check_finite(stats["loss"], f"epoch {self.global_epoch + 1} (episode {self.episode + 1})")
            test = evaluate(self.model, self.data, tasks, train.eval_batch_size)
            self.epoch_in_episode += 1
            self.global_epoch += 1
            self.cumulative_trials += sum(counts)
            for task, acc in zip(tasks, test["acc"]):
                if acc > train.criterion and task not in self.first_pass:
                    self.first_pass[task] = self.epoch_in_episode
            self.log_epoch(tasks, counts, stats, test)
            judged = tasks if train.criterion_tasks == "all" or self.simultaneous else tasks[:1]
            passed = all(acc > train.criterion for task, acc in zip(tasks, test["acc"])
                         if task in judged)
            capped = self.epoch_in_episode >= train.max_epochs_per_episode
            if passed or capped:
                if capped and not passed:
                    self.run.log.warning("episode %d hit max_epochs_per_episode=%d before the "
                                         "criterion", self.episode + 1, train.max_epochs_per_episode)
                self.log_criterion(tasks, counts, passed)
                self.episode += 1
                self.epoch_in_episode = 0
                self.first_pass = {}
                self.checkpoint()
                self.checkpoint(f"episode-{self.episode}")
            else:
                self.checkpoint()
            if self.run.stop_requested:
                raise RunInterrupted(f"stopped after epoch {self.global_epoch}; resume with --resume")

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

    def log_criterion(self, tasks, counts, passed: bool) -> None:
        rows = []
        for i, task in enumerate(tasks):
            epochs = self.first_pass.get(task)
            rows.append({"episode": self.episode + 1, "task": task, "position": self.position(task),
                         "is_new": bool(i == 0 and not self.simultaneous),
                         "times_trained": self.times_trained[task], "trials_per_epoch": counts[i],
                         "epochs_to_criterion": math.nan if epochs is None else epochs,
                         "trials_to_criterion": math.nan if epochs is None else epochs * counts[i],
                         "reached": epochs is not None, "episode_passed": passed,
                         "episode_epochs": self.epoch_in_episode})
        self.run.table("criterion").append(rows)

    # -------------------------------------------------------------------------- forgetting
    def run_forgetting(self, after: int) -> None:
        """Train order[after] alone in sub-epochs, testing every task after each."""
        spec, train = self.config.forgetting, self.config.train
        new = self.order[after]
        tasks = [new, *[t for t in dict.fromkeys(self.order[:after]) if t != new]]
        while self.subepoch < spec.max_subepochs:
            images, task_ids = draw_epoch(self.train_labels, [new], [spec.subepoch_trials],
                                          self.sampler, train.min_minority)
            stats = train_trials(self.model, self.optimizer, self.data, images, task_ids, [new],
                                 train.batch_size, self.run)
            check_finite(stats["loss"], f"forgetting sub-epoch {self.subepoch + 1}")
            test = evaluate(self.model, self.data, tasks, train.eval_batch_size)
            self.subepoch += 1
            self.cumulative_trials += spec.subepoch_trials
            self.run.table("forgetting").append([
                {"subepoch": self.subepoch, "trials": self.subepoch * spec.subepoch_trials,
                 "after_episode": after, "task": task, "position": self.position(task),
                 "is_new": i == 0, "times_trained": 0 if i == 0 else self.times_trained.get(task, 0),
                 "test_acc": test["acc"][i], "test_loss": test["loss"][i]}
                for i, task in enumerate(tasks)])
            self.run.tracker.log({"forgetting/test_acc/new": test["acc"][0],
                                  "forgetting/test_acc/mean_older": sum(test["acc"][1:]) /
                                  max(1, len(tasks) - 1)}, self.subepoch)
            done = test["acc"][0] > train.criterion
            self.phase = "done" if done or self.subepoch >= spec.max_subepochs else "forgetting"
            self.checkpoint()
            if done:
                return
            if self.run.stop_requested:
                raise RunInterrupted(f"stopped after forgetting sub-epoch {self.subepoch}; "
                                     f"resume with --resume")


def run(config: Config, run) -> dict:
    check_config(config)
    path = resolve_data_path(config)
    data = scene_data.load(path, config.data.test_fraction, run.device)
    run.check_data({"path": str(path.resolve()), "images": data.num_images,
                    "image_size": list(data.image_size), "num_train": data.num_train,
                    "content": tensor_digest(data.images, data.labels)})
    run.log.info("data %s: %d train + %d held-out test images of %dx%d on %s", path,
                 data.num_train, data.num_test, *data.image_size, data.device)
    mastery = Mastery(config, run, data)
    run.log.info("model %s: %d parameters; order %s", config.model.name,
                 sum(p.numel() for p in mastery.model.parameters()), mastery.order)
    after = config.forgetting.after_episode
    state = run.load_checkpoint()
    if state is not None:
        mastery.restore(state)
    elif after is not None and config.forgetting.source_run:
        source = Path(config.forgetting.source_run) / "checkpoints" / f"episode-{after}.pt"
        if not source.is_file():
            raise DataError(f"forgetting.source_run has no checkpoint {source}; run its "
                            f"sequential condition through episode {after} first")
        mastery.restore(load_checkpoint(source), weights_only=True)
        if len(mastery.order) <= after:
            raise DataError(f"{source}: its order {mastery.order} has no task after episode {after}")
        mastery.phase = "forgetting"
    if mastery.phase == "episodes":
        mastery.run_episodes(mastery.num_episodes if after is None else after)
        if after is not None:
            mastery.phase = "forgetting"
    if mastery.phase == "forgetting":
        mastery.run_forgetting(after)
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
    if mastery.subepoch:
        final["forgetting_subepochs"] = mastery.subepoch
    return final
