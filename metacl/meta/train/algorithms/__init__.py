"""Meta-training algorithms: one module per algorithm behind one small contract.

An algorithm is a class registered by name with `@register_algorithm("name")` in a module of
this package (found automatically, so a new algorithm is one file plus a YAML config), or in any
module imported before the config is loaded (a test's toy algorithm). It has

    Config                 a dataclass with a docstring under every field: the config's `train:`
                           section, validated against it (`metacl config describe meta-train
                           algorithm=NAME` lists it)
    __init__(model, pool, config, streams, augment)
                           `pool` holds the training classes' images (classes, per class, C, H, W)
                           on the device; `streams` the run's named generators ("sample", "zap"),
                           whose states the training loop checkpoints; `augment` maps a batch of
                           images to its augmented copy (the identity unless data.augment)
    steps                  how many `step()` calls make the run
    length_field           (optional) the Config field that only sets `steps` (`--extend` may raise it:
                           the first steps do not depend on it), or None when the length shapes
                           the run (a schedule over it)
    step(step) -> dict     draw its own episode or batch, update the model, return scalar metrics
                           (a `meta_loss` or `loss` key is checked for divergence)
    trial_params, trial_lr what the periodic continual trial adapts, and at which SGD rate
    state_dict() / load_state_dict(state)
                           everything else exact resume needs (optimiser, sampling order)
"""

from __future__ import annotations

import importlib
import math
import pkgutil
from collections.abc import Callable, Sequence
from typing import Any, Protocol

import torch
from torch import nn

from ....core.errors import ConfigError

_REGISTRY: dict[str, type] = {}

Augment = Callable[[torch.Tensor], torch.Tensor]


def no_augment(images: torch.Tensor) -> torch.Tensor:
    return images


class Algorithm(Protocol):
    Config: type
    steps: int
    trial_params: list[str]
    trial_lr: float

    def step(self, step: int) -> dict[str, float]: ...

    def state_dict(self) -> dict[str, Any]: ...

    def load_state_dict(self, state: dict[str, Any]) -> None: ...


def register_algorithm(name: str) -> Callable[[type], type]:
    def decorate(cls: type) -> type:
        if name in _REGISTRY and _REGISTRY[name] is not cls:
            raise ValueError(f"algorithm {name!r} is registered twice")
        _REGISTRY[name] = cls
        return cls

    return decorate


def available_algorithms() -> list[str]:
    for module in pkgutil.iter_modules(__path__):
        importlib.import_module(f"{__name__}.{module.name}")
    return sorted(_REGISTRY)


def algorithm_class(name: str) -> type:
    if name not in available_algorithms():
        raise ConfigError(f"unknown algorithm {name!r}; valid choices: {', '.join(available_algorithms())}")
    return _REGISTRY[name]


def apply_gradients(
    params: Sequence[torch.Tensor], grads: tuple[torch.Tensor, ...], max_grad_norm: float
) -> torch.Tensor:
    """Set .grad from `grads`, clip to `max_grad_norm` (0: no clipping); return the norm before."""
    for param, grad in zip(params, grads):
        param.grad = grad
    return nn.utils.clip_grad_norm_(params, max_grad_norm if max_grad_norm > 0 else math.inf)
