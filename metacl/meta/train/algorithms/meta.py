"""`meta`: ANML / OML meta-training (Beaulieu et al. 2020; Javed & White 2019).

The Adam step follows the gradient of the meta-loss through the whole inner loop (second order,
`create_graph=True`), taken at the pre-episode weights.
"""

from __future__ import annotations

from ..functional import meta_loss
from . import register_algorithm
from .episodic import EpisodicAlgorithm


@register_algorithm("meta")
class Meta(EpisodicAlgorithm):
    def outer_loss(self, episode):
        return meta_loss(
            self.fmodel,
            self.params,
            self.inner_names,
            episode,
            self.config.inner_lr,
            self.config.train_cycles,
            create_graph=True,
        )
