"""Engine for the unfrozen meta-test on CPU: every trajectory stepped by plain autograd, one after another.

Under torch.func.vmap each step of a group becomes batched products of per-trajectory weights
at batch 1, and metacl's batch-1 kernels (`models/layers.py`) give way to PyTorch's; one
trajectory at a time they apply, and its Adam step is PyTorch's fused kernel. Measured on ANML
(every parameter learning, 2-core Xeon): 13 against 26 ms per trajectory-step over a 30-step
sweep, evaluations aside. `vmap_engine.VmapEngine` with another `learner` and `all_logits`.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from ...core.optim import fused_adam
from .vmap_engine import VmapEngine


class SequentialEngine(VmapEngine):
    """Trajectories of the parameters `trainable` of `model`, each step run trajectory by trajectory."""

    def learner(
        self, params: dict[str, torch.Tensor], lrs: torch.Tensor
    ) -> Callable[[torch.Tensor, torch.Tensor], None]:
        """One step of every trajectory in turn: its loss's gradient by autograd, then its Adam
        (torch.optim.Adam, fused where available) on views into the stacked `params`."""
        own = [{n: params[n][t].detach().requires_grad_() for n in self.trainable} for t in range(len(lrs))]
        optimisers = [fused_adam(list(p.values()), lr) for p, lr in zip(own, lrs.tolist())]

        def learn(inputs: torch.Tensor, labels: torch.Tensor) -> None:
            for trajectory, optimiser, x, y in zip(own, optimisers, inputs, labels):
                grads = torch.autograd.grad(self.loss_of(trajectory, x, y), list(trajectory.values()))
                for param, grad in zip(trajectory.values(), grads):
                    param.grad = grad
                optimiser.step()

        return learn

    def all_logits(self, params: dict[str, torch.Tensor]) -> Callable[[torch.Tensor], torch.Tensor]:
        """(T, n) image indices -> (T, n, outputs) logits, trajectory by trajectory (batched images)."""

        def logits(x: torch.Tensor) -> torch.Tensor:
            rows = [self.logits_of({n: params[n][t] for n in self.trainable}, self.inputs[x[t]]) for t in range(len(x))]
            return torch.stack(rows)

        return logits
