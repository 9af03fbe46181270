"""The forgetting experiment: after episode E of the baseline, train the task of episode E+1
alone in sub-epochs from the baseline's weights, and watch the earlier tasks decay.

As the reference ran it: every E of `forgetting.after_episodes` in one run, each from the
baseline's `episode-E` weights only (a fresh Adam for the first, carried on to the next unless
`carry_optimizer` is false), sub-epochs cycling over a permutation of the training images, a test
of every task before the first sub-epoch, at most `max_subepochs` sub-epochs.
"""

from __future__ import annotations

from pathlib import Path

import torch

from ..core.checkpoint import load_checkpoint
from ..core.errors import DataError, RunInterrupted
from ..core.seeding import torch_generator
from .orders import episode_tasks
from .training import check_finite, make_optimizer


class Forgetting:
    """The forgetting phase of a `Mastery` run (its state lives in Mastery.state())."""

    def forgetting_source(self, after: int) -> Path:
        """The checkpoint a forgetting task after episode `after` starts from."""
        source = self.config.forgetting.source_run
        if source is None:
            return self.run.checkpoint_path(f"episode-{after}")
        return Path(source).expanduser() / "checkpoints" / f"episode-{after}.pt"

    def use_source_run(self) -> None:
        """Forgetting from another run: check its checkpoints and take its task order."""
        missing = [str(self.forgetting_source(e)) for e in self.forget_plan if not self.forgetting_source(e).is_file()]
        if missing:
            raise DataError(
                f"forgetting.source_run has no checkpoint {', '.join(missing)}; run "
                f"its sequential condition through episode {max(self.forget_plan)} first"
            )
        last = self.forgetting_source(self.forget_plan[-1])
        self.order = [int(t) for t in load_checkpoint(last)["order"]]
        if len(self.order) <= self.forget_plan[-1]:
            raise DataError(f"{last}: its order {self.order} has no task after episode {self.forget_plan[-1]}")
        self.phase = "forgetting"

    def begin_forgetting(self) -> None:
        """After this run's own baseline episodes: keep the tasks whose episode was reached."""
        reached = [e for e in self.forget_plan if e <= self.episode]
        if len(reached) < len(self.forget_plan):
            self.run.log.warning(
                "the baseline ended after episode %d (train.max_total_epochs): no forgetting task after episodes %s",
                self.episode,
                [e for e in self.forget_plan if e > self.episode],
            )
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
            raise DataError(
                f"{path}: its model does not fit this config's model ({str(error).splitlines()[0]})"
            ) from None
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
                self.forget_perm = torch.randperm(self.data.num_train, generator=self.forget_sampler)
                self.forget_pos = 0
            part = self.forget_perm[self.forget_pos : self.forget_pos + trials]
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
                stats = self.train(images, task_ids, tasks[:1])
                check_finite(stats["loss"], f"forgetting after episode {after}, sub-epoch {self.subepoch + 1}")
                test = self.test(tasks)
                self.subepoch += 1
                self.forget_steps += 1
                self.cumulative_trials += spec.subepoch_trials
                self.log_forgetting(after, tasks, test)
                self.run.tracker.log(
                    {
                        "forgetting/after_episode": after,
                        "forgetting/test_acc/new": test["acc"][0],
                        "forgetting/test_acc/mean_older": sum(test["acc"][1:]) / max(1, len(tasks) - 1),
                    },
                    self.forget_steps,
                )
                passed = test["acc"][0] > train.criterion
                finished = passed or self.subepoch >= spec.max_subepochs
                if finished:
                    if not passed:
                        self.run.log.warning(
                            "forgetting after episode %d hit max_subepochs=%d before the new task passed",
                            after,
                            spec.max_subepochs,
                        )
                    self.forget_subepochs.append(self.subepoch)
                    self.forget_index += 1
                    self.forget_started = False
                self.checkpoint()
                if self.run.stop_requested:
                    raise RunInterrupted(
                        f"stopped after forgetting sub-epoch {self.subepoch} "
                        f"(after episode {after}); resume with --resume"
                    )
        self.phase = "done"

    def log_forgetting(self, after: int, tasks: list[int], test: dict) -> None:
        trials = self.subepoch * self.config.forgetting.subepoch_trials
        self.run.table("forgetting").append(
            [
                {
                    "after_episode": after,
                    "subepoch": self.subepoch,
                    "trials": trials,
                    "task": task,
                    "position": self.position(task),
                    "is_new": i == 0,
                    "times_trained": 0 if i == 0 else self.forget_times.get(task, 0),
                    "test_acc": test["acc"][i],
                    "test_loss": test["loss"][i],
                }
                for i, task in enumerate(tasks)
            ]
        )
