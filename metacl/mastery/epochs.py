"""Epoch composition: how many trials each task gets, and which training images it sees.

The sequential protocol of the reference (Davidson & Mozer 2020) sizes epochs against
`epoch_size` trials (by default the whole training split: 45,000 for a 50k file):

    uniform, ratio   the new task gets `new_task_share` of them (22,500) in every episode,
                     episode 1 included (whose epoch is therefore 22,500 trials); from episode 2
                     the earlier tasks share the rest, evenly (uniform) or by r^(t-1) (ratio)
    power            every task t = 1..E of episode E, the new one (t = E) included, gets a share
                     of the whole epoch proportional to (E - t + 1)^(-alpha): the new task gets
                     45,000 in episode 1, then 30,954, 25,868, ... 17,367 in episode 10 (alpha 1.14)

Every task draws a disjoint set of training images, redrawn each epoch, and a draw whose
minority class is under `min_minority` of the sample is redrawn. The simultaneous condition
instead presents every (training image, query) pair once per epoch (`draw_all_pairs`).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

import torch

from ..core.errors import ConfigError, DataError

Curriculum = Literal["uniform", "ratio", "power"]


def allocate(total: int, weights: Sequence[float]) -> list[int]:
    """Integers proportional to `weights` that sum exactly to `total` (largest remainder)."""
    if not weights or any(w < 0 for w in weights) or sum(weights) <= 0:
        raise ConfigError(f"cannot allocate {total} trials by weights {list(weights)}")
    scale = total / sum(weights)
    exact = [w * scale for w in weights]
    counts = [int(e) for e in exact]
    by_remainder = sorted(range(len(weights)), key=lambda i: (-(exact[i] - counts[i]), i))
    for i in by_remainder[: total - sum(counts)]:
        counts[i] += 1
    return counts


def old_task_weights(num_old: int, episode: int, curriculum: Curriculum, ratio: float, alpha: float) -> list[float]:
    """Relative shares of the earlier tasks at positions t = 1..num_old in episode `episode`.

    uniform: equal; ratio: r^(t-1); power: (episode - t + 1)^(-alpha).
    """
    positions = range(1, num_old + 1)
    if curriculum == "uniform":
        return [1.0] * num_old
    if curriculum == "ratio":
        return [ratio ** (t - 1) for t in positions]
    if curriculum == "power":
        return [(episode - t + 1) ** (-alpha) for t in positions]
    raise ConfigError(f"unknown curriculum {curriculum!r}; valid choices: uniform, ratio, power")


def episode_counts(
    epoch_size: int,
    num_old: int,
    episode: int,
    new_task_share: float,
    curriculum: Curriculum = "uniform",
    ratio: float = 1.25,
    alpha: float = 1.14,
) -> list[int]:
    """Trials per epoch for [new task, old task 1, ..., old task num_old] in (1-based) `episode`.

    uniform and ratio: the new task gets round(new_task_share * epoch_size) in every episode
    (episode 1 included, which is then that many trials) and the old tasks share the rest, so
    later epochs sum to epoch_size. power: the whole epoch_size is shared by every task, the
    new one included, in proportion to (episode - t + 1)^(-alpha) of its position t (the new
    task's weight is 1); `new_task_share` plays no part.
    """
    if curriculum == "power":
        weights = [1.0, *old_task_weights(num_old, episode, curriculum, ratio, alpha)]
        return allocate(epoch_size, weights)
    new = int(round(epoch_size * new_task_share))
    if not 0 < new < epoch_size:
        raise ConfigError(
            f"train.new_task_share {new_task_share} leaves no trials for the new or "
            f"the old tasks of a {epoch_size}-trial epoch"
        )
    if num_old == 0:
        return [new]
    return [new, *allocate(epoch_size - new, old_task_weights(num_old, episode, curriculum, ratio, alpha))]


def minority_fraction(labels: torch.Tensor) -> float:
    positive = float(labels.float().mean()) if labels.numel() else 0.0
    return min(positive, 1.0 - positive)


def draw_epoch(
    train_labels: torch.Tensor,
    tasks: Sequence[int],
    counts: Sequence[int],
    generator: torch.Generator,
    min_minority: float = 0.2,
    tries_per_task: int = 20,
    restarts: int = 200,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Draw one epoch: (image indices, task ids), shuffled together, on the CPU.

    `train_labels` is the (num_train, 30) bool label matrix of the training split. Task i gets
    `counts[i]` images, disjoint from every other task's. A task's draw is repeated until its
    minority class makes up at least `min_minority` of it; when the images left over cannot
    satisfy a task, the whole epoch is drawn again.
    """
    num_train = train_labels.shape[0]
    if sum(counts) > num_train:
        raise ConfigError(
            f"an epoch of {sum(counts)} trials needs more than the {num_train} "
            f"training images for disjoint per-task image sets; lower train.epoch_size"
        )
    for _ in range(restarts):
        drawn = _draw_disjoint(train_labels, tasks, counts, generator, min_minority, tries_per_task)
        if drawn is not None:
            images = torch.cat(drawn)
            task_ids = torch.cat([torch.full((c,), t, dtype=torch.long) for t, c in zip(tasks, counts)])
            order = torch.randperm(images.shape[0], generator=generator)
            return images[order], task_ids[order]
    raise DataError(
        f"no draw of {list(counts)} images for tasks {list(tasks)} out of {num_train} "
        f"gave every task a minority class of at least {min_minority:.0%} after "
        f"{restarts} tries; the dataset is too small or a feature too rare"
    )


def draw_all_pairs(
    num_train: int, tasks: Sequence[int], images_per_task: int, generator: torch.Generator
) -> tuple[torch.Tensor, torch.Tensor]:
    """One simultaneous epoch: every task paired once with `images_per_task` training images (all
    of them when it equals num_train, else a random subset per task), shuffled together."""
    if not 0 < images_per_task <= num_train:
        raise ConfigError(
            f"{images_per_task} images per task is not in 1..{num_train} (the training split); lower train.epoch_size"
        )
    if images_per_task == num_train:
        images = torch.arange(num_train).repeat(len(tasks))
    else:
        images = torch.cat([torch.randperm(num_train, generator=generator)[:images_per_task] for _ in tasks])
    task_ids = torch.tensor(list(tasks), dtype=torch.long).repeat_interleave(images_per_task)
    order = torch.randperm(images.shape[0], generator=generator)
    return images[order], task_ids[order]


def _draw_disjoint(train_labels, tasks, counts, generator, min_minority, tries_per_task):
    pool = torch.randperm(train_labels.shape[0], generator=generator)
    drawn = []
    for task, count in zip(tasks, counts):
        for _ in range(tries_per_task):
            pick = torch.randperm(pool.shape[0], generator=generator)[:count]
            if minority_fraction(train_labels[pool[pick], task]) >= min_minority:
                break
        else:
            return None
        drawn.append(pool[pick])
        keep = torch.ones(pool.shape[0], dtype=torch.bool)
        keep[pick] = False
        pool = pool[keep]
    return drawn
