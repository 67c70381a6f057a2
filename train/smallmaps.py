"""Exact shortcuts for 3x3 convolutions on 1x1 and 2x2 feature maps, used while training on CPU.

At MNIST's 28 px, resnet18's last stage sees 1x1 maps and the one before it 2x2 maps (32 px and
64 px photos likewise). A 3x3 convolution with padding 1 there multiplies mostly padding: on a 1x1
map only the centre tap meets the input (1 of 9), on a 2x2 map 16 of the 36 (tap, position) pairs.
oneDNN computes all of them, and its weight gradients for these shapes are slow: profiled at batch
256 on a 2-core CPU, layer4's and layer3's convolutions took ~200 of a ~520 ms training step.
Here they are written as the matrix products they really are. Same weights, same outputs and
gradients (equal to 1e-14 in float64; tested), so the model that is exported is a plain resnet18.
On 1x1 maps and the stride-2 step onto them, the weight gradient is written straight into a zero
tensor laid out like the weight: autograd's own way, through the slice, filled and copied the whole
3x3 kernel three times (~10 ms of a ~330 ms step at batch 256 on 2 cores). Those weights are kept in
the plain layout (fused AdamW copies channels-last ones each step), and the 2x2-map products read
channels-last weights and inputs in their own order: with both, a batch-256 bf16 step of MNIST's
resnet18 170 -> 162 and 183 -> 176 ms (medians of 60, interleaved in one process).

The shortcuts are instance attributes set for the length of a `with` block and always removed,
so nothing of this module is pickled with the learner.
"""
from __future__ import annotations

import contextlib
import types

import torch
import torch.nn.functional as F
from torch.autograd.function import once_differentiable
from torch import nn

from train import distributed

# For a 2x2 map, stride 1, padding 1: the kernel tap that links output position p to input
# position q (positions in row-major order (0,0), (0,1), (1,0), (1,1)) is (qh - ph + 1, qw - pw + 1).
# As a one-hot (9 taps, 16 (p, q) pairs) matrix, so that gathering the taps is a small matrix
# product, whose backward is one too (advanced indexing's backward, index_put, cost 3x more).
_POS = [(0, 0), (0, 1), (1, 0), (1, 1)]
_SELECT = torch.zeros(9, 16)
for _p, (_ph, _pw) in enumerate(_POS):
    for _q, (_qh, _qw) in enumerate(_POS):
        _SELECT[(_qh - _ph + 1) * 3 + (_qw - _pw + 1), _p * 4 + _q] = 1.0
_SELECT_T = _SELECT.t().contiguous()  # (16 (p, q) pairs, 9 taps)


class _CornerLinear(torch.autograd.Function):
    """`F.linear(x2d, weight[:, :, 1:1+k, 1:1+k].flatten(1), bias)`, for a k x k input whose one output
    position sees it through those k x k taps; backward gives the weight's gradient in its own layout.
    Differentiable once (training needs no more; a gradient of gradients raises)."""

    @staticmethod
    @torch.amp.custom_fwd(device_type="cpu")  # backward runs under the forward's autocast (bf16 training)
    def forward(ctx, x2d, weight, bias, k):
        taps = weight[:, :, 1:1 + k, 1:1 + k].flatten(1)
        ctx.save_for_backward(x2d, weight, taps)
        ctx.k, ctx.has_bias = k, bias is not None
        return F.linear(x2d, taps, bias)

    @staticmethod
    @torch.amp.custom_bwd(device_type="cpu")
    @once_differentiable
    def backward(ctx, g):
        x2d, weight, taps = ctx.saved_tensors
        o, c, k = weight.shape[0], weight.shape[1], ctx.k
        gx = g @ taps.to(g.dtype) if ctx.needs_input_grad[0] else None
        gw = None
        if ctx.needs_input_grad[1]:
            gw = torch.zeros_like(weight)  # the weight's layout, so that autograd keeps it as is
            gw[:, :, 1:1 + k, 1:1 + k] = (g.t() @ x2d.to(g.dtype)).view(o, c, k, k)
        gb = g.sum(0) if ctx.has_bias and ctx.needs_input_grad[2] else None
        return gx, gw, gb, None


def _corner_linear(x2d, weight, bias, k):
    """`_CornerLinear`'s product through autograd, off the CPU (the function is written for CPU autocast)."""
    return F.linear(x2d, weight[:, :, 1:1 + k, 1:1 + k].flatten(1), bias)


def _forward(self: nn.Conv2d, x: torch.Tensor) -> torch.Tensor:
    n, c, h, w = x.shape
    corner = _CornerLinear.apply if x.device.type == "cpu" else _corner_linear
    if (h, w) == (1, 1) and self.stride == (1, 1):
        # Only the centre tap meets the input: a linear layer on the channels.
        _plain_layout(self.weight)
        return corner(x.reshape(n, c), self.weight, self.bias, 1)[:, :, None, None]
    if (h, w) == (2, 2) and self.stride == (2, 2):
        # One output position, whose window covers the input with the kernel's bottom-right 2x2.
        _plain_layout(self.weight)
        return corner(x.reshape(n, c * 4), self.weight, self.bias, 2)[:, :, None, None]
    if (h, w) == (2, 2) and self.stride == (1, 1):
        # Every output position sees every input position through one tap: a (4 out x 4 in)
        # block matrix of taps, one product instead of 9 taps at 4 positions over mostly padding.
        # Taken in the channels-last order, (o, tap, c) for the weight and (position, c) for the
        # input, both views: the channels-first order (o, c, tap) needed three copies through
        # permute/reshape each way (~1.5 ms a conv of a ~170 ms bf16 step at batch 256), and its
        # weight gradient came back channels-first, for autograd to copy once more.
        o = self.weight.shape[0]
        weight = self.weight.permute(0, 2, 3, 1).reshape(o, 9, c)
        select = _SELECT_T.to(self.weight.device, weight.dtype)
        big = torch.matmul(select, weight).reshape(o * 4, 4 * c)           # rows (o, p), cols (q, c)
        bias = None if self.bias is None else self.bias.repeat_interleave(4)
        return F.linear(x.permute(0, 2, 3, 1).reshape(n, 4 * c), big, bias).view(n, o, 2, 2)
    return self._conv_forward(x, self.weight, self.bias)


def _plain_layout(weight: nn.Parameter) -> None:
    """Put a weight that only the corner products read (never oneDNN) back in the plain NCHW layout,
    in place, before its first gradient and optimiser state: fused AdamW on the CPU copies every
    channels-last tensor to a contiguous one each step, ~3 ms for each of layer4's 512x512x3x3 kernels
    (of a ~170 ms bf16 step at batch 256). Its optimiser state must follow (the fused kernel mixes up
    the entries of tensors laid out differently): training's AdamW sees to it
    (`train.learner.LayoutSafeAdamW`), for state made before the change. Not on a run of several
    processes, whose DDP fixed each gradient's layout when it wrapped the model."""
    if not weight.is_contiguous() and distributed.world_size() == 1:
        weight.data = weight.data.contiguous()


def _eligible(m: nn.Module) -> bool:
    return (type(m) is nn.Conv2d and m.kernel_size == (3, 3) and m.padding == (1, 1)
            and m.dilation == (1, 1) and m.groups == 1 and m.padding_mode == "zeros")


@contextlib.contextmanager
def small_map_convs(model: nn.Module, enabled: bool = True):
    """Within the block, the model's 3x3 convolutions take the shortcuts when their input is 1x1
    or 2x2 (any other size runs the normal convolution)."""
    patched = [m for m in model.modules() if _eligible(m)] if enabled else []
    for m in patched:
        m.forward = types.MethodType(_forward, m)
    try:
        yield model
    finally:
        for m in patched:
            m.__dict__.pop("forward", None)
