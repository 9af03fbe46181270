"""Test-only references for the meta-test: one trajectory trained the reference's way.

`reference_trajectory` trains a real copy of the model with torch.optim.Adam, one forward pass
per image, from the starting values `LRSweep` gives the run: the batched engines must end at the
same weights (`LRSweep.run(..., return_weights=True)`) to float32 rounding.
"""

from __future__ import annotations

import copy

import torch
import torch.nn.functional as F
from torch import nn

from metacl.meta.eval.protocol import ProtocolConfig, Tasks
from metacl.meta.eval.sweep import LRSweep


def reference_trajectory(
    model: nn.Module,
    images: torch.Tensor,
    tasks: Tasks,
    run: int,
    lr: float,
    protocol: ProtocolConfig,
    seed: int,
    split: str = "test",
) -> list[torch.Tensor]:
    """The trainable parameters, flattened in the model's order, after every class of run `run` at `lr`."""
    sweep = LRSweep(model, images, protocol, seed, split)
    net = copy.deepcopy(model).eval()
    start = sweep.initial_values(tasks, run)
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
        loss = F.cross_entropy(net(flat[index : index + 1]), labels[step : step + 1].to(flat.device))
        optimiser.zero_grad()
        loss.backward()
        optimiser.step()
        if (step + 1) % protocol.train_examples == 0:
            snapshots.append(torch.cat([p.detach().flatten() for p in trainable]).clone())
    return snapshots
