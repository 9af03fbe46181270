"""higherANML's layers for the benchmarks' "reference as its users run it" (shared by the scripts)."""

from __future__ import annotations

import copy

import torch

from metacl.models.layers import InstanceNorm


def with_reference_layers(model: torch.nn.Module) -> torch.nn.Module:
    """A copy of `model` built from higherANML's layers: every [metacl Conv2d; metacl InstanceNorm;
    max-pool; ReLU] block becomes its [nn.Conv2d; nn.InstanceNorm2d(affine); ReLU; nn.MaxPool2d],
    the same weights under the same names. The same function (the check line compares the two
    designs), computed by the kernels the reference's users run."""
    model = copy.deepcopy(model)
    for block in [m for m in model.modules() if isinstance(m, torch.nn.Sequential)]:
        layers = list(block)
        if len(layers) < 3 or not isinstance(layers[1], InstanceNorm):
            continue
        conv = layers[0]
        native = torch.nn.Conv2d(
            conv.in_channels,
            conv.out_channels,
            conv.kernel_size,
            conv.stride,
            conv.padding,
            conv.dilation,
            conv.groups,
            conv.bias is not None,
            conv.padding_mode,
        )
        native.weight, native.bias = conv.weight, conv.bias
        norm = torch.nn.InstanceNorm2d(layers[1].num_features, eps=layers[1].eps, affine=True)
        norm.weight, norm.bias = layers[1].weight, layers[1].bias
        pools = [torch.nn.MaxPool2d(m.kernel_size) for m in layers[2:] if isinstance(m, torch.nn.MaxPool2d)]
        for index, layer in enumerate([native, norm, torch.nn.ReLU(), *pools]):
            block[index] = layer
    return model
