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

import torch

from ..core.allocator import tune_malloc
from ..core.errors import ConfigError, RunInterrupted
from ..core.run import tensor_digest
from ..core.seeding import generator_state, set_generator_state, torch_generator
from . import data as scene_data
from .config import Config
from .epochs import draw_all_pairs, draw_epoch, episode_counts
from .forgetting import Forgetting
from .orders import episode_tasks, task_order
from .tables import EpisodeTables, summarize
from .training import build, check_finite, evaluate, train_trials

__all__ = ["Config", "run"]


class Mastery(Forgetting, EpisodeTables):
    """State and loop of one run; `state()` is everything a checkpoint needs to resume exactly."""

    def __init__(self, config: Config, run, data: scene_data.SceneTensors):
        self.config, self.run, self.data = config, run, data
        self.model, self.optimizer = build(config, data, run.device)
        self.sampler = torch_generator(config.seed, "mastery-epochs")
        self.epoch_size = config.train.epoch_size or data.num_train
        if not 0 < self.epoch_size <= data.num_train:
            raise ConfigError(f"train.epoch_size {self.epoch_size} must be in 1..{data.num_train} (the training split)")
        self.train_labels = data.train_labels_cpu()
        self.order = task_order(config)
        self.simultaneous = config.tasks.condition == "simultaneous"
        self.episode = 0  # 0-based episode in progress
        self.epoch_in_episode = 0  # epochs finished in that episode
        self.global_epoch = 0
        self.cumulative_trials = 0
        self.first_pass: dict[int, int] = {}  # task -> epoch (in episode) of its first pass
        self.first_pass_trials: dict[int, int] = {}  # task -> its trials in the episode by then
        self.times_trained: dict[int, int] = {}
        self.budget_cut = False  # train.max_total_epochs ended the episodes
        self.phase = "episodes"
        # the forgetting experiment: one task per entry of forget_plan (after-episodes E)
        self.forget_plan: list[int] = sorted(config.forgetting.after_episodes)
        self.forget_index = 0  # entry in progress
        self.forget_started = False  # its weights are loaded and its sub-epoch 0 test logged
        self.forget_times: dict[int, int] = {}  # times_trained of the baseline at episode E
        self.forget_sampler: torch.Generator | None = None  # the task's own image stream
        self.forget_perm: torch.Tensor | None = None  # permutation of training images in use
        self.forget_pos = 0
        self.subepoch = 0
        self.forget_steps = 0  # sub-epochs over all forgetting tasks (the tracker's step)
        self.forget_subepochs: list[int] = []  # sub-epochs each finished forgetting task ran

    # -------------------------------------------------------------------------- checkpoints
    def state(self) -> dict:
        return {
            "model": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "sampler": generator_state(self.sampler),
            "torch_rng": torch.get_rng_state(),
            "cuda_rng": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
            "order": list(self.order),
            "episode": self.episode,
            "epoch_in_episode": self.epoch_in_episode,
            "global_epoch": self.global_epoch,
            "cumulative_trials": self.cumulative_trials,
            "first_pass": {int(k): int(v) for k, v in self.first_pass.items()},
            "first_pass_trials": {int(k): int(v) for k, v in self.first_pass_trials.items()},
            "times_trained": {int(k): int(v) for k, v in self.times_trained.items()},
            "budget_cut": self.budget_cut,
            "phase": self.phase,
            "forget_plan": list(self.forget_plan),
            "forget_index": self.forget_index,
            "forget_started": self.forget_started,
            "forget_times": {int(k): int(v) for k, v in self.forget_times.items()},
            "forget_sampler": None if self.forget_sampler is None else generator_state(self.forget_sampler),
            "forget_perm": self.forget_perm,
            "forget_pos": self.forget_pos,
            "subepoch": self.subepoch,
            "forget_steps": self.forget_steps,
            "forget_subepochs": list(self.forget_subepochs),
        }

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
        self.first_pass_trials = {int(k): int(v) for k, v in state.get("first_pass_trials", {}).items()}
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

    def train(
        self,
        images: torch.Tensor,
        task_ids: torch.Tensor,
        tasks: list[int],
        test_every: int | None = None,
        test_point=None,
    ) -> dict:
        """`train_trials` on this run's model (looked up at call time: tests spy on it)."""
        return train_trials(
            self.model,
            self.optimizer,
            self.data,
            images,
            task_ids,
            tasks,
            self.config.train.batch_size,
            self.run,
            test_every,
            test_point,
        )

    def test(self, tasks: list[int]) -> dict:
        """`evaluate` with this run's test options (looked up at call time: tests script it)."""
        train = self.config.train
        return evaluate(
            self.model,
            self.data,
            tasks,
            train.eval_batch_size,
            on_train_images=train.legacy_test_on_train_images,
            batchnorm_train=train.legacy_batchnorm_train_at_test,
        )

    # -------------------------------------------------------------------------- episodes
    @property
    def num_episodes(self) -> int:
        return 1 if self.simultaneous else len(self.order)

    def current_tasks(self) -> tuple[list[int], list[int]]:
        """(tasks trained this episode, trials per epoch of each)."""
        train = self.config.train
        if self.simultaneous:  # every (training image, query) pair once per epoch
            return list(self.order), [self.epoch_size] * len(self.order)
        new, old = episode_tasks(self.order, self.episode)
        counts = episode_counts(
            self.epoch_size,
            len(old),
            self.episode + 1,
            train.new_task_share,
            train.curriculum,
            train.ratio,
            train.alpha,
        )
        return [new, *old], counts

    def draw(self, tasks: list[int], counts: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
        if self.simultaneous:
            return draw_all_pairs(self.data.num_train, tasks, counts[0], self.sampler)
        return draw_epoch(self.train_labels, tasks, counts, self.sampler, self.config.train.min_minority)

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

            def test_point(done: int, task_trials: list[int], tasks=tasks, counts=counts) -> None:
                test = self.test(tasks)
                in_episode = [self.epoch_in_episode * c + n for c, n in zip(counts, task_trials)]
                for task, acc, trials in zip(tasks, test["acc"], in_episode):
                    self.record_pass(task, acc, self.epoch_in_episode + 1, trials)
                self.log_test_point(tasks, done, in_episode, test, epoch_end=False)

            stats = self.train(
                images, task_ids, tasks, train.test_every_trials, test_point if train.test_every_trials else None
            )
            check_finite(stats["loss"], f"epoch {self.global_epoch + 1} (episode {self.episode + 1})")
            test = self.test(tasks)
            self.epoch_in_episode += 1
            self.global_epoch += 1
            self.cumulative_trials += sum(counts)
            for task, acc, count in zip(tasks, test["acc"], counts):
                self.record_pass(task, acc, self.epoch_in_episode, self.epoch_in_episode * count)
            if train.test_every_trials:
                self.log_test_point(
                    tasks, sum(counts), [self.epoch_in_episode * c for c in counts], test, epoch_end=True
                )
            self.log_epoch(tasks, counts, stats, test)
            judged = tasks if train.criterion_tasks == "all" or self.simultaneous else tasks[:1]
            passed = all(acc > train.criterion for task, acc in zip(tasks, test["acc"]) if task in judged)
            cap = train.max_epochs_per_episode
            capped = cap is not None and self.epoch_in_episode >= cap
            if passed or capped:
                if capped and not passed:
                    self.run.log.warning(
                        "episode %d hit max_epochs_per_episode=%d before the criterion", self.episode + 1, cap
                    )
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
        self.run.log.warning(
            "train.max_total_epochs=%d reached in episode %d: the run ends here",
            self.config.train.max_total_epochs,
            self.episode + 1,
        )
        if self.epoch_in_episode > 0:
            self.log_criterion(*self.current_tasks(), passed=False)
        self.budget_cut = True
        self.checkpoint()


def run(config: Config, run) -> dict:
    train = config.train
    if train.legacy_test_on_train_images or train.legacy_batchnorm_train_at_test:
        run.log.warning(
            "legacy test switches on (the reference's bugs): test on training images "
            "%s, BatchNorm in training mode at test %s",
            train.legacy_test_on_train_images,
            train.legacy_batchnorm_train_at_test,
        )
    path = scene_data.resolve_path(config)
    data = scene_data.load(path, config.data.test_fraction, run.device)
    run.check_data(
        {
            "path": str(path.resolve()),
            "images": data.num_images,
            "image_size": list(data.image_size),
            "num_train": data.num_train,
            "content": tensor_digest(data.images, data.labels),
        }
    )
    run.log.info(
        "data %s: %d train + %d held-out test images of %dx%d on %s",
        path,
        data.num_train,
        data.num_test,
        *data.image_size,
        data.device,
    )
    if run.device.type == "cpu":  # after loading: the data's own temporaries go back to the OS
        run.log.info("allocator: %s", tune_malloc().detail)
    mastery = Mastery(config, run, data)
    plan = mastery.forget_plan
    state = run.load_checkpoint()
    if state is not None:
        mastery.restore(state)
    elif plan and config.forgetting.source_run:
        mastery.use_source_run()
    run.log.info(
        "model %s: %d parameters; order %s",
        config.model.name,
        sum(p.numel() for p in mastery.model.parameters()),
        mastery.order,
    )
    if mastery.phase == "episodes":
        mastery.run_episodes(max(plan) if plan else mastery.num_episodes)
        if plan:
            mastery.begin_forgetting()
    if mastery.phase == "forgetting":
        mastery.run_forgetting()
    run.flush()
    return summarize(run, mastery)
