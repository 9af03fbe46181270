"""What the episodic algorithms (`meta`, `sequential_episodic`) share: the episode config, the
sampler, zapping, the outer Adam step and its state. Each algorithm defines only how an episode
turns into the loss whose gradient the outer step follows (`outer_loss`)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Annotated, Any, Literal

import torch
import torch.nn.functional as F
from torch import nn

from ....core.config import NonEmpty, NonNegative, NonNegativeFloat, Positive, PositiveFloat
from ....core.optim import fused_adam
from ....models import select_parameters
from ..episodes import Episode, EpisodeSampler, SampleMethod
from ..functional import FunctionalModel, InnerStats, zap_rows
from . import Augment, apply_gradients, no_augment


@dataclass
class EpisodeConfig:
    episodes: Positive = 25000
    """Number of episodes."""
    sample_method: SampleMethod = "single"
    """single: every inner image from one random class; uniform: from random training images."""
    batch_size: Positive = 1
    """Images per inner-loop step."""
    num_batches: Positive = 20
    """Inner-loop steps per pass through the trajectory."""
    train_cycles: Positive = 1
    """Passes through the trajectory (inner steps = num_batches * train_cycles)."""
    remember_size: NonNegative = 64
    """Random training images added to the meta batch."""
    remember_only: bool = False
    """Leave the trajectory's images out of the meta batch."""
    inner_lr: PositiveFloat = 0.1
    """Inner-loop SGD learning rate."""
    outer_lr: PositiveFloat = 1e-3
    """Outer-loop Adam learning rate."""
    inner_params: Annotated[list[str], NonEmpty()] = field(default_factory=lambda: ["all"])
    """Parameter-name prefixes adapted in the inner loop (all = every parameter)."""
    outer_params: Annotated[list[str], NonEmpty()] = field(default_factory=lambda: ["all"])
    """Parameter-name prefixes the outer Adam step updates."""
    zap: bool = True
    """Re-initialise (kaiming-normal) output rows before each episode (which: zap_rows)."""
    zap_rows: Literal["episode", "one_random"] = "episode"
    """episode: every class of the inner trajectory (one class with sample_method single);
    one_random: one random training class, whatever the trajectory holds, as the reference did
    with sample_method uniform (with single both zap the trajectory's class)."""
    max_grad_norm: NonNegativeFloat = 0.0
    """Clip the outer gradient to this norm (0: no clipping)."""


class EpisodicAlgorithm:
    """One episode per `step`: zap, the algorithm's outer loss, Adam on the outer parameters."""

    Config = EpisodeConfig
    length_field = "episodes"  # each episode's draw comes from the sample stream, whatever the total

    def __init__(
        self,
        model: nn.Module,
        pool: torch.Tensor,
        config: EpisodeConfig,
        streams: dict[str, torch.Generator],
        augment: Augment = no_augment,
    ):
        self.model, self.config, self.streams, self.augment = model, config, streams, augment
        self.params = dict(model.named_parameters())
        self.inner_names = list(select_parameters(model, config.inner_params))
        self.outer_names = list(select_parameters(model, config.outer_params))
        self.outer = [self.params[n] for n in self.outer_names]
        self.fmodel = FunctionalModel(model, self.inner_names)
        self.optimizer = fused_adam(self.outer, config.outer_lr)
        self.sampler = EpisodeSampler(
            pool,
            streams["sample"],
            sample_method=config.sample_method,
            batch_size=config.batch_size,
            num_batches=config.num_batches,
            remember_size=config.remember_size,
            remember_only=config.remember_only,
        )
        self.steps = config.episodes
        self.trial_params, self.trial_lr = self.inner_names, config.inner_lr

    def outer_loss(self, episode: Episode) -> tuple[torch.Tensor, torch.Tensor, InnerStats]:
        """(loss whose gradient the Adam step follows, meta-batch logits, inner-loop stats)."""
        raise NotImplementedError

    def step(self, step: int) -> dict[str, float]:
        episode = self.sampler.sample()
        episode.images = self.augment(episode.images)
        return self.train_episode(episode)

    def train_episode(self, episode: Episode) -> dict[str, float]:
        if self.config.zap:
            rows = episode.inner_classes
            if self.config.zap_rows == "one_random":
                rows = torch.randint(self.sampler.num_classes, (1,), generator=self.streams["zap"])
            zap_rows(self.params["fc.weight"], rows, self.streams["zap"])
        loss, logits, stats = self.outer_loss(episode)
        grads = torch.autograd.grad(loss, self.outer, materialize_grads=True)
        norm = apply_gradients(self.outer, grads, self.config.max_grad_norm)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        acc = (logits.detach().argmax(1) == episode.labels[episode.meta_rows]).float().mean()
        meta_loss_value, meta_acc, grad_norm = torch.stack([loss.detach(), acc, norm]).tolist()
        return {**stats.summary(), "meta_loss": meta_loss_value, "meta_acc": meta_acc, "grad_norm": grad_norm}

    def meta_batch_loss(self, episode: Episode) -> tuple[torch.Tensor, torch.Tensor]:
        logits = self.model(episode.images[episode.meta_rows])
        return F.cross_entropy(logits, episode.labels[episode.meta_rows]), logits

    def state_dict(self) -> dict[str, Any]:
        return {"optimizer": self.optimizer.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        fused = [group["fused"] for group in self.optimizer.param_groups]
        self.optimizer.load_state_dict(state["optimizer"])
        for group, flag in zip(self.optimizer.param_groups, fused):  # a saved setting is the kernel, not the maths
            group["fused"] = flag
