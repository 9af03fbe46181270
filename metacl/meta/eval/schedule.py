"""The meta-test's schedule, written once for every engine: what each step learns, when to measure.

sequential  one support image per Adam step, class after class, in learning order; measured after
            the first class, every `eval_freq` classes and at the end (the ANML/OML meta-test).
iid         the oracle: every epoch a seeded shuffle of the run's support set, in minibatches of
            `batch_size` (an epoch's last one may be smaller); measured once at the end.
zero-shot   no step at all; measured once (the least-squares start is the whole model).

An engine (`linear_engine`, `vmap_engine`) supplies how one step changes its trajectories and how
they produce logits; `Schedule.drive` runs the steps and the measurements, and `measure` computes
the accuracies from the logits.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from ...core.seeding import torch_generator
from .protocol import ProtocolConfig, Tasks, eval_points
from .trajectories import Trajectories

KINDS = ("train", "test", "train5", "test5")
"""Accuracies measured: top-1 on train and test images, then top-5."""


@dataclass(frozen=True)
class Schedule:
    """The order in which every run meets its support images, step by step, and when it is measured."""

    order: torch.Tensor
    """(runs, N) positions in each run's support set (`tasks.train[run]`), in the order they are learned."""
    batches: list[slice]
    """The columns of `order` each Adam step learns from."""
    after: list[int]
    """Steps done before each evaluation point."""
    points: list[int]
    """Classes learned at each evaluation point."""
    sequential: bool
    """One image per step, each once, in learning order (the ANML/OML meta-test)."""
    measured: list[int]
    """Leading classes (in learning order) measured at each evaluation point: all of them, or, for
    a nested draw, as many as the largest class count that is evaluated there."""

    @classmethod
    def of(
        cls, protocol: ProtocolConfig, tasks: Tasks, seed: int, split: str, counts: list[int] | None = None
    ) -> Schedule:
        """The schedule of `protocol.eval_method` for these tasks (iid shuffles are seeded per run and
        epoch). `counts`: the class counts a nested draw serves (sequential only; default: all classes)."""
        runs, n = tasks.train.shape
        if protocol.eval_method == "sequential":
            counts = counts or [tasks.classes]
            serves = {c: eval_points(c, protocol.eval_freq) for c in counts}
            points = sorted({q for at in serves.values() for q in at})
            return cls(
                torch.arange(n).expand(runs, n),
                [slice(k, k + 1) for k in range(n)],
                [c * protocol.train_examples for c in points],
                points,
                True,
                [max(c for c, at in serves.items() if q in at) for q in points],
            )
        if counts not in (None, [tasks.classes]):
            raise ValueError(f"only the sequential schedule serves several class counts, not {protocol.eval_method}")
        if protocol.eval_method == "zero-shot":
            return cls(torch.zeros(runs, 0, dtype=torch.long), [], [0], [tasks.classes], False, [tasks.classes])
        order = torch.stack(
            [
                torch.cat(
                    [
                        torch.randperm(
                            n, generator=torch_generator(seed, "meta-eval-iid", split, tasks.classes, run, epoch)
                        )
                        for epoch in range(protocol.epochs)
                    ]
                )
                for run in range(runs)
            ]
        )
        batches = [
            slice(epoch * n + lo, epoch * n + min(lo + protocol.batch_size, n))
            for epoch in range(protocol.epochs)
            for lo in range(0, n, protocol.batch_size)
        ]
        return cls(order, batches, [len(batches)], [tasks.classes], False, [tasks.classes])

    @property
    def examples_seen(self) -> int:
        """Support images learned from by one trajectory over the whole schedule."""
        return self.order.shape[1]

    def examples(
        self, tasks: Tasks, trajectories: Trajectories, device: torch.device
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(images, labels), each (T, N): the flat image index and label each trajectory learns, in step order."""
        runs = trajectories.run_index()
        order = self.order[runs]
        images = torch.gather(tasks.train[runs], 1, order)
        labels = torch.gather(tasks.labels("train", runs), 1, order)
        return images.to(device), labels.to(device)

    def drive(
        self,
        step: Callable[[Any, int, slice], Any],
        record: Callable[[int], None],
        advance: Callable[[int], None] = lambda _images: None,
        carry: Any = None,
    ) -> None:
        """Run every step and, at each evaluation point e, `record(e)` (which measures `measured[e]` classes).

        `carry = step(carry, k, columns)` learns step k's `columns` of `order`; what a step computes
        for the next (the fused linear step's next logits) is what it returns. `advance(images)` is
        told how many images each step learned from (for progress bars).
        """
        done = 0
        for point, until in enumerate(self.after):
            for k in range(done, until):
                carry = step(carry, k, self.batches[k])
                advance(self.batches[k].stop - self.batches[k].start)
            done = until
            record(point)


def no_accuracies(points: int, trajectories: int, classes: int) -> dict[str, np.ndarray]:
    """Zeroed (points, trajectories, classes) arrays, one per kind of accuracy."""
    return {kind: np.zeros((points, trajectories, classes), dtype=np.float32) for kind in KINDS}


@torch.no_grad()
def measure(
    logits_of: Callable[[torch.Tensor], torch.Tensor],
    tasks: Tasks,
    trajectories: Trajectories,
    chunk: int,
    device: torch.device,
) -> dict[str, np.ndarray]:
    """Per-class accuracies of each trajectory on its run's train and test images: (T, classes) per kind.

    `logits_of(images)` maps (T, n) flat image indices to (T, n, outputs) logits of each
    trajectory; images go through it `chunk` per trajectory at a time.
    """
    runs = trajectories.run_index()
    accuracies = {}
    for kind, flat in (("train", tasks.train), ("test", tasks.test)):
        images = flat[runs].to(device)
        target = tasks.labels(kind, runs).to(device)
        per_class = images.shape[1] // tasks.classes
        top1, top5 = [], []
        for lo in range(0, images.shape[1], chunk):
            logits = logits_of(images[:, lo : lo + chunk])
            top1.append(logits.argmax(2) == target[:, lo : lo + chunk])
            k = min(5, logits.shape[2])
            top5.append((logits.topk(k, 2).indices == target[:, lo : lo + chunk, None]).any(2))
        for suffix, hits in (("", top1), ("5", top5)):
            per = torch.cat(hits, 1).view(len(runs), -1, per_class).float().mean(2)
            accuracies[kind + suffix] = per.cpu().numpy()
    return accuracies
