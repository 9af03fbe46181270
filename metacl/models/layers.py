"""metacl's layers: the same functions as PyTorch's, through faster kernels for meta-learning.

An inner loop learns from one image at a time and differentiates its own gradient
(`create_graph`), where PyTorch's CPU kernels spend more on dispatch, layout and scalar loops
than on arithmetic. Each layer here computes exactly its `torch.nn` namesake (the tests hold
values and first and second derivatives equal) and takes PyTorch's own kernels wherever its
faster path does not apply: the convolution and the max-pool on other devices than the CPU,
settings they do not cover, and any torch.func transform.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def _transformed(x: torch.Tensor) -> bool:
    """Whether `x` is seen through a torch.func transform (vmap, grad): the autograd Functions in
    this module serve plain autograd only, so such calls take PyTorch's own kernels."""
    return torch._C._functorch.is_functorch_wrapped_tensor(x)


class InstanceNorm(nn.InstanceNorm2d):
    """Affine InstanceNorm2d computed by PyTorch's group-norm kernels (one channel per group),
    with its second derivative written out.

    The same function and parameters, but the group-norm kernels run it and its gradient about
    twice as fast on CPU as instance norm's batch-norm reshape. With `create_graph`, PyTorch
    records the gradient as a chain of small operations and differentiates that chain again;
    `_InstanceNormBackward` computes the gradient in one kernel and its own gradient in about
    ten whole-map operations (measured on one image, forward + backward + double backward: 1.0
    against 1.5 ms at 26x26, 0.54 against 0.72 at 11x11, 0.30 against 0.43 at 3x3).
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.weight is None or self.bias is None or x.dim() != 4 or _transformed(x):
            return F.group_norm(x, self.num_features, self.weight, self.bias, self.eps)
        return _InstanceNorm.apply(x.contiguous(), self.weight, self.bias, self.eps)  # a recorded copy where needed


def _group_norm_backward(grad, x, mean, rstd, weight, needed):
    """PyTorch's fused group-norm gradient, one channel per group: (input, weight, bias) grads."""
    n, c = x.shape[:2]
    return torch.ops.aten.native_group_norm_backward(
        grad.contiguous(), x, mean, rstd, weight, n, c, x[0, 0].numel(), c, needed
    )


class _InstanceNorm(torch.autograd.Function):
    """Affine instance norm of a contiguous (N, C, H, W) by the group-norm kernel; its gradient is
    `_InstanceNormBackward` where it must be differentiable again (`create_graph`). The input is
    saved as it is, so that the second derivative reaches it."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, eps: float) -> torch.Tensor:
        n, c = x.shape[:2]
        out, mean, rstd = torch.native_group_norm(x, weight, bias, n, c, x[0, 0].numel(), c, eps)
        ctx.save_for_backward(x, weight, mean, rstd)
        ctx.eps = eps
        return out

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        x, weight, mean, rstd = ctx.saved_tensors
        if torch.is_grad_enabled():
            grads = _InstanceNormBackward.apply(grad, x, weight, mean, rstd, ctx.eps)
        else:
            grads = _group_norm_backward(grad, x, mean, rstd, weight, list(ctx.needs_input_grad[:3]))
        return *grads, None


class _InstanceNormBackward(torch.autograd.Function):
    """(grad, x, weight) -> the instance norm's (input, weight, bias) gradients, by the fused
    kernel; its backward is the derivative of that map written out.

    Per image and channel, with D pixels, xhat = (x - mean) * r and r = 1 / sqrt(var + eps), the
    gradient is gx = r w (gy - mean(gy) - xhat mean(gy xhat)), gw = sum(gy xhat), gb = sum(gy).
    Given the incoming (u, p, q) for (gx, gw, gb), everything below is a per-row coefficient
    times gy, u or x, plus the five row sums of gy, u, x gy, x u and u gy: the gradients for gy
    (the same projection applied to u, plus p xhat + q), for w, and for x through xhat and r
    (r's own dependence on x included). Where a third derivative is being recorded, mean and r
    are recomputed from x so that the result stays differentiable in x.
    """

    @staticmethod
    def forward(ctx, grad, x, weight, mean, rstd, eps):
        ctx.save_for_backward(grad, x, weight, mean, rstd)
        ctx.eps = eps
        return _group_norm_backward(grad, x, mean, rstd, weight, [True, True, True])

    @staticmethod
    def backward(ctx, u, p, q):
        gy, x, w, mean, rstd = ctx.saved_tensors
        shape = x.shape
        n, c = shape[:2]
        x, gy, u = x.reshape(n, c, -1), gy.reshape(n, c, -1), u.reshape(n, c, -1)
        pixels = x.shape[-1]
        if torch.is_grad_enabled():
            var, mu = torch.var_mean(x, -1, correction=0, keepdim=True)
            r = (var + ctx.eps).rsqrt()
        else:
            mu, r = mean[..., None], rstd[..., None]
        w, p, q = w[:, None], p[:, None], q[:, None]
        mean_gy = gy.mean(-1, keepdim=True)
        mean_gy_xhat = r * (torch.linalg.vecdot(x, gy)[..., None] / pixels - mu * mean_gy)
        mean_u = u.mean(-1, keepdim=True)
        mean_u_xhat = r * (torch.linalg.vecdot(x, u)[..., None] / pixels - mu * mean_u)
        s = torch.linalg.vecdot(u, gy)[..., None] / pixels - mean_gy * mean_u - mean_gy_xhat * mean_u_xhat
        rw = r * w
        b = p - rw * mean_u_xhat  # the gradient at xhat is b gy - rw mean_gy_xhat u
        grad_gy = torch.addcmul(q - rw * mean_u - b * r * mu, u, rw).addcmul_(x, b * r)
        grad_w = (r * s).sum((0, 2)) * pixels
        mean_g = b * mean_gy - rw * mean_gy_xhat * mean_u
        k = r * (b * mean_gy_xhat - rw * mean_gy_xhat * mean_u_xhat + rw * s)
        grad_x = torch.addcmul(r * (k * mu - mean_g), gy, r * b)
        grad_x = grad_x.addcmul_(u, -r * rw * mean_gy_xhat).addcmul_(x, -r * k)
        return grad_gy.view(shape), grad_x.view(shape), grad_w, None, None, None


class Conv2d(nn.Conv2d):
    """`nn.Conv2d` that runs a single CPU image as one matrix product over its unfolded patches.

    An inner loop learns from one image at a time, and at batch 1 PyTorch's CPU convolutions
    spend more on dispatch and layout than on arithmetic (the 5x5-input layer of ANML takes its
    unvectorised fallback). Unfolding the image (`F.unfold`, im2col) and multiplying by the
    weight matrix leaves the forward pass, its gradient and the gradient of that gradient to
    matrix products and folds: measured here, a 3x3 layer's forward, `create_graph` backward and
    double backward at batch 1 took 1.0 / 7.1 / 2.6 ms instead of 1.4 / 8.1 / 3.6 ms for
    ANML's three layers. The same function; larger batches and other devices keep PyTorch's
    kernels, which win there.

    A layer with few output positions multiplies position-major, (positions x inputs) @
    (inputs x channels): the BLAS is several times faster when the thin dimension is the
    product's row count (ANML's last layer, 9 positions: 2304 x 256 @ 256 x 9 took 208 us,
    9 x 256 @ 256 x 2304 55 us), and autograd's products for the gradients follow the operands'
    layouts. Above `position_major_max` positions the transposed copy of the patches costs more
    than it saves (a full forward / backward / double-backward cycle, 256 channels: 3.1 against
    4.3 ms at 9 positions, 9.4 against 9.6 at 81, 13.6 against 13.2 at 121). There, the patches
    of a plain (stride-1, unpadded, undilated) kernel come from `_Patches` instead of `F.unfold`.
    """

    position_major_max = 100
    """Output positions up to which a batch-1 product runs position-major (measured crossover)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        padding = self.padding
        if isinstance(padding, str) or not self._unfolds(x):  # "same"/"valid" padding: the native kernel
            return super().forward(x)
        out_size = [
            (size + 2 * pad - dilation * (kernel - 1) - 1) // stride + 1
            for size, pad, dilation, kernel, stride in zip(
                x.shape[2:], padding, self.dilation, self.kernel_size, self.stride
            )
        ]
        weight = self.weight.view(self.out_channels, -1)
        if out_size[0] * out_size[1] <= self.position_major_max:
            out = self._unfold(x).T.contiguous() @ weight.T
            if self.bias is not None:
                out = out + self.bias
            out = out.T  # (channels, positions) with channels-last strides
        else:
            plain = self.stride == (1, 1) and self.dilation == (1, 1) and padding == (0, 0) and not _transformed(x)
            out = weight @ (_Patches.apply(x.squeeze(0), self.kernel_size) if plain else self._unfold(x))
            if self.bias is not None:
                out = out + self.bias[:, None]
        return out.view(1, self.out_channels, *out_size)

    def _unfold(self, x: torch.Tensor) -> torch.Tensor:
        """(inputs, positions) by `F.unfold`, viewed without the batch (so that its gradient is a view too)."""
        patches = F.unfold(x, self.kernel_size, self.dilation, self.padding, self.stride)  # type: ignore[arg-type]
        return patches.view(patches.shape[1:])

    def _unfolds(self, x: torch.Tensor) -> bool:
        return (
            x.device.type == "cpu"
            and x.dim() == 4
            and x.shape[0] == 1
            and self.groups == 1
            and self.padding_mode == "zeros"
        )


class _Patches(torch.autograd.Function):
    """im2col of one (C, H, W) image for a stride-1, unpadded, undilated kernel: (C*kh*kw, Ho*Wo).

    One strided copy (`as_strided` reads every window in place), where PyTorch's CPU im2col
    and col2im loop over scalars: for ANML's 13x13, 256-channel layer 61 us instead of 169, and
    the fold (`_FoldPatches`, its gradient) 206 us instead of 452. The two are each other's
    adjoints, so first, second and higher derivatives go through the same pair. For a few output
    positions the nine slice additions of the fold cost more than col2im (91 against 31 us at
    5x5), so `Conv2d` uses the pair above `position_major_max` positions only.
    """

    @staticmethod
    def forward(ctx, x: torch.Tensor, kernel: tuple[int, int]) -> torch.Tensor:
        ctx.size, ctx.kernel = x.shape, kernel
        (channels, height, width), (kh, kw) = x.shape, kernel
        rows, cols = height - kh + 1, width - kw + 1
        stride_c, stride_h, stride_w = x.stride()
        windows = x.as_strided(
            (channels, kh, kw, rows, cols), (stride_c, stride_h, stride_w, stride_h, stride_w), x.storage_offset()
        )
        return windows.reshape(channels * kh * kw, rows * cols)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        return _FoldPatches.apply(grad, ctx.size, ctx.kernel), None


class _FoldPatches(torch.autograd.Function):
    """col2im, the adjoint of `_Patches`: each patch entry added back to the pixel it was read from."""

    @staticmethod
    def forward(ctx, patches: torch.Tensor, size: torch.Size, kernel: tuple[int, int]) -> torch.Tensor:
        ctx.kernel = kernel
        (channels, height, width), (kh, kw) = size, kernel
        rows, cols = height - kh + 1, width - kw + 1
        windows = patches.reshape(channels, kh, kw, rows, cols)  # a gradient may arrive in any layout
        image = patches.new_zeros(channels, height, width)
        for i in range(kh):
            band = image[:, i : i + rows]
            for j in range(kw):
                band[:, :, j : j + cols].add_(windows[:, i, j])
        return image

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        return _Patches.apply(grad, ctx.kernel), None, None


class MaxPool2d(nn.MaxPool2d):
    """`nn.MaxPool2d` that, on CPU, picks each window's maximum by index and gathers it.

    PyTorch's CPU max-pool kernel for NCHW tensors is unvectorised (here about 10 ns per output,
    40 ms for one layer of an 84-image ANML meta-batch), while its channels-last kernel is not. So
    the indices come from the channels-last kernel (no gradient flows through them) and the values
    from `gather`, whose backward scatters each gradient to the element the native backward would
    pick: the same first maximum of every window, so values and first and second derivatives are
    identical to the bit (tests/test_meta_models.py holds them equal, ties included), at about half the
    cost with and without `create_graph`. Other devices and windows that overlap, pad or dilate
    take the native kernel.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self._gathers(x):
            return super().forward(x)
        with torch.no_grad():
            channels_last = x.detach().permute(0, 2, 3, 1).contiguous().permute(0, 3, 1, 2)
            kernel = self.kernel_size if isinstance(self.kernel_size, tuple) else (self.kernel_size,) * 2
            _, index = F.max_pool2d_with_indices(channels_last, kernel)  # channels-last too: gather reads it as it is
        return x.flatten(2).gather(2, index.flatten(2)).view(index.shape)

    def _gathers(self, x: torch.Tensor) -> bool:
        return (
            x.device.type == "cpu"
            and x.dim() == 4
            and self.stride in (self.kernel_size, None)
            and self.padding in (0, (0, 0))
            and self.dilation in (1, (1, 1))
            and not self.ceil_mode
            and not self.return_indices
        )
