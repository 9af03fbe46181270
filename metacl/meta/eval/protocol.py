"""The sequential meta-test (the ANML/OML protocol) and its variants, as batched LR x run sweeps.

One sweep = one class count: every (run, learning rate) pair is a trajectory. Run r draws its
classes, their train/test split and its re-initialisation from seeded streams shared by all
learning rates, as the reference's separate jobs with one seed did. Trajectories then learn the
classes in order, one image per Adam step, and are evaluated on every class's train images
(retention) and test images (generalisation).

Where only head parameters learn, the encoder is frozen: its features are computed once and all
trajectories train together. A single trainable linear layer (ANML/OML last layer) runs as
stacked matrix maths (`adam.linear_step`), anything else as `torch.func.vmap` over trajectories.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Annotated, Callable, Literal

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call, grad, vmap

from ...core.config import NonEmpty, NonNegative, Positive, PositiveFloat
from ...core.errors import ConfigError
from ...core.progress import progress
from ...core.seeding import torch_generator
from ...models import select_parameters
from .adam import FusedLinearStep, StackedAdam, step_scalars

REFERENCE_LRS = [0.1, 0.055, 0.01, 0.0055, 0.001, 7e-4, 4e-4, 1e-4, 7e-5, 4e-5, 1e-5, 5.5e-6]
"""The reference's learning-rate sweep."""
REFERENCE_CLASSES = [10, 50, 75, 100, 200, 300, 400, 500, 600]
"""The reference's class counts."""
FEATURE_BLOCK = 64
"""Images encoded per batch when computing frozen features (aligned blocks; see Sweep.features)."""


@dataclass
class ProtocolConfig:
    """How a model is meta-tested: what is re-initialised and trained, on how many classes, at which LRs."""

    eval_method: Literal["sequential", "iid", "zero-shot"] = "sequential"
    """sequential: one image per Adam step, class after class (the ANML/OML meta-test); iid: the
    oracle, shuffled minibatches of the same support set for `epochs`; zero-shot: a least-squares
    head fitted on the support set and no SGD at all (needs reinit_method=lstsq)."""
    reinit_method: Literal["kaiming", "lstsq"] = "kaiming"
    """kaiming: kaiming-normal weights, zero biases; lstsq: least-squares fit of one linear layer
    to one-hot labels, on its input features of `init_size` support images."""
    reinit_params: list[str] = field(default_factory=lambda: ["fc"])
    """Parameter-name prefixes to re-initialise before learning ([] re-initialises nothing)."""
    opt_params: Annotated[list[str], NonEmpty()] = field(default_factory=lambda: ["fc"])
    """Parameter-name prefixes that learn ("all" = every parameter, the unfrozen flavour); the rest are frozen."""
    init_size: Positive | None = None
    """Support images for the lstsq re-initialisation, drawn at random (all of them when it exceeds the
    support set); None takes one image per class, as the reference does."""
    classes: Annotated[list[Positive], NonEmpty()] = field(default_factory=lambda: list(REFERENCE_CLASSES))
    """Class counts to evaluate; each is a separate sweep with its own class draws."""
    train_examples: Positive = 15
    """Images per class learned from (the support set); the retention measurement."""
    test_examples: Positive = 5
    """Held-out images per class; the generalisation measurement."""
    lrs: Annotated[list[PositiveFloat], NonEmpty()] = field(default_factory=lambda: list(REFERENCE_LRS))
    """Adam learning rates to sweep (ignored by zero-shot)."""
    runs: Positive = 10
    """Repeats per learning rate, each with its own class draw, split and re-initialisation."""
    eval_freq: NonNegative = 0
    """Evaluate after the first class, every `eval_freq` classes and at the end; 0 = only at the end."""
    epochs: Positive = 1
    """Passes over the support set (iid only)."""
    batch_size: Positive = 256
    """Minibatch size (iid only)."""
    memory_gb: PositiveFloat = 2.0
    """Memory for trajectory state (weights, Adam moments, temporaries); sets how many trajectories run at once."""
    trajectory_group: int = 0
    """Linear-head trajectories advanced together, step after step, before the next group starts
    (0 = as many as memory_gb allows). Results do not depend on it; only speed does (see
    benchmarks/bench_meta_eval.py --groups)."""
    compile: bool = True
    """Fuse the linear-head Adam step with torch.compile (falls back to eager ops where it cannot compile)."""

    def __post_init__(self) -> None:
        check_protocol(self)


def check_protocol(protocol: ProtocolConfig, per_class: int | None = None) -> None:
    """Raise ConfigError for settings the protocol cannot run."""
    if not protocol.classes or any(c < 1 for c in protocol.classes):
        raise ConfigError(f"protocol.classes must be positive class counts, got {protocol.classes}")
    if protocol.train_examples < 1 or protocol.test_examples < 1:
        raise ConfigError("protocol.train_examples and protocol.test_examples must be at least 1")
    if per_class is not None and protocol.train_examples + protocol.test_examples > per_class:
        raise ConfigError(f"train_examples + test_examples = {protocol.train_examples + protocol.test_examples} "
                          f"but the data has only {per_class} images per class")
    if protocol.eval_method != "zero-shot" and (not protocol.lrs or any(lr <= 0 for lr in protocol.lrs)):
        raise ConfigError(f"protocol.lrs must be positive learning rates, got {protocol.lrs}")
    if protocol.runs < 1 or protocol.eval_freq < 0 or protocol.epochs < 1 or protocol.batch_size < 1:
        raise ConfigError("protocol.runs, epochs and batch_size must be >= 1 and eval_freq >= 0")
    if protocol.eval_method == "zero-shot" and protocol.reinit_method != "lstsq":
        raise ConfigError("eval_method=zero-shot learns nothing, so it needs reinit_method=lstsq")
    if protocol.init_size is not None and protocol.init_size < 1:
        raise ConfigError(f"protocol.init_size must be >= 1 or null, got {protocol.init_size}")
    if protocol.trajectory_group < 0:
        raise ConfigError(f"protocol.trajectory_group must be >= 0 (0 = as many as memory_gb allows), "
                          f"got {protocol.trajectory_group}")
    if protocol.memory_gb <= 0:
        raise ConfigError(f"protocol.memory_gb must be positive, got {protocol.memory_gb}")


# ------------------------------------------------------------------------------------ tasks
@dataclass
class Tasks:
    """The classes of every run and their train/test images, as flat indices into the dataset."""

    class_ids: torch.Tensor
    """(runs, classes) dataset class indices, in learning order; they are also the labels."""
    train: torch.Tensor
    """(runs, classes * train_examples) flat image indices (class * per_class + image), learning order."""
    test: torch.Tensor
    """(runs, classes * test_examples) flat image indices, class-major."""


def draw_tasks(num_classes: int, per_class: int, classes: int, train_examples: int, test_examples: int,
               runs: int, seed: int, *keys: object) -> Tasks:
    """Seeded class draws and per-class train/test splits, one per run (shared by all LRs)."""
    if classes > num_classes:
        raise ConfigError(f"cannot draw {classes} classes from a dataset of {num_classes}")
    ids, train, test = [], [], []
    for run in range(runs):
        generator = torch_generator(seed, "meta-eval-tasks", *keys, classes, run)
        chosen = torch.randperm(num_classes, generator=generator)[:classes]
        order = torch.rand(classes, per_class, generator=generator).argsort(1)
        flat = chosen.unsqueeze(1) * per_class + order
        ids.append(chosen)
        train.append(flat[:, :train_examples].flatten())
        test.append(flat[:, train_examples:train_examples + test_examples].flatten())
    return Tasks(torch.stack(ids), torch.stack(train), torch.stack(test))


def eval_points(classes: int, eval_freq: int) -> list[int]:
    """Class counts after which to evaluate: the first class, every eval_freq-th, and the last."""
    points = {classes}
    if eval_freq:
        points |= {1, *range(eval_freq, classes + 1, eval_freq)}
    return sorted(points)


# ----------------------------------------------------------------------------- re-initialising
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
            raise ConfigError(f"cannot kaiming-initialise {name!r} (shape {tuple(value.shape)}): only weights "
                              f"of 2 or more dimensions and biases; narrow protocol.reinit_params")
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
        raise ConfigError(f"reinit_method=lstsq fits exactly one linear layer; reinit_params={reinit_params} "
                          f"must name one of: {', '.join(linear)}")
    return names[0], modules[names[0]]


@torch.no_grad()
def layer_inputs(model: nn.Module, layer: nn.Module, run_model: Callable[[torch.Tensor], torch.Tensor],
                 inputs: torch.Tensor, batch: int = 512) -> torch.Tensor:
    """What `layer` receives while `run_model` processes `inputs` (batched, captured by a hook)."""
    captured: list[torch.Tensor] = []
    handle = layer.register_forward_hook(lambda _m, args, _out: captured.append(args[0].detach()))
    try:
        for start in range(0, len(inputs), batch):
            run_model(inputs[start:start + batch])
    finally:
        handle.remove()
    return torch.cat(captured)


# ------------------------------------------------------------------------------------ results
@dataclass
class SweepResult:
    """Per-class accuracies of every trajectory at every evaluation point of one sweep."""

    lrs: np.ndarray
    """(T,) learning rate of each trajectory."""
    trials: np.ndarray
    """(T,) run index of each trajectory."""
    classes_trained: list[int]
    """(E,) classes learned at each evaluation point."""
    train_acc: np.ndarray
    """(E, T, classes) top-1 accuracy on each class's train images (retention)."""
    test_acc: np.ndarray
    """(E, T, classes) top-1 accuracy on each class's test images (generalisation)."""
    train_top5: np.ndarray
    """(E, T, classes) top-5 accuracy on train images."""
    test_top5: np.ndarray
    """(E, T, classes) top-5 accuracy on test images."""


class Sweep:
    """Runs one protocol on one dataset split for a model, reusing frozen features across class counts."""

    def __init__(self, model: nn.Module, images: torch.Tensor, protocol: ProtocolConfig, seed: int,
                 split: str = "test", quiet: bool = True, log: Callable[[str], None] | None = None):
        """`images` is the split's (C, K, channels, H, W) tensor; the model is deep-copied, never changed."""
        import copy
        check_protocol(protocol, images.shape[1])
        self.model = copy.deepcopy(model).eval()
        for p in self.model.parameters():
            p.requires_grad_(False)
        self.num_classes, self.per_class = images.shape[:2]
        self.images = images.flatten(0, 1)
        self.protocol, self.seed, self.split, self.quiet = protocol, seed, split, quiet
        self.log = log or (lambda _message: None)
        self.device = self.images.device
        self.named = dict(self.model.named_parameters())
        self.trainable = list(select_parameters(self.model, protocol.opt_params)) \
            if protocol.eval_method != "zero-shot" else []
        self.reinit = list(select_parameters(self.model, protocol.reinit_params)) if protocol.reinit_params else []
        self.outputs = self._output_size()
        if self.num_classes > self.outputs:
            raise ConfigError(f"labels are the split's class indices (as in the reference), but the model has "
                              f"{self.outputs} outputs for {self.num_classes} classes; use a model with at least "
                              f"{self.num_classes} outputs")
        self.frozen_encoder = not (set(self.trainable) & self._encoder_parameters())
        self.linear = self._single_linear()
        self._features: torch.Tensor | None = None
        self._fused = FusedLinearStep(protocol.compile and self.device.type in ("cpu", "cuda"), self.log)
        self.keep_weights = False
        self.final_weights: list[torch.Tensor] = []
        """With keep_weights, the learned parameters of every trajectory, flattened (for checks)."""

    # -------------------------------------------------------------------------- structure
    def _output_size(self) -> int:
        with torch.no_grad():
            return self.model(self.images[:1]).shape[1]

    def _encoder_parameters(self) -> set[str]:
        """Parameters that `encode` depends on (found by autograd, so any architecture works)."""
        params = dict(self.model.named_parameters())
        for p in params.values():
            p.requires_grad_(True)
        try:
            z = self.model.encode(self.images[:2])
            if not z.requires_grad:
                return set()
            used = torch.autograd.grad(z.sum(), list(params.values()), allow_unused=True)
        finally:
            for p in params.values():
                p.requires_grad_(False)
        return {name for name, g in zip(params, used) if g is not None}

    def _single_linear(self) -> tuple[str, nn.Linear] | None:
        """(name, layer) when the learning part is one linear layer that produces the output."""
        if not self.frozen_encoder or not self.trainable:
            return None
        modules = dict(self.model.named_modules())
        prefix = self.trainable[0].rsplit(".", 1)[0]
        layer = modules.get(prefix)
        own = {f"{prefix}.{n}" for n, _ in layer.named_parameters()} if isinstance(layer, nn.Linear) else set()
        if not own or set(self.trainable) != own or not set(self.reinit) <= own:
            return None
        inputs = layer_inputs(self.model, layer, self.model, self.images[:4])
        with torch.no_grad():
            if not torch.allclose(layer(inputs), self.model(self.images[:4]), atol=1e-5):
                return None
        return prefix, layer

    def features(self, needed: torch.Tensor | None = None) -> torch.Tensor:
        """Frozen inputs of the learning part per image (the linear layer's input, or encode(x)).

        Computed on demand, once, in fixed blocks of consecutive images: only the blocks holding
        `needed` images (all when None) are encoded, so a small sweep on a large split is quick,
        and an image's features never depend on which sweep asked first (exact resumes).
        """
        block = FEATURE_BLOCK
        wanted = torch.arange(len(self.images)) if needed is None else needed.cpu()
        blocks = torch.unique(wanted // block)
        if self._features is not None:
            blocks = blocks[~self._computed[blocks]]
        for b in blocks.tolist():
            images = self.images[b * block:(b + 1) * block]
            if self.linear is not None:
                rows = layer_inputs(self.model, self.linear[1], self.model, images)
            else:
                with torch.no_grad():
                    rows = self.model.encode(images)
            if self._features is None:
                self._features = rows.new_zeros(len(self.images), rows.shape[1])
                self._computed = torch.zeros(-(-len(self.images) // block), dtype=torch.bool)
            self._features[b * block:(b + 1) * block] = rows
            self._computed[b] = True
        return self._features

    # ---------------------------------------------------------------------------- running
    def run(self, classes: int) -> SweepResult:
        p = self.protocol
        tasks = draw_tasks(self.num_classes, self.per_class, classes, p.train_examples, p.test_examples,
                           p.runs, self.seed, self.split)
        lrs = [0.0] if p.eval_method == "zero-shot" else list(p.lrs)
        trials = np.repeat(np.arange(p.runs), len(lrs))
        traj_lrs = np.tile(np.asarray(lrs, dtype=np.float64), p.runs)
        if self.linear is not None or p.eval_method == "zero-shot":
            result = self._run_linear(tasks, classes, traj_lrs, trials)
        else:
            result = self._run_generic(tasks, classes, traj_lrs, trials)
        return result

    def _initial_values(self, tasks: Tasks, run: int, params: list[str],
                        layer_input: Callable[[], torch.Tensor] | None = None) -> dict[str, torch.Tensor]:
        """The run's starting values of `params`: the model's, with `reinit_params` re-initialised."""
        values = {n: self.named[n].detach().clone() for n in params}
        if not self.reinit:
            return values
        if self.protocol.reinit_method == "kaiming":
            generator = torch_generator(self.seed, "meta-eval-reinit", self.split, tasks.class_ids.shape[1], run)
            fresh = kaiming_reinit({n: self.named[n] for n in self.reinit}, generator)
        else:
            name, layer = lstsq_layer(self.model, self.protocol.reinit_params)
            support = self._init_support(tasks, run)
            features = layer_input()[support] if layer_input else \
                layer_inputs(self.model, layer, self.model, self.images[support])
            labels = tasks.class_ids[run][torch.div(self._support_position(tasks, run, support),
                                                     self.protocol.train_examples, rounding_mode="floor")]
            weight, bias = lstsq_fit(features, labels.to(features.device), layer.out_features)
            fresh = {f"{name}.weight": weight}
            if layer.bias is not None:
                fresh[f"{name}.bias"] = bias
        values.update({n: v for n, v in fresh.items() if n in values})
        self._reinit_frozen = {n: v for n, v in fresh.items() if n not in values}
        return values

    def _init_support(self, tasks: Tasks, run: int) -> torch.Tensor:
        """Flat image indices of the lstsq support sample: one per class, or `init_size` random ones (at most all)."""
        train = tasks.train[run]
        if self.protocol.init_size is None:
            return train[::self.protocol.train_examples]
        generator = torch_generator(self.seed, "meta-eval-init-support", self.split, tasks.class_ids.shape[1], run)
        return train[torch.randperm(len(train), generator=generator)[:self.protocol.init_size]]

    @staticmethod
    def _support_position(tasks: Tasks, run: int, support: torch.Tensor) -> torch.Tensor:
        """Positions of support images in the run's learning order (to recover their labels)."""
        position = {int(i): k for k, i in enumerate(tasks.train[run].tolist())}
        return torch.tensor([position[int(i)] for i in support.tolist()])

    def _chunk(self, per_trajectory_bytes: int, total: int) -> int:
        return max(1, min(total, int(self.protocol.memory_gb * 2**30 // max(per_trajectory_bytes, 1))))

    # ----------------------------------------------------------------------- linear head
    def _run_linear(self, tasks: Tasks, classes: int, lrs: np.ndarray, trials: np.ndarray) -> SweepResult:
        """Stacked Adam on one linear layer over frozen features (also serves zero-shot)."""
        p = self.protocol
        if self.linear is None:  # zero-shot on a head whose last layer is fitted by least squares
            name, layer = lstsq_layer(self.model, p.reinit_params)
            self.linear = (name, layer)
            self._features = None
        name, layer = self.linear
        feats = self.features(torch.cat([tasks.train.flatten(), tasks.test.flatten()]))
        has_bias = layer.bias is not None
        table = torch.cat([feats, feats.new_ones(len(feats), 1)], 1) if has_bias else feats
        keys = [f"{name}.weight"] + ([f"{name}.bias"] if has_bias else [])
        starts = []
        for run in range(p.runs):
            values = self._initial_values(tasks, run, keys, layer_input=lambda: feats)
            weight = values[keys[0]]
            starts.append(torch.cat([weight, values[keys[1]].unsqueeze(1)], 1) if has_bias else weight)
        start = torch.stack(starts)  # (runs, out, D)
        per_lr = len(lrs) // p.runs
        points = eval_points(classes, p.eval_freq) if p.eval_method == "sequential" else [classes]
        shape = (len(points), len(lrs), classes)
        acc = {k: np.zeros(shape, dtype=np.float32) for k in ("train", "test", "train5", "test5")}
        labels = tasks.class_ids.to(self.device)
        chunk = self._chunk(6 * start[0].numel() * 4, len(lrs))
        if p.trajectory_group:
            chunk = min(chunk, p.trajectory_group)
        bar = progress(total=len(lrs) * classes * p.train_examples, desc=f"{self.split} {classes} classes",
                       quiet=self.quiet or p.eval_method == "zero-shot", unit="step")
        for lo in range(0, len(lrs), chunk):
            index = torch.arange(lo, min(lo + chunk, len(lrs)))
            runs = index // per_lr
            weight = start[runs].clone()
            record = lambda e, w=weight, r=runs, i=index: self._record_linear(acc, e, i, w, table, tasks, r, labels)
            if p.eval_method == "sequential":
                self._sequential_linear(weight, table, tasks, runs, labels, lrs[index.numpy()], classes,
                                        points, record, bar)
            elif p.eval_method == "iid":
                self._iid_linear(weight, table, tasks, runs, labels, lrs[index.numpy()], classes, bar)
                record(0)
            else:
                record(0)
            if self.keep_weights:
                self.final_weights.extend(w.flatten() if not has_bias else
                                          torch.cat([w[:, :-1].flatten(), w[:, -1]]) for w in weight)
        bar.close()
        return SweepResult(lrs, trials, points, acc["train"], acc["test"], acc["train5"], acc["test5"])

    def _sequential_linear(self, weight, table, tasks, runs, labels, lrs, classes, points, record, bar) -> None:
        p = self.protocol
        exp_avg, exp_avg_sq = torch.zeros_like(weight), torch.zeros_like(weight)
        order = tasks.train[runs].to(self.device)  # (T, steps)
        targets = labels[runs].repeat_interleave(p.train_examples, dim=1)
        lrs_t = torch.as_tensor(lrs, dtype=torch.float64)
        logits = torch.bmm(weight, table[order[:, 0]].unsqueeze(2)).squeeze(2)
        steps = classes * p.train_examples
        for step in range(steps):
            neg_step, bc2_sqrt = step_scalars(lrs_t, step + 1, (0.9, 0.999))
            x_next = table[order[:, step + 1]] if step + 1 < steps else table[order[:, 0]]
            logits = self._fused(weight, exp_avg, exp_avg_sq, logits, table[order[:, step]], targets[:, step],
                                 x_next, neg_step.to(self.device), torch.tensor(bc2_sqrt, dtype=torch.float64))
            bar.update(len(lrs))
            if (step + 1) % p.train_examples == 0 and (step + 1) // p.train_examples in points:
                record(points.index((step + 1) // p.train_examples))

    def _iid_linear(self, weight, table, tasks, runs, labels, lrs, classes, bar) -> None:
        """The oracle: shuffled minibatches (mean cross-entropy) through stacked Adam."""
        p = self.protocol
        optimiser = StackedAdam({"weight": weight}, lrs)
        support = tasks.train[runs].to(self.device)
        targets = labels[runs].repeat_interleave(p.train_examples, dim=1)
        n = support.shape[1]
        for epoch in range(p.epochs):
            order = torch.stack([torch.randperm(n, generator=torch_generator(
                self.seed, "meta-eval-iid", self.split, classes, int(r), epoch)) for r in runs]).to(self.device)
            for lo in range(0, n, p.batch_size):
                pick = order[:, lo:lo + p.batch_size]
                x = table[torch.gather(support, 1, pick)]  # (T, B, D)
                y = torch.gather(targets, 1, pick)
                logits = torch.bmm(x, weight.transpose(1, 2))
                g = logits.log_softmax(2).exp() - F.one_hot(y, logits.shape[2]).to(logits.dtype)
                optimiser.step({"weight": torch.bmm((g / pick.shape[1]).transpose(1, 2), x)})
                bar.update(len(lrs) * pick.shape[1])

    @torch.no_grad()
    def _record_linear(self, acc, e, index, weight, table, tasks, runs, labels) -> None:
        for kind, images, per in (("train", tasks.train, self.protocol.train_examples),
                                  ("test", tasks.test, self.protocol.test_examples)):
            idx = images[runs].to(self.device)
            target = labels[runs].repeat_interleave(per, dim=1)
            top1, top5 = [], []
            step = max(1, 2**25 // (len(index) * max(weight.shape[1], table.shape[1])))
            for lo in range(0, idx.shape[1], step):
                logits = torch.bmm(table[idx[:, lo:lo + step]], weight.transpose(1, 2))
                top1.append(logits.argmax(2) == target[:, lo:lo + step])
                k = min(5, logits.shape[2])
                top5.append((logits.topk(k, 2).indices == target[:, lo:lo + step, None]).any(2))
            for suffix, hits in (("", top1), ("5", top5)):
                per_class = torch.cat(hits, 1).view(len(index), -1, per).float().mean(2)
                acc[kind + suffix][e, index.numpy()] = per_class.cpu().numpy()

    # ---------------------------------------------------------------------- generic (vmap)
    def _run_generic(self, tasks: Tasks, classes: int, lrs: np.ndarray, trials: np.ndarray) -> SweepResult:
        """Any trainable set: per-trajectory functional models under torch.func.vmap."""
        p = self.protocol
        stage = "head" if self.frozen_encoder else "logits"
        needed = torch.cat([tasks.train.flatten(), tasks.test.flatten()])
        inputs = self.features(needed) if self.frozen_encoder else self.images
        wrapper = _Stage(self.model, stage)
        starts, frozen_reinit = [], []
        for run in range(p.runs):
            starts.append(self._initial_values(tasks, run, self.trainable))
            frozen_reinit.append(dict(getattr(self, "_reinit_frozen", {})))
        if any(frozen_reinit):
            raise ConfigError(f"reinit_params {self.protocol.reinit_params} re-initialise parameters that do not "
                              f"learn ({', '.join(frozen_reinit[0])}); add them to opt_params")
        frozen = {f"model.{n}": v for n, v in self.named.items() if n not in self.trainable}

        def logits_of(params, x):
            return functional_call(wrapper, {**frozen, **{f"model.{n}": v for n, v in params.items()}}, (x,))

        def loss(params, x, y):
            return F.cross_entropy(logits_of(params, x), y)

        grads_of = vmap(grad(loss))
        logits_many = vmap(logits_of)
        per_lr = len(lrs) // p.runs
        points = eval_points(classes, p.eval_freq) if p.eval_method == "sequential" else [classes]
        shape = (len(points), len(lrs), classes)
        acc = {k: np.zeros(shape, dtype=np.float32) for k in ("train", "test", "train5", "test5")}
        labels = tasks.class_ids.to(self.device)
        size = sum(v.numel() for v in starts[0].values()) * 4
        chunk = self._chunk(6 * size + inputs[0].numel() * 4 * 64, len(lrs))
        bar = progress(total=len(lrs) * classes * p.train_examples * (p.epochs if p.eval_method == "iid" else 1),
                       desc=f"{self.split} {classes} classes", quiet=self.quiet, unit="step")
        for lo in range(0, len(lrs), chunk):
            index = torch.arange(lo, min(lo + chunk, len(lrs)))
            runs = index // per_lr
            params = {n: torch.stack([starts[int(r)][n] for r in runs]) for n in self.trainable}
            optimiser = StackedAdam(params, lrs[index.numpy()])
            support = tasks.train[runs].to(self.device)
            targets = labels[runs].repeat_interleave(p.train_examples, dim=1)

            def record(e):
                self._record_generic(acc, e, index, params, logits_many, inputs, tasks, runs, labels)

            if p.eval_method == "sequential":
                for step in range(classes * p.train_examples):
                    x = inputs[support[:, step]].unsqueeze(1)
                    optimiser.step(grads_of(params, x, targets[:, step:step + 1]))
                    bar.update(len(index))
                    done = (step + 1) // p.train_examples
                    if (step + 1) % p.train_examples == 0 and done in points:
                        record(points.index(done))
            else:
                n = support.shape[1]
                for epoch in range(p.epochs):
                    order = torch.stack([torch.randperm(n, generator=torch_generator(
                        self.seed, "meta-eval-iid", self.split, classes, int(r), epoch)) for r in runs])
                    order = order.to(self.device)
                    for start in range(0, n, p.batch_size):
                        pick = order[:, start:start + p.batch_size]
                        optimiser.step(grads_of(params, inputs[torch.gather(support, 1, pick)],
                                                torch.gather(targets, 1, pick)))
                        bar.update(len(index) * pick.shape[1])
                record(0)
            if self.keep_weights:
                self.final_weights.extend(torch.cat([params[n][t].flatten() for n in self.trainable])
                                          for t in range(len(index)))
        bar.close()
        return SweepResult(lrs, trials, points, acc["train"], acc["test"], acc["train5"], acc["test5"])

    @torch.no_grad()
    def _record_generic(self, acc, e, index, params, logits_many, inputs, tasks, runs, labels) -> None:
        for kind, images, per in (("train", tasks.train, self.protocol.train_examples),
                                  ("test", tasks.test, self.protocol.test_examples)):
            idx = images[runs].to(self.device)
            target = labels[runs].repeat_interleave(per, dim=1)
            top1, top5 = [], []
            for lo in range(0, idx.shape[1], 256):
                logits = logits_many(params, inputs[idx[:, lo:lo + 256]])
                top1.append(logits.argmax(2) == target[:, lo:lo + 256])
                k = min(5, logits.shape[2])
                top5.append((logits.topk(k, 2).indices == target[:, lo:lo + 256, None]).any(2))
            for suffix, hits in (("", top1), ("5", top5)):
                per_class = torch.cat(hits, 1).view(len(index), -1, per).float().mean(2)
                acc[kind + suffix][e, index.numpy()] = per_class.cpu().numpy()


class _Stage(nn.Module):
    """The model's head (on features) or whole forward pass (on images), for functional_call."""

    def __init__(self, model: nn.Module, stage: str):
        super().__init__()
        self.model, self.stage = model, stage

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model.head(x) if self.stage == "head" else self.model(x)


def reference_trajectory(model: nn.Module, images: torch.Tensor, tasks: Tasks, run: int, lr: float,
                         protocol: ProtocolConfig, seed: int, split: str = "test") -> list[torch.Tensor]:
    """One trajectory the reference's way: a real model, torch.optim.Adam, one forward pass per step.

    Used to check the batched sweep; returns the trainable parameters after every class.
    """
    import copy
    sweep = Sweep(model, images, protocol, seed, split)
    net = copy.deepcopy(model).eval()
    start = sweep._initial_values(tasks, run, sweep.trainable)
    with torch.no_grad():
        for name, p in net.named_parameters():
            if name in start:
                p.copy_(start[name])
    for p in net.parameters():
        p.requires_grad_(False)
    trainable = [p for n, p in net.named_parameters() if n in sweep.trainable]
    for p in trainable:
        p.requires_grad_(True)
    optimiser = torch.optim.Adam(net.parameters(), lr=lr)
    flat = images.flatten(0, 1)
    labels = tasks.class_ids[run].repeat_interleave(protocol.train_examples)
    snapshots = []
    for step, index in enumerate(tasks.train[run].tolist()):
        loss = F.cross_entropy(net(flat[index:index + 1]), labels[step:step + 1].to(flat.device))
        optimiser.zero_grad()
        loss.backward()
        optimiser.step()
        if (step + 1) % protocol.train_examples == 0:
            snapshots.append(torch.cat([p.detach().flatten() for p in trainable]).clone())
    return snapshots
