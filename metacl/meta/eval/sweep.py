"""`LRSweep`: a model's meta-test on one split, every (learning rate, run) trajectory at once.

Where only head parameters learn, the encoder is frozen: its features are computed once per
image and every trajectory trains on them. A single learning linear layer (ANML/OML last layer,
zero-shot's least-squares head) runs on `linear_engine.LinearEngine` (stacked matrices, fused
Adam), anything else on `vmap_engine.VmapEngine` (torch.func.vmap), except an encoder that
learns on CPU: `sequential_engine.SequentialEngine` steps its trajectories one by one, where
metacl's batch-1 kernels apply. All follow the protocol's one schedule (`schedule.Schedule`)
from the starting values of `reinit.Reinit`.
"""

from __future__ import annotations

import copy
from collections.abc import Callable

import torch
from torch import nn

from ...core.denormals import denormals_flushed
from ...core.errors import ConfigError
from ...core.progress import progress
from ...models import select_parameters
from .adam import FusedLinearStep
from .linear_engine import LinearEngine
from .protocol import (
    MetaTestResult,
    ProtocolConfig,
    Tasks,
    check_protocol,
    draw_tasks,
    eval_points,
    nested_draws,
    nested_groups,
)
from .reinit import Reinit, layer_inputs, lstsq_layer
from .schedule import KINDS, Schedule, no_accuracies
from .sequential_engine import SequentialEngine
from .trajectories import Trajectories
from .vmap_engine import VmapEngine

FEATURE_BLOCK = 64
"""Images encoded per batch when computing frozen features (aligned blocks; see LRSweep.features)."""


class LRSweep:
    """Runs one protocol on one dataset split for a model, reusing frozen features across class counts."""

    sequential_devices = ("cpu",)
    """Devices on which a learning encoder's trajectories step one by one (`SequentialEngine`):
    on CPU, metacl's batch-1 kernels beat vmap's batched ones (other devices are not measured)."""

    def __init__(
        self,
        model: nn.Module,
        images: torch.Tensor,
        protocol: ProtocolConfig,
        seed: int,
        split: str = "test",
        quiet: bool = True,
        log: Callable[[str], None] | None = None,
    ):
        """`images` is the split's (C, K, channels, H, W) tensor; the model is deep-copied, never changed."""
        check_protocol(protocol, images.shape[1])
        self.model = copy.deepcopy(model).eval()
        for p in self.model.parameters():
            p.requires_grad_(False)
        self.num_classes, self.per_class = images.shape[:2]
        self.images = images.flatten(0, 1)
        self.protocol, self.seed, self.split, self.quiet = protocol, seed, split, quiet
        self.device = self.images.device
        self.trainable = (
            list(select_parameters(self.model, protocol.opt_params)) if protocol.eval_method != "zero-shot" else []
        )
        """Names of the parameters that learn (none for zero-shot)."""
        reinit = list(select_parameters(self.model, protocol.reinit_params)) if protocol.reinit_params else []
        self.reinit = Reinit(self.model, reinit, protocol, seed, split)
        outputs = self._output_size()
        if self.num_classes > outputs:
            raise ConfigError(
                f"labels are the split's class indices (as in the reference), but the model has "
                f"{outputs} outputs for {self.num_classes} classes; use a model with at least "
                f"{self.num_classes} outputs"
            )
        self.frozen_encoder = not (set(self.trainable) & self._encoder_parameters())
        self.linear_head = self._linear_head()
        """(name, layer) of the one linear layer that learns (or, zero-shot, is fitted), else None."""
        if self.linear_head is not None:
            self.engine_name = "linear"
        elif not self.frozen_encoder and self.device.type in self.sequential_devices:
            self.engine_name = "sequential"
        else:
            self.engine_name = "vmap"
        """Which engine trains the trajectories: linear (stacked fused Adam), vmap or sequential."""
        self.linear_step = FusedLinearStep(protocol.compile and self.device.type in ("cpu", "cuda"), log)
        """The linear engine's Adam step, compiled at its first use and kept for every class count."""
        self._features: torch.Tensor | None = None
        self._computed: torch.Tensor | None = None

    def trajectories(self, lrs: list[float] | None = None) -> Trajectories:
        """Every run at each of `lrs` (default: the protocol's learning rates)."""
        return Trajectories.grid(self.protocol.learning_rates() if lrs is None else lrs, self.protocol.runs)

    # ---------------------------------------------------------------------------- running
    def run(
        self, classes: int, trajectories: Trajectories | None = None, *, return_weights: bool = False
    ) -> MetaTestResult:
        """Meta-test `trajectories` (default: every LR x run) on their own draw of `classes` classes.

        The class draws, splits and starting values depend only on the run, so a trajectory's
        result does not depend on which others run beside it (to float32 rounding: batched
        matrix products may sum in another order for another batch size).
        """
        return self.run_group([classes], trajectories, return_weights=return_weights)[classes]

    def groups(self, counts: list[int], lrs: dict[int, float] | None = None) -> list[tuple[list[int], Trajectories]]:
        """How `counts` are meta-tested, at every LR x run or, with `lrs`, each count at its LR:
        (counts, trajectories) per `run_group` call. Nested draws (`protocol.class_draws`) put the
        counts that share an LR in one group; independent draws give each count its own."""
        if nested_draws(self.protocol):
            return [(group, self.trajectories(lr)) for group, lr in nested_groups(counts, lrs)]
        return [([c], self.trajectories(None if lrs is None else [lrs[c]])) for c in counts]

    def run_counts(self, counts: list[int], lrs: dict[int, float] | None = None) -> dict[int, MetaTestResult]:
        """{class count: result} for every count (see `groups`)."""
        results = {}
        for group, trajectories in self.groups(counts, lrs):
            results.update(self.run_group(group, trajectories))
        return results

    def run_group(
        self, counts: list[int], trajectories: Trajectories | None = None, *, return_weights: bool = False
    ) -> dict[int, MetaTestResult]:
        """Meta-test `trajectories` (default: every LR x run) on `counts`: each run draws the largest
        count's classes and learns them once, measured on its first c classes after learning them
        for every count c (a single count: its own sweep)."""
        p = self.protocol
        trajectories = self.trajectories() if trajectories is None else trajectories
        if trajectories.count == 0 or trajectories.run.min() < 0 or trajectories.run.max() >= p.runs:
            raise ValueError(f"trajectories must name runs 0..{p.runs - 1}, got {sorted(set(trajectories.run))}")
        top = max(counts)
        tasks = draw_tasks(
            self.num_classes, self.per_class, top, p.train_examples, p.test_examples, p.runs, self.seed, self.split
        )
        schedule = Schedule.of(p, tasks, self.seed, self.split, counts)
        engine, params, layer_input = self._engine(tasks)
        starts = {run: self.reinit.start(tasks, run, params, layer_input) for run in trajectories.runs}
        accuracies = no_accuracies(len(schedule.points), trajectories.count, top)
        weights = []
        bar = progress(
            total=trajectories.count * schedule.examples_seen,
            desc=f"{self.split} {', '.join(map(str, counts))} classes",
            quiet=self.quiet or not schedule.examples_seen,
            unit="step",
        )
        with denormals_flushed(self.device):  # saturated softmaxes make denormal Adam moments, slow on CPUs
            for where, group in trajectories.groups(engine.group_size(trajectories.count)):
                measured, learned = engine.run(group, tasks, schedule, starts, bar.update)
                for kind, values in measured.items():
                    accuracies[kind][:, where] = values
                if return_weights:
                    weights.append(engine.flatten(learned))
        bar.close()
        results = {}
        for classes in counts:
            serves = eval_points(classes, p.eval_freq) if len(counts) > 1 else schedule.points
            at = [schedule.points.index(q) for q in serves]
            kinds = [accuracies[kind][at][:, :, :classes] for kind in KINDS]
            final_weights = torch.cat(weights) if return_weights and classes == top else None
            results[classes] = MetaTestResult(trajectories, [schedule.points[i] for i in at], *kinds, final_weights)
        return results

    def initial_values(self, tasks: Tasks, run: int) -> dict[str, torch.Tensor]:
        """Run `run`'s starting values of the parameters that learn (the model's, re-initialised)."""
        return self.reinit.start(tasks, run, *self._engine(tasks)[1:])

    def _engine(
        self, tasks: Tasks
    ) -> tuple[LinearEngine | VmapEngine, list[str], Callable[[nn.Module, torch.Tensor], torch.Tensor]]:
        """The engine for these tasks, the parameters it trains, and how to get a layer's inputs for images."""
        needed = torch.cat([tasks.train.flatten(), tasks.test.flatten()])
        if self.linear_head is not None:
            features = self.features(needed)
            engine = LinearEngine(*self.linear_head, features, self.protocol, self.linear_step)
            return engine, engine.keys, lambda _layer, images: features[images]
        inputs = self.features(needed) if self.frozen_encoder else self.images
        kind = SequentialEngine if self.engine_name == "sequential" else VmapEngine
        engine = kind(self.model, self.trainable, inputs, self.frozen_encoder, self.protocol)
        return (
            engine,
            self.trainable,
            lambda layer, images: layer_inputs(self.model, layer, self.model, self.images[images]),
        )

    # ---------------------------------------------------------------------------- features
    def features(self, needed: torch.Tensor | None = None) -> torch.Tensor:
        """Frozen inputs of the learning part per image (the linear head's input, or encode(x)).

        Computed on demand, once, in fixed blocks of consecutive images: only the blocks holding
        `needed` images (all when None) are encoded, so a small sweep on a large split is quick,
        and an image's features never depend on which sweep asked first (exact resumes).
        """
        block = FEATURE_BLOCK
        wanted = torch.arange(len(self.images)) if needed is None else needed.cpu()
        blocks = torch.unique(wanted // block)
        if self._computed is not None:
            blocks = blocks[~self._computed[blocks]]
        for b in blocks.tolist():
            images = self.images[b * block : (b + 1) * block]
            if self.linear_head is not None:
                rows = layer_inputs(self.model, self.linear_head[1], self.model, images)
            else:
                with torch.no_grad():
                    rows = self.model.encode(images)
            if self._features is None:
                self._features = rows.new_zeros(len(self.images), rows.shape[1])
                self._computed = torch.zeros(-(-len(self.images) // block), dtype=torch.bool)
            self._features[b * block : (b + 1) * block] = rows
            self._computed[b] = True
        return self._features

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

    def _linear_head(self) -> tuple[str, nn.Linear] | None:
        """(name, layer) when the learning part is one linear layer that produces the output."""
        if self.protocol.eval_method == "zero-shot":  # the least-squares layer is the whole head
            name, layer = lstsq_layer(self.model, self.protocol.reinit_params)
            if not self._produces_output(layer):
                raise ConfigError(
                    f"zero-shot fits {name!r} by least squares and reads its outputs as the logits, "
                    f"but the model's output is not {name}'s; set reinit_params to the output layer"
                )
            return name, layer
        if not self.frozen_encoder or not self.trainable:
            return None
        modules = dict(self.model.named_modules())
        prefix = self.trainable[0].rsplit(".", 1)[0]
        layer = modules.get(prefix)
        own = {f"{prefix}.{n}" for n, _ in layer.named_parameters()} if isinstance(layer, nn.Linear) else set()
        if not own or set(self.trainable) != own or not set(self.reinit.reinit) <= own:
            return None
        return (prefix, layer) if self._produces_output(layer) else None

    def _produces_output(self, layer: nn.Linear) -> bool:
        inputs = layer_inputs(self.model, layer, self.model, self.images[:4])
        with torch.no_grad():
            return torch.allclose(layer(inputs), self.model(self.images[:4]), atol=1e-5)
