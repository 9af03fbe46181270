"""`sequential_episodic`: the same episodes, first order (higherANML's seqep).

Plain SGD through the trajectory, then one Adam step on the meta batch at the weights SGD
reached. Inner-loop gradients never reach the Adam step: each is returned by autograd.grad and
applied at once, never accumulated into .grad as in the reference.
"""

from __future__ import annotations

import torch

from ..functional import inner_loop
from . import register_algorithm
from .episodic import EpisodicAlgorithm


@register_algorithm("sequential_episodic")
class SequentialEpisodic(EpisodicAlgorithm):
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
            for name in self.inner_names:
                self.params[name].copy_(fast[name])
        del fast
        loss, logits = self.meta_batch_loss(episode)
        return loss, logits, stats
