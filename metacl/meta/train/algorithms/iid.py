"""`iid`: ordinary minibatch pre-training of the whole model (higherANML's iid baseline),
optionally zapping random output rows every few steps."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Annotated, Any, Literal

import torch
import torch.nn.functional as F
from torch import nn

from ....core.config import NonNegative, NonNegativeFloat, Positive, PositiveFloat, Range
from ....core.errors import ConfigError
from ..functional import zap_rows
from . import Augment, apply_gradients, no_augment, register_algorithm


@dataclass
class IIDConfig:
    max_steps: Positive = 10000
    """Minibatch steps."""
    batch_size: Positive = 256
    """Images per minibatch."""
    optimizer: Literal["adam", "sgd"] = "adam"
    """Optimiser."""
    lr: PositiveFloat = 1e-3
    """Base learning rate."""
    momentum: Annotated[float, Range(0, 1, high_open=True)] = 0.9
    """SGD momentum."""
    weight_decay: NonNegativeFloat = 0.0
    """L2 weight decay."""
    schedule: Literal["constant", "step", "cosine"] = "constant"
    """Learning-rate schedule over max_steps."""
    step_size: Positive = 1000
    """Steps between decays of the step schedule."""
    gamma: PositiveFloat = 0.1
    """Decay factor of the step schedule."""
    max_grad_norm: NonNegativeFloat = 0.0
    """Clip the gradient to this norm (0: no clipping)."""
    zap_every: NonNegative = 0
    """Zap `zap_size` random output rows every this many steps (0: never)."""
    zap_size: NonNegative = 0
    """Output rows zapped each time."""
    trial_lr: PositiveFloat = 0.1
    """SGD learning rate of the periodic continual trial on the output layer."""


def lr_factor(schedule: str, step: int, max_steps: int, step_size: int, gamma: float) -> float:
    """Multiplier of the base learning rate at `step` (a pure function, so resuming is exact)."""
    if schedule == "constant":
        return 1.0
    if schedule == "step":
        return gamma ** (step // step_size)
    if schedule == "cosine":
        return 0.5 * (1 + math.cos(math.pi * min(step, max_steps) / max_steps))
    raise ConfigError(f"unknown lr schedule {schedule!r}; valid choices: constant, step, cosine")


@register_algorithm("iid")
class IID:
    """Minibatches drawn without replacement from every training image, epoch after epoch."""

    Config = IIDConfig
    length_field = None  # the learning-rate schedule runs over max_steps

    def __init__(
        self,
        model: nn.Module,
        pool: torch.Tensor,
        config: IIDConfig,
        streams: dict[str, torch.Generator],
        augment: Augment = no_augment,
    ):
        self.model, self.config, self.streams, self.augment = model, config, streams, augment
        self.params = list(model.parameters())
        if config.optimizer == "adam":
            self.optimizer: torch.optim.Optimizer = torch.optim.Adam(
                self.params, lr=config.lr, weight_decay=config.weight_decay
            )
        else:
            self.optimizer = torch.optim.SGD(
                self.params, lr=config.lr, momentum=config.momentum, weight_decay=config.weight_decay
            )
        self.per_class = pool.shape[1]
        self.images = pool.reshape(pool.shape[0] * pool.shape[1], *pool.shape[2:])
        self.order = torch.empty(0, dtype=torch.long)
        self.steps = config.max_steps
        fc = model.get_submodule("fc")
        assert isinstance(fc, nn.Linear), "build() checks that the model's output layer fc is Linear"
        self.fc = fc
        self.trial_params = ["fc.weight", "fc.bias"] if fc.bias is not None else ["fc.weight"]
        self.trial_lr = config.trial_lr

    def step(self, step: int) -> dict[str, float]:
        config = self.config
        if config.zap_every and config.zap_size and step % config.zap_every == 0:
            rows = torch.randperm(self.fc.out_features, generator=self.streams["zap"])
            zap_rows(self.fc.weight, rows[: config.zap_size], self.streams["zap"])
        if len(self.order) < config.batch_size:
            self.order = torch.cat([self.order, torch.randperm(len(self.images), generator=self.streams["sample"])])
        batch, self.order = self.order[: config.batch_size], self.order[config.batch_size :]
        batch = batch.to(self.images.device)
        images = self.augment(self.images[batch])
        lr = config.lr * lr_factor(config.schedule, step, config.max_steps, config.step_size, config.gamma)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        labels = batch // self.per_class
        logits = self.model(images)
        loss = F.cross_entropy(logits, labels)
        grads = torch.autograd.grad(loss, self.params, materialize_grads=True)
        norm = apply_gradients(self.params, grads, config.max_grad_norm)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        acc = (logits.detach().argmax(1) == labels).float().mean()
        loss_value, acc_value, grad_norm = torch.stack([loss.detach(), acc, norm]).tolist()
        return {"loss": loss_value, "acc": acc_value, "grad_norm": grad_norm, "lr": lr}

    def state_dict(self) -> dict[str, Any]:
        return {"optimizer": self.optimizer.state_dict(), "order": self.order}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.optimizer.load_state_dict(state["optimizer"])
        self.order = state["order"]
