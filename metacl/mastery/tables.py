"""The rows a mastery run writes: `epochs`, `tests`, `criterion` (see experiment.py), and the
final metrics that summarise them."""

from __future__ import annotations

import math


class EpisodeTables:
    """The episode tables of a `Mastery` run."""

    def log_epoch(self, tasks, counts, stats, test) -> None:
        older = [acc for task, acc in zip(tasks, test["acc"]) if not self.simultaneous and task != tasks[0]]
        mean_older = sum(older) / len(older) if older else math.nan
        rows = []
        for i, task in enumerate(tasks):
            rows.append(
                {
                    "episode": self.episode + 1,
                    "epoch": self.global_epoch,
                    "epoch_in_episode": self.epoch_in_episode,
                    "task": task,
                    "position": self.position(task),
                    "is_new": bool(i == 0 and not self.simultaneous),
                    "times_trained": self.times_trained[task],
                    "trials": counts[i],
                    "train_acc": stats["acc"][i],
                    "train_loss": stats["loss"][i],
                    "test_acc": test["acc"][i],
                    "test_loss": test["loss"][i],
                    "mean_older_test_acc": mean_older,
                    "cumulative_trials": self.cumulative_trials,
                }
            )
        self.run.table("epochs").append(rows)
        metrics = {
            "mastery/episode": self.episode + 1,
            "mastery/test_acc/mean_seen": sum(test["acc"]) / len(tasks),
            "mastery/test_acc/min_seen": min(test["acc"]),
            "mastery/train_loss/mean": sum(stats["loss"]) / len(tasks),
        }
        if not self.simultaneous:
            metrics["mastery/test_acc/new"] = test["acc"][0]
            metrics["mastery/test_acc/mean_older"] = mean_older
        self.run.tracker.log(metrics, self.global_epoch)

    def log_test_point(self, tasks, trials_in_epoch: int, task_trials: list[int], test, epoch_end: bool) -> None:
        """A row per task of the `tests` table (train.test_every_trials), epoch ends included;
        `task_trials` counts each task's trials in the episode up to this test."""
        in_progress = 0 if epoch_end else 1  # mid-epoch: the counters still hold the last epoch
        done = self.cumulative_trials + (0 if epoch_end else trials_in_epoch)
        self.run.table("tests").append(
            [
                {
                    "episode": self.episode + 1,
                    "epoch": self.global_epoch + in_progress,
                    "epoch_in_episode": self.epoch_in_episode + in_progress,
                    "trials_in_epoch": trials_in_epoch,
                    "epoch_end": epoch_end,
                    "task": task,
                    "is_new": bool(i == 0 and not self.simultaneous),
                    "task_trials": task_trials[i],
                    "cumulative_trials": done,
                    "test_acc": test["acc"][i],
                    "test_loss": test["loss"][i],
                }
                for i, task in enumerate(tasks)
            ]
        )

    def log_criterion(self, tasks, counts, passed: bool) -> None:
        rows = []
        for i, task in enumerate(tasks):
            epochs = self.first_pass.get(task)
            trials = None if epochs is None else self.first_pass_trials.get(task, epochs * counts[i])
            rows.append(
                {
                    "episode": self.episode + 1,
                    "task": task,
                    "position": self.position(task),
                    "is_new": bool(i == 0 and not self.simultaneous),
                    "times_trained": self.times_trained[task],
                    "trials_per_epoch": counts[i],
                    "epochs_to_criterion": math.nan if epochs is None else epochs,
                    "trials_to_criterion": math.nan if trials is None else trials,
                    "reached": epochs is not None,
                    "episode_passed": passed,
                    "episode_epochs": self.epoch_in_episode,
                }
            )
        self.run.table("criterion").append(rows)


def summarize(run, mastery) -> dict:
    """The run's final metrics: episodes, epochs, trials, order, new-task trials to criterion."""
    criterion = run.table("criterion").frame()
    final = {
        "episodes": mastery.episode,
        "epochs": mastery.global_epoch,
        "cumulative_trials": mastery.cumulative_trials,
        "order": list(mastery.order),
    }
    if len(criterion):
        new = criterion[criterion["is_new"]] if not mastery.simultaneous else criterion
        final["new_task_trials"] = [None if math.isnan(v) else int(v) for v in new["trials_to_criterion"]]
        final["all_reached"] = bool(criterion["reached"].all())
    if mastery.budget_cut:
        final["budget_exhausted"] = True
    if mastery.forget_subepochs:
        final["forgetting_after"] = list(mastery.forget_plan)
        final["forgetting_subepochs"] = list(mastery.forget_subepochs)
    return final
