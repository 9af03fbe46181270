"""The three training algorithms: `meta`, `sequential_episodic` and `iid`.

meta                 ANML/OML meta-training: the Adam step follows the gradient of the meta-loss
                     through the whole inner loop (second order), taken at the pre-episode weights.
sequential_episodic  the same episodes, first order: plain SGD through the trajectory, then one
                     Adam step on the meta batch at the weights SGD reached. Inner-loop gradients
                     never reach the Adam step (each gradient is returned by autograd.grad, never
                     accumulated into .grad as in the reference).
iid                  ordinary minibatch pre-training, optionally zapping output rows.
"""
from __future__ import annotations

import math
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

from ...core.errors import ConfigError
from .episodes import Episode
from .functional import FunctionalModel, inner_loop, meta_loss, zap_rows

Algorithm = Literal["meta", "sequential_episodic", "iid"]


def _apply_gradients(params: list[torch.Tensor], grads: tuple[torch.Tensor, ...],
                     max_grad_norm: float) -> torch.Tensor:
    """Set .grad from `grads`, clip to `max_grad_norm` (0: no clipping); return the norm before."""
    for param, grad in zip(params, grads):
        param.grad = grad
    return nn.utils.clip_grad_norm_(params, max_grad_norm if max_grad_norm > 0 else math.inf)


class EpisodicTrainer:
    """One episode per `step`: zap, inner loop, meta-loss, Adam on the outer parameters."""

    def __init__(self, model: nn.Module, algorithm: Algorithm, inner_names: list[str],
                 outer_names: list[str], *, inner_lr: float = 0.1, outer_lr: float = 1e-3,
                 train_cycles: int = 1, zap: bool = True, max_grad_norm: float = 0.0):
        if algorithm not in ("meta", "sequential_episodic"):
            raise ConfigError(f"EpisodicTrainer runs meta or sequential_episodic, not {algorithm!r}")
        self.model, self.algorithm = model, algorithm
        self.params = dict(model.named_parameters())
        self.inner_names, self.outer_names = list(inner_names), list(outer_names)
        self.outer = [self.params[n] for n in self.outer_names]
        self.inner_lr, self.train_cycles = inner_lr, train_cycles
        self.zap, self.max_grad_norm = zap, max_grad_norm
        self.fmodel = FunctionalModel(model, self.inner_names)
        self.optimizer = torch.optim.Adam(self.outer, lr=outer_lr)

    def step(self, episode: Episode, zap_generator: torch.Generator) -> dict[str, float]:
        if self.zap:
            zap_rows(self.params["fc.weight"], episode.inner_classes, zap_generator)
        if self.algorithm == "meta":
            loss, logits, stats = meta_loss(self.fmodel, self.params, self.inner_names, episode,
                                            self.inner_lr, self.train_cycles, create_graph=True)
        else:
            with torch.no_grad():
                shared = self.fmodel.prepare(self.params, episode.images)
            fast, stats = inner_loop(self.fmodel, self.params, self.inner_names, episode,
                                     self.inner_lr, self.train_cycles, False, shared)
            with torch.no_grad():
                for name in self.inner_names:
                    self.params[name].copy_(fast[name])
            del fast
            logits = self.model(episode.images[episode.meta_rows])
            loss = F.cross_entropy(logits, episode.labels[episode.meta_rows])
        grads = torch.autograd.grad(loss, self.outer, materialize_grads=True)
        norm = _apply_gradients(self.outer, grads, self.max_grad_norm)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        acc = (logits.detach().argmax(1) == episode.labels[episode.meta_rows]).float().mean()
        meta_loss_value, meta_acc, grad_norm = torch.stack([loss.detach(), acc, norm]).tolist()
        return {**stats.summary(), "meta_loss": meta_loss_value, "meta_acc": meta_acc,
                "grad_norm": grad_norm}


def lr_factor(schedule: str, step: int, max_steps: int, step_size: int, gamma: float) -> float:
    """Multiplier of the base learning rate at `step` (a pure function, so resuming is exact)."""
    if schedule == "constant":
        return 1.0
    if schedule == "step":
        return gamma ** (step // step_size)
    if schedule == "cosine":
        return 0.5 * (1 + math.cos(math.pi * min(step, max_steps) / max_steps))
    raise ConfigError(f"unknown lr schedule {schedule!r}; valid choices: constant, step, cosine")


class IIDTrainer:
    """Minibatch training of the whole model with Adam or SGD and a learning-rate schedule."""

    def __init__(self, model: nn.Module, names: list[str], *, optimizer: str = "adam",
                 lr: float = 1e-3, momentum: float = 0.9, weight_decay: float = 0.0,
                 schedule: str = "constant", max_steps: int = 1, step_size: int = 1000,
                 gamma: float = 0.1, max_grad_norm: float = 0.0):
        self.model = model
        self.params = [p for n, p in model.named_parameters() if n in set(names)]
        if optimizer == "adam":
            self.optimizer = torch.optim.Adam(self.params, lr=lr, weight_decay=weight_decay)
        elif optimizer == "sgd":
            self.optimizer = torch.optim.SGD(self.params, lr=lr, momentum=momentum,
                                             weight_decay=weight_decay)
        else:
            raise ConfigError(f"unknown optimizer {optimizer!r}; valid choices: adam, sgd")
        lr_factor(schedule, 0, max_steps, step_size, gamma)  # validates the schedule name
        self.base_lr, self.schedule = lr, schedule
        self.max_steps, self.step_size, self.gamma = max_steps, step_size, gamma
        self.max_grad_norm = max_grad_norm

    def step(self, images: torch.Tensor, labels: torch.Tensor, step: int) -> dict[str, float]:
        lr = self.base_lr * lr_factor(self.schedule, step, self.max_steps, self.step_size,
                                      self.gamma)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        logits = self.model(images)
        loss = F.cross_entropy(logits, labels)
        grads = torch.autograd.grad(loss, self.params, materialize_grads=True)
        norm = _apply_gradients(self.params, grads, self.max_grad_norm)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        acc = (logits.detach().argmax(1) == labels).float().mean()
        loss_value, acc_value, grad_norm = torch.stack([loss.detach(), acc, norm]).tolist()
        return {"loss": loss_value, "acc": acc_value, "grad_norm": grad_norm, "lr": lr}
