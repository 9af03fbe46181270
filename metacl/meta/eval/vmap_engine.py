"""Engine for any set of learning parameters: per-trajectory functional models under torch.func.vmap.

Used for the OML two-layer head (on frozen encoder features) and the unfrozen meta-test (on
images, every parameter learning). Same interface as `linear_engine.LinearEngine`: `group_size`,
`run`, `measure`, `flatten`.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call, grad, vmap

from .adam import StackedAdam
from .protocol import ProtocolConfig, Tasks
from .schedule import Schedule, measure, no_accuracies
from .trajectories import Trajectories, trajectories_in_memory

MEASURE_CHUNK = 256
"""Images per trajectory evaluated at once."""


class VmapEngine:
    """Trajectories of the parameters `trainable` of `model`, the others frozen."""

    def __init__(
        self, model: nn.Module, trainable: list[str], inputs: torch.Tensor, head_only: bool, protocol: ProtocolConfig
    ):
        """`inputs` are what the learning part reads per image: encoder features when `head_only`
        (the encoder is frozen, so `model.head` runs on them), else the images themselves."""
        self.trainable, self.inputs, self.protocol = trainable, inputs, protocol
        wrapper = _Stage(model, "head" if head_only else "logits")
        frozen = {f"model.{n}": v for n, v in model.named_parameters() if n not in trainable}

        def logits_of(params: dict[str, torch.Tensor], x: torch.Tensor) -> torch.Tensor:
            return functional_call(wrapper, {**frozen, **{f"model.{n}": v for n, v in params.items()}}, (x,))

        def loss(params: dict[str, torch.Tensor], x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
            return F.cross_entropy(logits_of(params, x), y)

        self.logits_of, self.loss_of = logits_of, loss
        self.grads_of = vmap(grad(loss))
        self.logits_many = vmap(logits_of)
        named = dict(model.named_parameters())
        self.parameter_bytes = sum(named[n].numel() for n in trainable) * 4

    def group_size(self, total: int) -> int:
        """Trajectories advanced together: as many as memory_gb holds (parameters, moments, activations)."""
        return trajectories_in_memory(
            self.protocol.memory_gb, 6 * self.parameter_bytes + self.inputs[0].numel() * 4 * 64, total
        )

    def run(
        self,
        trajectories: Trajectories,
        tasks: Tasks,
        schedule: Schedule,
        starts: dict[int, dict[str, torch.Tensor]],
        advance: Callable[[int], None],
    ) -> tuple[dict[str, np.ndarray], dict[str, torch.Tensor]]:
        """Advance `trajectories` from their runs' `starts` over `schedule`; return their
        accuracies ((points, T, classes) per kind) and their final stacked parameters."""
        runs = trajectories.run.tolist()
        params = {n: torch.stack([starts[run][n] for run in runs]) for n in self.trainable}
        images, labels = schedule.examples(tasks, trajectories, self.inputs.device)
        accuracies = no_accuracies(len(schedule.points), trajectories.count, tasks.classes)
        learn = self.learner(params, trajectories.lr)

        def step(_carry: None, _k: int, columns: slice) -> None:
            learn(self.inputs[images[:, columns]], labels[:, columns])

        def record(point: int) -> None:
            measured = schedule.measured[point]
            for kind, values in self.measure(params, tasks.first(measured), trajectories).items():
                accuracies[kind][point, :, :measured] = values

        schedule.drive(step, record, lambda seen: advance(trajectories.count * seen))
        return accuracies, params

    def learner(
        self, params: dict[str, torch.Tensor], lrs: torch.Tensor
    ) -> Callable[[torch.Tensor, torch.Tensor], None]:
        """One step of every trajectory on its (inputs, labels) of the step, rows in trajectory
        order: Adam on the stacked `params` in place, all trajectories' gradients under vmap."""
        optimiser = StackedAdam(params, lrs)
        return lambda inputs, labels: optimiser.step(self.grads_of(params, inputs, labels))

    def measure(
        self, params: dict[str, torch.Tensor], tasks: Tasks, trajectories: Trajectories
    ) -> dict[str, np.ndarray]:
        """Per-class accuracies ((T, classes) per kind) of the stacked `params` on their runs' images."""
        return measure(self.all_logits(params), tasks, trajectories, MEASURE_CHUNK, self.inputs.device)

    def all_logits(self, params: dict[str, torch.Tensor]) -> Callable[[torch.Tensor], torch.Tensor]:
        """(T, n) image indices -> (T, n, outputs) logits, trajectory t on its row, all under vmap."""
        return lambda x: self.logits_many(params, self.inputs[x])

    def flatten(self, params: dict[str, torch.Tensor]) -> torch.Tensor:
        """(T, parameters): each trajectory's learned parameters, concatenated in the model's order."""
        return torch.cat([params[n].flatten(1) for n in self.trainable], 1)


class _Stage(nn.Module):
    """The model's head (on features) or whole forward pass (on images), for functional_call."""

    def __init__(self, model: nn.Module, stage: str):
        super().__init__()
        self.model, self.stage = model, stage

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model.head(x) if self.stage == "head" else self.model(x)
