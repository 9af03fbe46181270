"""How each run's trainable parameters start: the model's values, with `reinit_params` replaced.

kaiming  kaiming-normal weights (fan-in, ReLU gain) and zero biases, from a stream seeded per
         split, class count and run (as the reference's per-job seed).
lstsq    one linear layer fitted by least squares to one-hot labels on the layer's inputs of a
         support sample (one image per class, or `init_size` random ones); zero-shot stops there.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ...core.errors import ConfigError
from ...core.seeding import torch_generator
from .protocol import ProtocolConfig, Tasks


@dataclass(frozen=True)
class Reinit:
    """The starting values of one model's runs under one protocol, on one split."""

    model: nn.Module
    """The (frozen, evaluation-mode) model whose values the runs start from."""
    reinit: list[str]
    """Names of the parameters re-initialised (those `protocol.reinit_params` selects)."""
    protocol: ProtocolConfig
    seed: int
    split: str

    def start(
        self, tasks: Tasks, run: int, params: list[str], layer_input: Callable[[nn.Module, torch.Tensor], torch.Tensor]
    ) -> dict[str, torch.Tensor]:
        """Run `run`'s starting values of `params` (the parameters that learn).

        `layer_input(layer, images)` gives the lstsq layer's inputs for flat image indices. Re-initialising
        a parameter that does not learn is refused: it would silently not take effect.
        """
        named = dict(self.model.named_parameters())
        values = {n: named[n].detach().clone() for n in params}
        if not self.reinit:
            return values
        if self.protocol.reinit_method == "kaiming":
            generator = torch_generator(self.seed, "meta-eval-reinit", self.split, tasks.classes, run)
            fresh = kaiming_reinit({n: named[n] for n in self.reinit}, generator)
        else:
            name, layer = lstsq_layer(self.model, self.protocol.reinit_params)
            support = self.lstsq_support(tasks, run)
            features = layer_input(layer, support)
            labels = tasks.class_ids[run][
                torch.div(support_positions(tasks, run, support), self.protocol.train_examples, rounding_mode="floor")
            ]
            weight, bias = lstsq_fit(features, labels.to(features.device), layer.out_features)
            fresh = {f"{name}.weight": weight}
            if layer.bias is not None:
                fresh[f"{name}.bias"] = bias
        frozen = [n for n in fresh if n not in values]
        if frozen:
            raise ConfigError(
                f"reinit_params {self.protocol.reinit_params} re-initialise parameters that do not "
                f"learn ({', '.join(frozen)}); add them to opt_params"
            )
        values.update(fresh)
        return values

    def lstsq_support(self, tasks: Tasks, run: int) -> torch.Tensor:
        """Flat image indices of the lstsq support sample: one per class, or `init_size` random ones (at most all)."""
        train = tasks.train[run]
        if self.protocol.init_size is None:
            return train[:: self.protocol.train_examples]
        generator = torch_generator(self.seed, "meta-eval-init-support", self.split, tasks.classes, run)
        return train[torch.randperm(len(train), generator=generator)[: self.protocol.init_size]]


def support_positions(tasks: Tasks, run: int, support: torch.Tensor) -> torch.Tensor:
    """Positions of support images in the run's learning order (to recover their labels)."""
    position = {int(i): k for k, i in enumerate(tasks.train[run].tolist())}
    return torch.tensor([position[int(i)] for i in support.tolist()])


def kaiming_reinit(params: dict[str, torch.Tensor], generator: torch.Generator) -> dict[str, torch.Tensor]:
    """Fresh values: kaiming-normal (fan-in, ReLU gain) for weights, zeros for biases (as the reference)."""
    fresh = {}
    for name, value in params.items():
        if name.endswith("bias"):
            fresh[name] = torch.zeros_like(value)
        elif value.dim() >= 2:
            sample = torch.empty(value.shape, dtype=value.dtype)
            nn.init.kaiming_normal_(sample, generator=generator)
            fresh[name] = sample.to(value.device)
        else:
            raise ConfigError(
                f"cannot kaiming-initialise {name!r} (shape {tuple(value.shape)}): only weights "
                f"of 2 or more dimensions and biases; narrow protocol.reinit_params"
            )
    return fresh


def lstsq_fit(features: torch.Tensor, labels: torch.Tensor, outputs: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(weight (outputs, D), bias (outputs,)) minimising ||[features, 1] @ [weight | bias]^T - onehot||.

    Solved in float64 with the SVD driver, so it is the minimum-norm solution when there are fewer
    samples than features (as numpy.linalg.lstsq in the reference).
    """
    inputs = torch.cat([features.double(), features.new_ones(len(features), 1, dtype=torch.float64)], 1)
    targets = F.one_hot(labels.long(), outputs).double()
    solution = torch.linalg.lstsq(inputs.cpu(), targets.cpu(), driver="gelsd").solution
    weight, bias = solution[:-1].T, solution[-1]
    return weight.to(features.device, torch.float32), bias.to(features.device, torch.float32)


def lstsq_layer(model: nn.Module, reinit_params: list[str]) -> tuple[str, nn.Linear]:
    """The single linear layer that a least-squares re-initialisation fits."""
    modules = dict(model.named_modules())
    names = [p.removesuffix(".") for p in reinit_params]
    if len(names) != 1 or not isinstance(modules.get(names[0]), nn.Linear):
        linear = [n for n, m in modules.items() if isinstance(m, nn.Linear)]
        raise ConfigError(
            f"reinit_method=lstsq fits exactly one linear layer; reinit_params={reinit_params} "
            f"must name one of: {', '.join(linear)}"
        )
    return names[0], modules[names[0]]


@torch.no_grad()
def layer_inputs(
    model: nn.Module,
    layer: nn.Module,
    run_model: Callable[[torch.Tensor], torch.Tensor],
    inputs: torch.Tensor,
    batch: int = 512,
) -> torch.Tensor:
    """What `layer` receives while `run_model` processes `inputs` (batched, captured by a hook)."""
    captured: list[torch.Tensor] = []
    handle = layer.register_forward_hook(lambda _m, args, _out: captured.append(args[0].detach()))
    try:
        for start in range(0, len(inputs), batch):
            run_model(inputs[start : start + batch])
    finally:
        handle.remove()
    return torch.cat(captured)
