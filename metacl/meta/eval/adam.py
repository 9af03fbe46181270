"""Adam for many independent trajectories at once, each with its own learning rate.

A learning-rate sweep trains the same small set of parameters T times. Stacking the T copies
along a leading dimension turns T optimiser steps into one set of tensor operations. The update
is exactly torch.optim.Adam's (the single-tensor path PyTorch takes on CPU, without weight decay
or amsgrad): the same operations in the same order, so the stacked result matches T separate
torch.optim.Adam runs to float32 rounding.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

BETAS = (0.9, 0.999)
"""torch.optim.Adam's default betas, which the reference meta-test uses."""
EPS = 1e-8
"""torch.optim.Adam's default eps."""


class StackedAdam:
    """Adam over parameters stacked as (T, ...) tensors, trajectory t using learning rate lrs[t]."""

    def __init__(
        self,
        params: dict[str, torch.Tensor],
        lrs: torch.Tensor | list[float],
        betas: tuple[float, float] = BETAS,
        eps: float = EPS,
    ):
        self.params = params
        self.lrs = torch.as_tensor(lrs, dtype=torch.float64).cpu()
        self.betas, self.eps = betas, eps
        self.exp_avg = {k: torch.zeros_like(p) for k, p in params.items()}
        self.exp_avg_sq = {k: torch.zeros_like(p) for k, p in params.items()}
        self.steps = 0

    def step(self, grads: dict[str, torch.Tensor]) -> None:
        self.steps += 1
        neg_step, bc2_sqrt = step_scalars(self.lrs, self.steps, self.betas)
        for name, param in self.params.items():
            shape = (-1,) + (1,) * (param.dim() - 1)
            adam_update_(
                param,
                self.exp_avg[name],
                self.exp_avg_sq[name],
                grads[name],
                neg_step.to(param.device).view(shape),
                bc2_sqrt,
                self.betas,
                self.eps,
            )


def step_scalars(lrs: torch.Tensor, step: int, betas: tuple[float, float]) -> tuple[torch.Tensor, float]:
    """(-lr / bias_correction1 per trajectory, as float32 like Adam's addcdiv value; sqrt(bias_correction2))."""
    beta1, beta2 = betas
    neg_step = (-(lrs / (1 - beta1**step))).to(torch.float32)
    return neg_step, (1 - beta2**step) ** 0.5


def adam_update_(
    param: torch.Tensor,
    exp_avg: torch.Tensor,
    exp_avg_sq: torch.Tensor,
    grad: torch.Tensor,
    neg_step: torch.Tensor,
    bc2_sqrt: float,
    betas: tuple[float, float] = BETAS,
    eps: float = EPS,
) -> None:
    """One in-place Adam update, operation for operation as torch.optim.Adam's single-tensor path."""
    beta1, beta2 = betas
    exp_avg.lerp_(grad, 1 - beta1)
    exp_avg_sq.mul_(beta2).addcmul_(grad, grad, value=1 - beta2)
    denom = (exp_avg_sq.sqrt() / bc2_sqrt).add_(eps)
    param.addcdiv_(exp_avg * neg_step, denom)


def linear_step(
    weight: torch.Tensor,
    exp_avg: torch.Tensor,
    exp_avg_sq: torch.Tensor,
    logits: torch.Tensor,
    x: torch.Tensor,
    target: torch.Tensor,
    x_next: torch.Tensor,
    neg_step: torch.Tensor,
    bc2_sqrt: torch.Tensor,
) -> torch.Tensor:
    """One Adam step of cross-entropy on one example per trajectory, for a stacked linear layer.

    weight (T, out, D+1) holds [W | b] and x (T, D+1) ends in a 1, so the bias is one more column
    (Adam is elementwise, so this is exact). `logits` (T, out) are weight @ x, computed by the
    previous step; the return value is the updated weight @ x_next, the logits of the next step,
    so each step reads the weights once. The cross-entropy gradient is formed as autograd forms
    it: exp(log_softmax(logits)) - onehot(target), times x.
    """
    beta1, beta2 = BETAS
    grad_logits = logits.log_softmax(1).exp()
    grad_logits = grad_logits - torch.nn.functional.one_hot(target, grad_logits.shape[1]).to(grad_logits.dtype)
    grad = grad_logits.unsqueeze(2) * x.unsqueeze(1)
    exp_avg.lerp_(grad, 1 - beta1)
    exp_avg_sq.mul_(beta2).addcmul_(grad, grad, value=1 - beta2)
    denom = (exp_avg_sq.sqrt() / bc2_sqrt).add_(EPS)
    weight.addcdiv_(exp_avg * neg_step.view(-1, 1, 1), denom)
    return torch.bmm(weight, x_next.unsqueeze(2)).squeeze(2)


class FusedLinearStep:
    """`linear_step` fused into one pass over the weights by torch.compile (memory-bound otherwise).

    Falls back to the eager function, with a message, where compilation fails (no C++ compiler,
    unsupported platform); the results agree to float32 rounding either way.
    """

    def __init__(self, enabled: bool = True, log: Callable[[str], None] | None = None):
        self.function: Callable | None = None if enabled else linear_step
        self.log = log

    def __call__(self, *args: torch.Tensor) -> torch.Tensor:
        if self.function is not None:
            return self.function(*args)
        # one specialised kernel per group shape (trajectory count and strides vary between the
        # validation sweep, memory-sized chunks and the test split's single-LR groups): allow more
        # than dynamo's default 8 before it silently falls back to eager steps
        import torch._dynamo

        torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, 64)
        compiled = torch.compile(linear_step, dynamic=False)
        try:
            result = compiled(*args)  # compilation happens before any input is modified
        except Exception as error:  # noqa: BLE001 - any backend failure means "run eagerly"
            if self.log:
                self.log(f"torch.compile unavailable ({type(error).__name__}: {error}); using eager Adam steps")
            self.function = linear_step
            return linear_step(*args)
        self.function = compiled
        return result
