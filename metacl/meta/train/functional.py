"""The functional maths of an episode: zapping, the (differentiable) inner loop, meta-losses.

Parameters travel as a dict name -> tensor and the model runs through
`torch.func.functional_call`, as in the functorch MAML example. An inner step is plain tensor
maths, `fast[n] = fast[n] - lr * grad`, with grads from `torch.autograd.grad`; with
`create_graph=True` the meta-loss is differentiable through every step (second order), with
False it is the first-order approximation. An adapted output layer is carried as a low-rank
update of its initial weights (`LowRankHead`): the same function, computed without writing a new
weight matrix at every step.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call

from ...models.convnet import EncoderClassifier
from .episodes import Episode


def zap_rows(weight: torch.Tensor, rows: torch.Tensor, generator: torch.Generator) -> None:
    """Re-initialise output rows `rows` of a linear layer's weight with kaiming-normal, in place.

    Zapping the rows of the classes an episode is about to learn stops the network from simply
    recalling them, so the meta-gradient has to teach it to learn them quickly.
    """
    rows = rows.reshape(-1)
    fan_in = weight.shape[1]
    fresh = torch.randn(len(rows), fan_in, generator=generator) * math.sqrt(2.0 / fan_in)
    with torch.no_grad():
        weight[rows.to(weight.device)] = fresh.to(weight.device, weight.dtype)


class FunctionalModel:
    """Runs a model on a parameter dict, computing once per episode what the inner loop cannot change.

    When every adapted parameter belongs to the head (`model.head_prefixes`), the encoder's output
    is computed once for all the episode's images; when none belongs to the modulation network
    (`model.modulation_prefixes`, ANML's NM), the mask is. Gradients still flow through that
    shared computation to the parameters it depends on.
    """

    def __init__(self, model: nn.Module, inner_names: list[str]):
        self.model = model
        self.low_rank_head = (
            "fc.weight" in inner_names
            and isinstance(model, EncoderClassifier)
            and type(model).head is EncoderClassifier.head  # logits = fc(encode(x)), nothing between
            and type(model.fc) is nn.Linear
        )
        """Whether the inner loop may carry the adapted `fc` as a `LowRankHead`."""
        head = tuple(getattr(model, "head_prefixes", ()))
        modulation = tuple(getattr(model, "modulation_prefixes", ()))
        if head and all(name.startswith(head) for name in inner_names):
            self.reuse: str | None = "encode"
        elif modulation and not any(name.startswith(modulation) for name in inner_names):
            self.reuse = "mask"
        else:
            self.reuse = None

    def __call__(self, params: dict[str, torch.Tensor], images: torch.Tensor, **kwargs) -> torch.Tensor:
        buffers = dict(self.model.named_buffers())
        return functional_call(self.model, (params, buffers), (images,), kwargs)

    def prepare(self, params: dict[str, torch.Tensor], images: torch.Tensor) -> torch.Tensor | None:
        """The per-image work shared by every step of an episode (None when nothing is shared)."""
        return None if self.reuse is None else self(params, images, stage=self.reuse)

    def features(
        self, params: dict[str, torch.Tensor], images: torch.Tensor, shared: torch.Tensor | None, rows: slice
    ) -> torch.Tensor:
        """What `fc` reads (the encoder's output) for `images[rows]`."""
        if self.reuse == "encode":
            assert shared is not None
            return shared[rows]
        if self.reuse == "mask":
            assert shared is not None
            return self(params, images[rows], stage="encode", mask=shared[rows])
        return self(params, images[rows], stage="encode")

    def logits(
        self, params: dict[str, torch.Tensor], images: torch.Tensor, shared: torch.Tensor | None, rows: slice
    ) -> torch.Tensor:
        if self.reuse == "encode":
            assert shared is not None
            return self(params, shared[rows], stage="head")
        if self.reuse == "mask":
            assert shared is not None
            return self(params, images[rows], mask=shared[rows])
        return self(params, images[rows])


@dataclass
class InnerStats:
    """Losses and accuracies of the inner steps (each measured before its update)."""

    losses: list[torch.Tensor]
    correct: list[torch.Tensor]
    count: int

    def summary(self) -> dict[str, float]:
        if not self.losses:
            return {"inner_loss": float("nan"), "inner_acc": float("nan")}
        return {
            "inner_loss": float(torch.stack(self.losses).mean()),
            "inner_acc": float(torch.stack(self.correct).sum()) / self.count,
        }


class _WeightGradient:
    """Pairs (left, right) whose products left^T @ right sum to a weight's gradient, filled by
    `_ProductWithStashedGradient` nodes during a backward pass and summed by `_GatherWeightGradient`."""

    def __init__(self) -> None:
        self.lefts: list[torch.Tensor] = []
        self.rights: list[torch.Tensor] = []


class _GatherWeightGradient(torch.autograd.Function):
    """Identity on the weight; its backward adds the stashed pairs' products in one matrix product.

    Autograd runs it after every node that uses its output, so by then every pair is stashed.
    """

    @staticmethod
    def forward(ctx, weight: torch.Tensor, stash: _WeightGradient) -> torch.Tensor:  # type: ignore[override]
        ctx.stash = stash
        return weight.clone()

    @staticmethod
    def backward(ctx, grad: torch.Tensor):  # type: ignore[override]
        stash: _WeightGradient = ctx.stash
        if stash.lefts:
            grad = grad + torch.cat(stash.lefts).T @ torch.cat(stash.rights)
            stash.lefts.clear()
            stash.rights.clear()
        return grad, None


class _ProductWithStashedGradient(torch.autograd.Function):
    """x @ W.T (transpose) or x @ W, whose gradient for W is stashed as a pair, not computed."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, stash: _WeightGradient, transpose: bool):  # type: ignore[override]
        ctx.save_for_backward(x, weight)
        ctx.stash, ctx.transpose = stash, transpose
        return x @ weight.T if transpose else x @ weight

    @staticmethod
    def backward(ctx, grad: torch.Tensor):  # type: ignore[override]
        x, weight = ctx.saved_tensors
        stash: _WeightGradient = ctx.stash
        if ctx.transpose:  # y = x W^T: dW = grad^T x
            stash.lefts.append(grad)
            stash.rights.append(x)
            return grad @ weight, None, None, None
        stash.lefts.append(x)  # y = x W: dW = x^T grad
        stash.rights.append(grad)
        return grad @ weight.T, None, None, None


class LowRankHead:
    """The output layer's fast weights in an inner loop, kept as W_0 - lr * G^T Z.

    An SGD step on a linear layer's cross-entropy adds the outer product of the loss's gradient at
    the logits (g, classes wide) and the layer's input (z, features wide), so after k steps
    W_k = W_0 - lr * sum_j g_j^T z_j and W_k z = W_0 z - lr * G^T (Z z): the same function, with
    the same first and second derivatives. Carried this way, no step writes (or, in the double
    backward, reads back) a new 1,000 x 2,304 matrix.

    The step's backward through the head is written out (g = softmax - one-hot, and the
    encoder's gradient g W_k), so that W_0 enters each step through two products only; with
    `create_graph` their gradients for W_0 are stashed and summed in one matrix product at the
    end of the meta-backward (`_GatherWeightGradient`) instead of 40 outer products and sums of
    full-size matrices. Measured on ANML: the low-rank head 8% of an episode, the gathered W_0
    gradient a further ~6%.
    """

    names = ("fc.weight", "fc.bias")

    def __init__(self, params: dict[str, torch.Tensor], inner_names: list[str], lr: float, create_graph: bool):
        self.weight = params["fc.weight"]
        self.bias = params.get("fc.bias")
        self.adapt_bias = "fc.bias" in inner_names
        self.create_graph = create_graph
        self.stash = _WeightGradient()
        # the same numbers as W_0; with create_graph, its gradient is gathered as described above
        self.gathered = _GatherWeightGradient.apply(self.weight, self.stash) if create_graph else self.weight.detach()
        self.lr = lr
        self.inputs: torch.Tensor | None = None  # Z: every step's z, (steps x batch, features)
        self.grads: torch.Tensor | None = None  # G: every step's g, (steps x batch, classes)

    def _product(self, x: torch.Tensor, transpose: bool) -> torch.Tensor:
        if not self.create_graph:
            return x @ self.gathered.T if transpose else x @ self.gathered
        return _ProductWithStashedGradient.apply(x, self.gathered, self.stash, transpose)

    def __call__(self, z: torch.Tensor) -> torch.Tensor:
        """The logits W_k z + b_k."""
        logits = self._product(z, transpose=True)
        if self.bias is not None:
            logits = logits + self.bias
        if self.inputs is not None and self.grads is not None:
            logits = logits - self.lr * ((z @ self.inputs.T) @ self.grads)
        return logits

    def input_grad(self, grad_logits: torch.Tensor) -> torch.Tensor:
        """The loss's gradient at the head's input, grad_logits W_k."""
        grad = self._product(grad_logits, transpose=False)
        if self.inputs is not None and self.grads is not None:
            grad = grad - self.lr * ((grad_logits @ self.grads.T) @ self.inputs)
        return grad

    def step(self, z: torch.Tensor, grad_logits: torch.Tensor) -> None:
        """One SGD step: z and g join Z and G."""
        self.inputs = z if self.inputs is None else torch.cat([self.inputs, z])
        self.grads = grad_logits if self.grads is None else torch.cat([self.grads, grad_logits])
        if self.adapt_bias:
            assert self.bias is not None
            self.bias = self.bias - self.lr * grad_logits.sum(0)

    def parameters(self) -> dict[str, torch.Tensor]:
        """The fast weights as plain tensors (one matrix product for the weight)."""
        weight = self.weight
        if self.inputs is not None and self.grads is not None:
            weight = weight - self.lr * (self.grads.T @ self.inputs)
        return {"fc.weight": weight, **({"fc.bias": self.bias} if self.adapt_bias else {})}


def inner_loop(
    fmodel: FunctionalModel,
    params: dict[str, torch.Tensor],
    inner_names: list[str],
    episode: Episode,
    lr: float,
    cycles: int,
    create_graph: bool,
    shared: torch.Tensor | None,
) -> tuple[dict[str, torch.Tensor], InnerStats]:
    """SGD on the inner parameters through the episode's trajectory; returns the fast weights."""
    fast = dict(params)
    head = LowRankHead(params, inner_names, lr, create_graph) if fmodel.low_rank_head else None
    names = [n for n in inner_names if head is None or n not in head.names]
    stats = InnerStats([], [], 0)
    for rows in episode.inner_batches(cycles):
        labels = episode.labels[rows]
        if head is None:
            logits = fmodel.logits(fast, episode.images, shared, rows)
            loss = F.cross_entropy(logits, labels)
            grads = torch.autograd.grad(
                loss, [fast[n] for n in names], create_graph=create_graph, materialize_grads=True
            )
        else:
            features = fmodel.features(fast, episode.images, shared, rows)
            logits = head(features)
            # the mean cross-entropy's gradient at the logits, written out
            grad_logits = (logits.softmax(1) - F.one_hot(labels, logits.shape[1]).to(logits.dtype)) / len(labels)
            if not create_graph:
                grad_logits = grad_logits.detach()
            grads = ()
            if names:
                grads = torch.autograd.grad(
                    features,
                    [fast[n] for n in names],
                    head.input_grad(grad_logits),
                    create_graph=create_graph,
                    materialize_grads=True,
                )
            # first order: the step's update is a constant, as `grads` are
            head.step(features if create_graph else features.detach(), grad_logits)
            loss = F.cross_entropy(logits.detach(), labels)
        for name, grad in zip(names, grads):
            fast[name] = fast[name].add(grad, alpha=-lr)  # one kernel for fast - lr * grad
        stats.losses.append(loss.detach())
        stats.correct.append((logits.detach().argmax(1) == labels).sum())
        stats.count += len(labels)
    if head is not None:
        fast.update(head.parameters())
    return fast, stats


def meta_loss(
    fmodel: FunctionalModel,
    params: dict[str, torch.Tensor],
    inner_names: list[str],
    episode: Episode,
    lr: float,
    cycles: int = 1,
    create_graph: bool = True,
) -> tuple[torch.Tensor, torch.Tensor, InnerStats]:
    """(meta-loss, meta logits, inner stats): the loss after the inner loop, on the meta batch."""
    shared = fmodel.prepare(params, episode.images)
    fast, stats = inner_loop(fmodel, params, inner_names, episode, lr, cycles, create_graph, shared)
    logits = fmodel.logits(fast, episode.images, shared, episode.meta_rows)
    return F.cross_entropy(logits, episode.labels[episode.meta_rows]), logits, stats


def continual_trial(
    fmodel: FunctionalModel,
    params: dict[str, torch.Tensor],
    inner_names: list[str],
    images: torch.Tensor,
    lr: float,
    train_per_class: int,
    generator: torch.Generator,
) -> float:
    """Accuracy after learning `images` (classes, per_class, ...) one class after another.

    The classes take output rows 0..n-1; the whole output layer is zapped first (as the
    reference meta-test does); each class is learned from its first
    `train_per_class` images, one SGD step per image, on `inner_names`; accuracy is on the rest.
    A cheap, periodic proxy of the meta-test protocol on the training or validation pool.
    """
    num_classes, per_class = images.shape[:2]
    params = {n: p.detach().clone().requires_grad_(n in inner_names) for n, p in params.items()}
    zap_rows(params["fc.weight"], torch.arange(params["fc.weight"].shape[0]), generator)
    labels = torch.arange(num_classes, device=images.device).repeat_interleave(per_class)
    flat = images.reshape(num_classes * per_class, *images.shape[2:])
    order = (
        (torch.arange(num_classes)[:, None] * per_class + torch.arange(train_per_class)[None, :]).reshape(-1).tolist()
    )
    test = torch.ones(num_classes, per_class, dtype=torch.bool)
    test[:, :train_per_class] = False
    test = test.reshape(-1).to(images.device)
    trajectory = Episode(flat[order], labels[order], len(order), 1, remember_only=False)
    with torch.no_grad():
        shared = fmodel.prepare(params, flat)
    shared_train = None if shared is None else shared[order]
    fast, _ = inner_loop(fmodel, params, inner_names, trajectory, lr, 1, False, shared_train)
    with torch.no_grad():
        logits = fmodel.logits(fast, flat, shared, slice(None))
    return float((logits.argmax(1) == labels)[test].float().mean())
