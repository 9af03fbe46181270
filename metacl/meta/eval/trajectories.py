"""Which trajectories a meta-test sweep trains: one (learning rate, run) pair each.

A `Trajectories` value is the single description of them. Engines advance them in groups
(`Trajectories.groups`), and a result keeps it, so nothing recovers a trajectory's learning rate
or run from its index.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from dataclasses import dataclass

import numpy as np
import torch


@dataclass(frozen=True)
class Trajectories:
    """Trajectory t learns at `lr[t]` on the classes, split and re-initialisation of run `run[t]`."""

    lr: np.ndarray
    """(T,) learning rate of each trajectory (float64; 0 for zero-shot, which learns nothing)."""
    run: np.ndarray
    """(T,) run index of each trajectory: its class draw, train/test split and re-initialisation."""

    def __post_init__(self) -> None:
        lr, run = np.asarray(self.lr, dtype=np.float64).reshape(-1), np.asarray(self.run, dtype=np.int64).reshape(-1)
        if lr.shape != run.shape:
            raise ValueError(f"{len(lr)} learning rates for {len(run)} runs")
        object.__setattr__(self, "lr", lr)
        object.__setattr__(self, "run", run)

    @classmethod
    def grid(cls, lrs: Iterable[float], runs: int) -> Trajectories:
        """Every learning rate for each of `runs` runs, run-major: (run 0, lr 0), (run 0, lr 1), ..."""
        lrs = np.asarray(list(lrs), dtype=np.float64)
        return cls(np.tile(lrs, runs), np.repeat(np.arange(runs), len(lrs)))

    @property
    def count(self) -> int:
        return len(self.lr)

    def __len__(self) -> int:
        return self.count

    def __getitem__(self, index: slice) -> Trajectories:
        if not isinstance(index, slice):
            raise TypeError("Trajectories are sliced into groups (a slice), not indexed one by one")
        return Trajectories(self.lr[index], self.run[index])

    def groups(self, size: int) -> Iterator[tuple[slice, Trajectories]]:
        """Consecutive groups of at most `size` trajectories, with their position in the whole."""
        for start in range(0, self.count, max(1, size)):
            where = slice(start, min(start + max(1, size), self.count))
            yield where, self[where]

    @property
    def runs(self) -> list[int]:
        """The distinct runs, in increasing order (Python ints)."""
        return [int(r) for r in np.unique(self.run)]

    def run_index(self, device: torch.device | str = "cpu") -> torch.Tensor:
        """`run` as a long tensor, to index per-run tensors (tasks, schedules, starting values)."""
        return torch.as_tensor(self.run, dtype=torch.long, device=device)

    def lr_tensor(self) -> torch.Tensor:
        """`lr` as a float64 CPU tensor, as the stacked Adam steps take it."""
        return torch.as_tensor(self.lr, dtype=torch.float64)


def trajectories_in_memory(memory_gb: float, per_trajectory_bytes: int, total: int) -> int:
    """How many trajectories of `per_trajectory_bytes` fit in `memory_gb` (at least 1, at most `total`)."""
    return max(1, min(total, int(memory_gb * 2**30 // max(per_trajectory_bytes, 1))))
