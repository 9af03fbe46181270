"""Engine for a single learning linear layer on frozen features: stacked matrices, fused Adam.

The ANML/OML last-layer meta-test (and zero-shot's least-squares head): each trajectory's layer
is one (outputs, inputs + 1) matrix [W | b], and an image is its feature row ending in a 1, so a
step of T trajectories is batched matrix maths (`adam.linear_step`, fused by torch.compile).
Same interface as `vmap_engine.VmapEngine`: `group_size`, `run`, `measure`, `flatten`.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from .adam import BETAS, StackedAdam, step_scalars
from .protocol import ProtocolConfig, Tasks
from .schedule import Schedule, measure, no_accuracies
from .trajectories import Trajectories, trajectories_in_memory


class LinearEngine:
    """Trajectories of the linear layer `name` over a frozen feature table."""

    def __init__(
        self,
        name: str,
        layer: nn.Linear,
        features: torch.Tensor,
        protocol: ProtocolConfig,
        linear_step: Callable[..., torch.Tensor],
    ):
        """`features` (images, inputs) are the layer's inputs; `linear_step` is `adam.linear_step` or its fused form."""
        self.has_bias = layer.bias is not None
        self.keys = [f"{name}.weight"] + ([f"{name}.bias"] if self.has_bias else [])
        self.table = torch.cat([features, features.new_ones(len(features), 1)], 1) if self.has_bias else features
        self.outputs = layer.out_features
        self.protocol, self.linear_step = protocol, linear_step

    def group_size(self, total: int) -> int:
        """Trajectories advanced together: as many as memory_gb holds (weights, moments, temporaries),
        at most `protocol.trajectory_group`."""
        size = trajectories_in_memory(self.protocol.memory_gb, 6 * self.outputs * self.table.shape[1] * 4, total)
        return min(size, self.protocol.trajectory_group) if self.protocol.trajectory_group else size

    def run(
        self,
        trajectories: Trajectories,
        tasks: Tasks,
        schedule: Schedule,
        starts: dict[int, dict[str, torch.Tensor]],
        advance: Callable[[int], None],
    ) -> tuple[dict[str, np.ndarray], torch.Tensor]:
        """Advance `trajectories` from their runs' `starts` over `schedule`; return their
        accuracies ((points, T, classes) per kind) and their final [W | b] matrices."""
        weight = torch.stack([self.matrix(starts[run]) for run in trajectories.run.tolist()])
        images, labels = schedule.examples(tasks, trajectories, self.table.device)
        accuracies = no_accuracies(len(schedule.points), trajectories.count, tasks.classes)

        def record(point: int) -> None:
            measured = schedule.measured[point]
            for kind, values in self.measure(weight, tasks.first(measured), trajectories).items():
                accuracies[kind][point, :, :measured] = values

        if schedule.sequential:
            step, carry = self._one_image_steps(weight, images, labels, trajectories)
        else:
            step, carry = self._minibatch_steps(weight, images, labels, trajectories), None
        schedule.drive(step, record, lambda seen: advance(trajectories.count * seen), carry)
        return accuracies, weight

    def measure(self, weight: torch.Tensor, tasks: Tasks, trajectories: Trajectories) -> dict[str, np.ndarray]:
        """Per-class accuracies ((T, classes) per kind) of the layers `weight` on their runs' images."""
        chunk = max(1, 2**25 // (trajectories.count * max(weight.shape[1], self.table.shape[1])))
        return measure(
            lambda x: torch.bmm(self.table[x], weight.transpose(1, 2)), tasks, trajectories, chunk, self.table.device
        )

    def flatten(self, weight: torch.Tensor) -> torch.Tensor:
        """(T, parameters): each trajectory's learned parameters in the model's order (weight, then bias)."""
        if not self.has_bias:
            return weight.flatten(1)
        return torch.cat([weight[:, :, :-1].flatten(1), weight[:, :, -1]], 1)

    def matrix(self, values: dict[str, torch.Tensor]) -> torch.Tensor:
        """[W | b] of one run's starting values."""
        weight = values[self.keys[0]]
        return torch.cat([weight, values[self.keys[1]].unsqueeze(1)], 1) if self.has_bias else weight

    def _one_image_steps(
        self, weight: torch.Tensor, images: torch.Tensor, labels: torch.Tensor, trajectories: Trajectories
    ) -> tuple[Callable, torch.Tensor | None]:
        """Sequential steps of one image each through the fused step, and the first step's logits.

        Each step returns the logits of the next (so it reads the weights once); the last step's
        look-ahead wraps to the first image and is discarded.
        """
        exp_avg, exp_avg_sq = torch.zeros_like(weight), torch.zeros_like(weight)
        lrs = trajectories.lr_tensor()
        steps = images.shape[1]

        def step(logits: torch.Tensor, k: int, _columns: slice) -> torch.Tensor:
            neg_step, bc2_sqrt = step_scalars(lrs, k + 1, BETAS)
            x_next = self.table[images[:, k + 1]] if k + 1 < steps else self.table[images[:, 0]]
            return self.linear_step(
                weight,
                exp_avg,
                exp_avg_sq,
                logits,
                self.table[images[:, k]],
                labels[:, k],
                x_next,
                neg_step.to(weight.device),
                torch.tensor(bc2_sqrt, dtype=torch.float64),
            )

        first = torch.bmm(weight, self.table[images[:, 0]].unsqueeze(2)).squeeze(2) if steps else None
        return step, first

    def _minibatch_steps(
        self, weight: torch.Tensor, images: torch.Tensor, labels: torch.Tensor, trajectories: Trajectories
    ) -> Callable[[None, int, slice], None]:
        """Minibatch steps (mean cross-entropy) through stacked Adam: the iid oracle."""
        optimiser = StackedAdam({"weight": weight}, trajectories.lr)

        def step(_carry: None, _k: int, columns: slice) -> None:
            x = self.table[images[:, columns]]  # (T, B, D)
            logits = torch.bmm(x, weight.transpose(1, 2))
            g = logits.log_softmax(2).exp() - F.one_hot(labels[:, columns], logits.shape[2]).to(logits.dtype)
            optimiser.step({"weight": torch.bmm((g / x.shape[1]).transpose(1, 2), x)})

        return step
