"""`sequential_episodic`: the same episodes, first order (higherANML's seqep).

Plain SGD through the trajectory, then one Adam step on the meta batch at the weights SGD
reached. By default inner-loop gradients never reach the Adam step: each is returned by
autograd.grad and applied at once. The reference never cleared `.grad` between its sequential
and batch phases, so its Adam step followed the meta gradient plus the sum of the inner steps'
gradients; `inner_grads_in_outer` reproduces that.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..functional import inner_loop
from . import register_algorithm
from .episodic import EpisodeConfig, EpisodicAlgorithm


@dataclass
class SequentialEpisodicConfig(EpisodeConfig):
    inner_grads_in_outer: bool = False
    """Add the sum of the inner steps' gradients to the Adam step's gradient, as higherANML's
    seqep did by accumulating them in .grad (False: the meta-batch gradient alone)."""


@register_algorithm("sequential_episodic")
class SequentialEpisodic(EpisodicAlgorithm):
    Config = SequentialEpisodicConfig

    def outer_loss(self, episode):
        with torch.no_grad():
            shared = self.fmodel.prepare(self.params, episode.images)
        fast, stats = inner_loop(
            self.fmodel,
            self.params,
            self.inner_names,
            episode,
            self.config.inner_lr,
            self.config.train_cycles,
            False,
            shared,
        )
        with torch.no_grad():
            # SGD moved each inner parameter by -inner_lr times the sum of its inner gradients
            inner_sums = {n: (self.params[n] - fast[n]) / self.config.inner_lr for n in self.inner_names}
            for name in self.inner_names:
                self.params[name].copy_(fast[name])
        del fast
        loss, logits = self.meta_batch_loss(episode)
        if self.config.inner_grads_in_outer:
            # a term whose value is zero and whose gradient is the inner sum: the reported loss stays
            extra = sum((self.params[n] * s).sum() for n, s in inner_sums.items() if n in self.outer_names)
            loss = loss + extra - extra.detach()
        return loss, logits, stats
