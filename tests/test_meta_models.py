"""Meta models: shapes, parameter counts, the encode/head contract, initialisation, checkpoints."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from metacl.core.errors import ConfigError
from metacl.models import build_model, load_model, model_spec, save_model, select_parameters
from metacl.models.convnet import conv_block
from metacl.models.layers import Conv2d, InstanceNorm, MaxPool2d, _InstanceNorm, _InstanceNormBackward


def count(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


@pytest.mark.parametrize(
    "spec, expected",
    [
        ({"name": "anml"}, 3_977_416),  # higherANML refactor: 112-d mask input
        ({"name": "anml", "nm_pool_output": False}, 6_041_800),  # original ANML: 1008-d mask input
        ({"name": "sanml"}, 3_489_256),
        ({"name": "oml"}, 6_338_280),
        ({"name": "resnet18", "in_channels": 3, "stem": "imagenet"}, 11_689_512),  # torchvision's
    ],
)
def test_parameter_counts(spec, expected):
    assert count(build_model(spec)) == expected


def test_anml_shapes_prefixes_and_mask():
    torch.manual_seed(0)
    model = build_model({"name": "anml"})
    x = torch.rand(2, 1, 28, 28)
    assert {n.split(".")[0] for n, _ in model.named_parameters()} == {"rln", "nm", "fc"}
    features, mask = model.rln(x).flatten(1), model(x, stage="mask")
    assert features.shape == mask.shape == (2, 2304)
    assert ((mask > 0) & (mask < 1)).all()
    z = model.encode(x)
    assert torch.allclose(z, features * mask)
    assert torch.allclose(model(x), model.head(z)) and model(x).shape == (2, 1000)
    assert torch.allclose(model(x, mask=mask), model(x))
    assert isinstance(model.fc, nn.Linear) and model.fc.in_features == 2304
    assert model.nm[2].in_features == 112
    assert build_model({"name": "anml", "nm_pool_output": False}).nm[2].in_features == 1008


def test_oml_shapes_head_and_initialisation():
    torch.manual_seed(0)
    model = build_model({"name": "oml", "num_classes": 10})
    x = torch.rand(2, 1, 84, 84)
    z = model.encode(x)
    assert z.shape == (2, 2304)
    assert torch.allclose(model(x), model.fc(torch.relu(model.fc1(z))))
    assert (model.fc1.in_features, model.fc1.out_features, model.fc.out_features) == (2304, 1024, 10)
    expected_std = (2 / 2304) ** 0.5  # 256 -> 256 conv, fan-in 2304: kaiming-normal
    assert abs(model.encoder[2].weight.std().item() - expected_std) < 0.02 * expected_std
    # as the reference: conv biases and both linear layers keep PyTorch's default (uniform in
    # +-1/sqrt(fan_in), std 1/sqrt(3 fan_in)), not kaiming-normal with zero biases
    for layer, fan_in in ((model.encoder[2], 2304), (model.fc1, 2304), (model.fc, 1024)):
        bound = fan_in**-0.5
        assert layer.bias.abs().max() <= bound and layer.bias.abs().max() > 0.5 * bound
    for layer, fan_in in ((model.fc1, 2304), (model.fc, 1024)):
        assert layer.weight.abs().max() <= fan_in**-0.5
        assert abs(layer.weight.std().item() - (3 * fan_in) ** -0.5) < 0.05 * (3 * fan_in) ** -0.5


@pytest.mark.parametrize(
    "spec, dim",
    [
        ({"name": "sanml"}, 2304),
        ({"name": "convnet", "num_blocks": 3, "num_filters": [8, 8, 16], "norm": "gn"}, 16 * 3 * 3),
        (
            {
                "name": "convnet",
                "num_blocks": 2,
                "num_filters": 8,
                "norm": "in",
                "pool": [2, 0],
                "padding": 0,
                "head": "mlp",
                "hidden": [32, 16],
            },
            8 * 11 * 11,
        ),
        (
            {
                "name": "convnet",
                "num_blocks": 2,
                "num_filters": 8,
                "norm": None,
                "stride": [2, 1],
                "pool": None,
                "head": "cosine",
            },
            8 * 14 * 14,
        ),
        ({"name": "resnet18", "width": 8}, 64),
    ],
)
def test_forward_is_head_of_encode(spec, dim):
    torch.manual_seed(0)
    model = build_model({**spec, "num_classes": 7}).eval()
    x = torch.rand(3, 1, 28, 28)
    z = model.encode(x)
    assert z.shape == (3, dim)
    assert torch.allclose(model(x), model.head(z), atol=1e-6) and model(x).shape == (3, 7)
    assert isinstance(model.fc, nn.Linear) and "fc.weight" in dict(model.named_parameters())


def test_cosine_head_is_a_scaled_cosine():
    torch.manual_seed(0)
    model = build_model(
        {
            "name": "convnet",
            "num_blocks": 1,
            "num_filters": 4,
            "head": "cosine",
            "cosine_scale": 5.0,
            "num_classes": 3,
            "image_size": 8,
        }
    )
    logits = model(torch.rand(4, 1, 8, 8))
    assert logits.abs().max() <= 5.0 + 1e-5
    assert "fc.bias" not in dict(model.named_parameters())


def test_instance_norm_matches_torch():
    norm = InstanceNorm(6, affine=True)
    with torch.no_grad():
        norm.weight.uniform_(0.5, 2)
        norm.bias.uniform_(-1, 1)
    reference = nn.InstanceNorm2d(6, affine=True)
    reference.load_state_dict(norm.state_dict())
    x = torch.randn(3, 6, 9, 9)
    assert torch.allclose(norm(x), reference(x), atol=1e-5)


@pytest.mark.parametrize("shape", [(1, 5, 6, 6), (3, 4, 3, 3), (2, 3, 5, 4)])
def test_instance_norm_derivatives_to_the_third_order(shape):
    """The written-out second derivative (`_InstanceNormBackward`) against nn.InstanceNorm2d's and
    against finite differences (float64), including the third order and channels-last inputs."""
    generator = torch.Generator().manual_seed(3)
    channels = shape[1]
    ours = InstanceNorm(channels, affine=True).double()
    with torch.no_grad():
        ours.weight.copy_(torch.randn(channels, generator=generator, dtype=torch.float64))  # negative too
        ours.bias.copy_(torch.randn(channels, generator=generator, dtype=torch.float64))
    reference = nn.InstanceNorm2d(channels, affine=True).double()
    reference.load_state_dict(ours.state_dict())
    x = torch.randn(shape, generator=generator, dtype=torch.float64)
    for layout in (x, x.contiguous(memory_format=torch.channels_last)):
        for a, b in zip(first_and_second_derivatives(ours, layout), first_and_second_derivatives(reference, layout)):
            assert torch.allclose(a, b, rtol=1e-10, atol=1e-12)
    x.requires_grad_()
    weight, bias = (torch.randn(channels, generator=generator, dtype=torch.float64, requires_grad=True) for _ in "wb")

    def norm(x, weight, bias):
        return _InstanceNorm.apply(x, weight, bias, 1e-5)

    assert torch.autograd.gradcheck(norm, (x, weight, bias))
    assert torch.autograd.gradgradcheck(norm, (x, weight, bias))
    # the backward map's own second derivative (the third order of the norm); its statistics
    # follow x, as they do when the norm computes them
    grad = torch.randn(shape, generator=generator, dtype=torch.float64, requires_grad=True)

    def backward_map(grad, x, weight):
        n, c = x.shape[:2]
        _, mean, rstd = torch.native_group_norm(x.detach(), None, None, n, c, x[0, 0].numel(), c, 1e-5)
        return _InstanceNormBackward.apply(grad, x, weight, mean, rstd, 1e-5)

    assert torch.autograd.gradgradcheck(backward_map, (grad, x, weight))


def first_and_second_derivatives(layer, x: torch.Tensor, seed: int = 0):
    """The layer's output, its gradient at x for a random upstream, and the gradients of a random
    function of that gradient with respect to x and the upstream (a double backward)."""
    generator = torch.Generator().manual_seed(seed)
    x = x.detach().clone().requires_grad_()
    out = layer(x)
    upstream = torch.randn(out.shape, generator=generator, dtype=x.dtype).requires_grad_()
    (grad,) = torch.autograd.grad(out, x, upstream, create_graph=True)
    probe = torch.randn(grad.shape, generator=generator, dtype=x.dtype)
    second = torch.autograd.grad((grad * probe).sum() + (grad * x).sum(), [x, upstream], allow_unused=True)
    return [out, grad, *(torch.zeros(()) if g is None else g for g in second)]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("shape", [(2, 3, 26, 26), (1, 4, 11, 11), (3, 2, 5, 5)])
def test_gathering_max_pool_is_the_native_pool_to_the_bit_ties_included(shape, dtype):
    """Values, gradients and second derivatives bitwise equal to nn.MaxPool2d's, on random inputs
    and on inputs of three levels (most windows tie: the first maximum must win, as natively)."""
    generator = torch.Generator().manual_seed(1)
    for x in (torch.randn(shape, generator=generator), torch.randint(0, 3, shape, generator=generator)):
        x = x.to(dtype)
        assert MaxPool2d(2)._gathers(x)  # the gathering path, not a fallback
        ours = first_and_second_derivatives(MaxPool2d(2), x)
        native = first_and_second_derivatives(nn.MaxPool2d(2), x)
        for a, b in zip(ours, native):
            assert torch.equal(a, b)


def test_gathering_max_pool_under_vmap_and_other_windows():
    x = torch.randint(0, 3, (4, 2, 3, 11, 11), generator=torch.Generator().manual_seed(2)).double()

    def loss(pool):
        return lambda x: (pool(x) ** 2).sum()

    ours = torch.func.vmap(torch.func.grad(loss(MaxPool2d(2))))(x)
    assert torch.equal(ours, torch.func.vmap(torch.func.grad(loss(nn.MaxPool2d(2))))(x))
    for settings in ({"kernel_size": 3, "stride": 1}, {"kernel_size": 2, "padding": 1}, {"kernel_size": 3}):
        assert torch.equal(MaxPool2d(**settings)(x[0]), nn.MaxPool2d(**settings)(x[0]))


@pytest.mark.parametrize(
    "settings",
    [
        {"in_channels": 1, "out_channels": 5, "kernel_size": 3},
        {"in_channels": 4, "out_channels": 6, "kernel_size": 3, "bias": False},
        {"in_channels": 3, "out_channels": 2, "kernel_size": 3, "stride": 2, "padding": 1},
        {"in_channels": 2, "out_channels": 3, "kernel_size": (3, 2), "dilation": 2, "padding": (2, 0)},
    ],
)
@pytest.mark.parametrize("size", [(9, 10), (14, 15)])
def test_batch_one_convolution_computes_the_native_convolution(settings, size):
    """At batch 1 on CPU, Conv2d multiplies unfolded patches, position-major where the output has
    few positions, channel-major otherwise: the same values and first and second derivatives as
    nn.Conv2d (float64, to rounding); other batches run the native kernel."""
    torch.manual_seed(0)
    ours = Conv2d(**settings).double()
    native = nn.Conv2d(**settings).double()
    native.load_state_dict(ours.state_dict())
    x = torch.randn(1, settings["in_channels"], *size, dtype=torch.float64)
    out = ours(x)
    position_major = out[0, 0].numel() <= Conv2d.position_major_max
    assert (out.stride(1) == 1) == position_major and out.shape[2:] == native(x).shape[2:]
    if size == (9, 10) and "stride" not in settings:
        assert position_major  # both branches are exercised
    for a, b in zip(first_and_second_derivatives(ours, x), first_and_second_derivatives(native, x)):
        assert a.shape == b.shape and torch.allclose(a, b, rtol=1e-10, atol=1e-12)
    (weight_grad,) = torch.autograd.grad(ours(x).square().sum(), ours.weight)
    (native_grad,) = torch.autograd.grad(native(x).square().sum(), native.weight)
    assert torch.allclose(weight_grad, native_grad, rtol=1e-10, atol=1e-12)
    batch = torch.randn(3, settings["in_channels"], 9, 10, dtype=torch.float64)
    assert torch.equal(ours(batch), native(batch))


def test_batch_one_layers_under_torch_func_transforms():
    """The unfrozen meta-test runs the model under vmap(grad) one image at a time: there the
    autograd Functions (patches, instance norm) give way to PyTorch's kernels, and the gradients
    equal those of plain autograd through the Functions, image by image (float64)."""
    torch.manual_seed(0)
    blocks = nn.Sequential(conv_block(1, 4), conv_block(4, 3, pool=0)).double()  # 144 positions, then 16
    params = {name: p.detach() for name, p in blocks.named_parameters()}
    images = torch.randn(3, 1, 1, 14, 14, dtype=torch.float64)

    def loss(params, x):
        return torch.func.functional_call(blocks, params, (x,)).square().sum()

    batched = torch.func.vmap(torch.func.grad(loss), in_dims=(None, 0))(params, images)
    for index, image in enumerate(images):
        leaves = {name: p.clone().requires_grad_() for name, p in params.items()}
        plain = torch.autograd.grad(loss(leaves, image), list(leaves.values()))
        for name, grad in zip(leaves, plain):
            assert torch.allclose(batched[name][index], grad, rtol=1e-10, atol=1e-12), name


def test_select_parameters_by_prefix():
    model = build_model({"name": "anml", "rln_channels": 4, "nm_channels": 3, "num_classes": 5})
    inner = select_parameters(model, ["rln", "fc"])
    assert inner and all(n.startswith(("rln.", "fc.")) for n in inner)
    assert len(select_parameters(model, "all")) == len(list(model.parameters()))
    with pytest.raises(ConfigError, match="valid prefixes: all, fc, nm, rln"):
        select_parameters(model, ["encoder"])


def test_bad_model_options_are_config_errors():
    with pytest.raises(ConfigError, match="bn, gn, in"):
        build_model({"name": "convnet", "norm": "ln"})
    with pytest.raises(ConfigError, match="linear, mlp, cosine"):
        build_model({"name": "convnet", "head": "knn"})
    with pytest.raises(ConfigError, match="3 values given for 2 blocks"):
        build_model({"name": "convnet", "num_blocks": 2, "num_filters": [4, 4, 4]})
    with pytest.raises(ConfigError, match="small, imagenet"):
        build_model({"name": "resnet18", "stem": "cifar"})


def test_checkpoint_round_trip_keeps_spec_and_outputs(tmp_path):
    torch.manual_seed(0)
    spec = {"name": "anml", "rln_channels": 4, "nm_channels": 3, "num_classes": 5, "nm_pool_output": False}
    model = build_model(spec)
    path = save_model(model, tmp_path / "anml.pt", step=3)
    loaded = load_model(path)
    assert model_spec(loaded) == spec
    x = torch.rand(2, 1, 28, 28)
    assert torch.equal(model(x), loaded(x))
    # the file holds tensors and plain values only: it loads with weights_only=True
    assert torch.load(path, weights_only=True)["step"] == 3
