"""Exact shortcuts for 3x3 convolutions on 1x1, 2x2 and 3x3 feature maps, used while training on CPU.

At 28 px, resnet18's last stage sees 1x1 maps and the one before it 2x2 maps (32 px and 64 px photos
likewise); at MNIST's 36 px, layer4 sees 2x2 maps, reached from layer3's 3x3. A 3x3 convolution with
padding 1 there multiplies mostly padding: on a 1x1 map only the centre tap meets the input (1 of 9),
on a 2x2 map 16 of the 36 (tap, position) pairs, on a 3x3 map 49 of 81 (16 of 36 at stride 2).
oneDNN computes all of them, and its weight gradients for these shapes are slow: profiled at batch
256 on a 2-core CPU, layer4's and layer3's convolutions took ~200 of a ~520 ms training step.
Here they are written as the matrix products they really are. Same weights, same outputs and
gradients (equal to 1e-14 in float64; tested), so the model that is exported is a plain resnet18.
On 1x1 maps and the stride-2 step onto them, the weight gradient is written straight into a zero
tensor laid out like the weight: autograd's own way, through the slice, filled and copied the whole
3x3 kernel three times (~10 ms of a ~330 ms step at batch 256 on 2 cores). Those weights are laid
out tap by tap while training (`_tap_major`), so that the taps they use are whole blocks of memory,
and the 2x2-map products read channels-last weights and inputs in their own order. On a 3x3 map
each output position's window of the input meets the kernel's taps through one product
(`_WindowConv`): at stride 2 in training (layer4's first convolution at 36 px), and at stride 1
only without gradients (validation), where oneDNN's backward was the faster.

Elsewhere (stride 1 on a 3x3 map in training, any convolution on a 4x4 map or a larger one, the
1x1 stride-2 downsamples too) the
forward and the input's gradient stay oneDNN's, but the weight's gradient may be taken as one matrix
product over an im2col view of the input (`_weight_grad`) where that is faster. It is on an Intel
Xeon with AMX (Emerald Rapids): oneDNN's AMX backward-weights kernel spent 4-7 ms on layer2's and
layer3's 3x3 convolutions at batch 256 in bf16 (the product: 0.7-1.7 ms) and 5 ms on layer4's 1x1
downsample (0.1 ms), ~45 of a ~160 ms step, but was the faster on layer1's 7x7 maps and on the stem.
Which is faster depends on the CPU and the shape, so it is timed once per shape and precision, on
the live tensors, the first time a training step meets it (`_matmul_pays_off`, ~0.3 s in all).

The shortcuts are instance attributes set for the length of a `with` block and always removed,
so nothing of this module is pickled with the learner.
"""
from __future__ import annotations

import contextlib
import functools
import logging
import types
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch.autograd.function import once_differentiable
from torch import nn

from train import distributed
from train.timing import fastest_seconds

log = logging.getLogger(__name__)

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
    """`F.linear(x2d, _taps(weight, k), bias)`, for a k x k input (`x2d` in (row, column, channel)
    order) whose one output position sees it through the kernel's taps from (1, 1) to (k, k); backward
    gives the weight's gradient in its own layout. Differentiable once (training needs no more; a
    gradient of gradients raises)."""

    @staticmethod
    @torch.amp.custom_fwd(device_type="cpu")  # backward runs under the forward's autocast (bf16 training)
    def forward(ctx, x2d, weight, bias, k):
        taps = _taps(weight, k)
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
            gw[:, :, 1:1 + k, 1:1 + k].permute(0, 2, 3, 1).copy_((g.t() @ x2d.to(g.dtype)).view(o, k, k, c))
        gb = g.sum(0) if ctx.has_bias and ctx.needs_input_grad[2] else None
        return gx, gw, gb, None


def _taps(weight: torch.Tensor, k: int) -> torch.Tensor:
    """The kernel's taps from (1, 1) to (k, k) as one (out, (row, column, in)) matrix: one contiguous
    block of a tap-major weight (`_tap_major`) for k = 1, four gathered for k = 2."""
    return weight[:, :, 1:1 + k, 1:1 + k].permute(0, 2, 3, 1).reshape(weight.shape[0], -1)


def _corner_linear(x2d, weight, bias, k):
    """`_CornerLinear`'s product through autograd, off the CPU (the function is written for CPU autocast)."""
    return F.linear(x2d, _taps(weight, k), bias)


def _forward(self: nn.Conv2d, x: torch.Tensor) -> torch.Tensor:
    if x.dim() != 4:  # one unbatched image (nn.Conv2d takes it): none of this applies
        return self._conv_forward(x, self.weight, self.bias)
    n, c, h, w = x.shape
    corner = _CornerLinear.apply if x.device.type == "cpu" else _corner_linear
    three = self.kernel_size == (3, 3) and self.padding == (1, 1)  # the small-map shortcuts are for these
    if three and (h, w) == (1, 1) and self.stride == (1, 1):
        # Only the centre tap meets the input: a linear layer on the channels.
        _tap_major(self.weight)
        return corner(x.reshape(n, c), self.weight, self.bias, 1)[:, :, None, None]
    if three and (h, w) == (2, 2) and self.stride == (2, 2):
        # One output position, whose window covers the input with the kernel's bottom-right 2x2;
        # the input in (row, column, channel) order, a view of a channels-last one.
        _tap_major(self.weight)
        return corner(x.permute(0, 2, 3, 1).reshape(n, 4 * c), self.weight, self.bias, 2)[:, :, None, None]
    if three and (h, w) == (2, 2) and self.stride == (1, 1):
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
        out = F.linear(x.permute(0, 2, 3, 1).reshape(n, 4 * c), big, bias).view(n, o, 2, 2)
        # Handed on in the input's layout: BatchNorm's backward over channels-first 2x2 maps loops over
        # 4 numbers at a time (~1 ms of a bf16 step at batch 256 for each of layer3's BatchNorms after
        # these; channels-last ~0.2 ms), and a residual sum of two layouts is slow too. The copy is
        # the output's (n x 4o), not the weight's (4o x 4c).
        return out.contiguous(memory_format=torch.channels_last) if _channels_last(x) else out
    if (three and (h, w) == (3, 3) and self.stride[0] == self.stride[1] and x.device.type == "cpu"
            and (self.stride == (2, 2) or not torch.is_grad_enabled())):
        # Each output position sees a window of the input through the kernel's taps that meet it. At
        # stride 1 only without gradients (validation): its backward's products have K = the batch
        # (or the channels), and took 9.8 ms against 6.6 ms for oneDNN's plus `_weight_grad` (layer3
        # at 36 px, batch 256, bf16, 2 cores of an Intel Xeon with AMX); forward alone, in fp32,
        # validation took 3.7 s per 10,000 digits against 4.1 s.
        return _WindowConv.apply(x, self.weight, self.bias, self.stride[0])
    if x.device.type == "cpu" and torch.is_grad_enabled() and self.weight.requires_grad and _matmul_pays_off(self, x):
        return _MatmulGradConv.apply(x, self.weight, self.bias, self.stride, self.padding)
    return self._conv_forward(x, self.weight, self.bias)


class _WindowPlan(NamedTuple):
    groups: list          # per window size: (rows, columns, tap rows, tap columns) of each output position
    out_hw: tuple         # the output's (height, width)
    positions: torch.Tensor  # the row-major index of each output position, in the groups' order


@functools.lru_cache(maxsize=None)
def _window_plan(h: int, w: int, stride: int) -> _WindowPlan:
    """For a 3x3 convolution with padding 1 on an h x w map: each output position's window of the input
    (rows, columns) and the kernel taps it meets (rows, columns), grouped by the window's size
    (positions of one size are one batched product). On a 3x3 map at stride 1: 4 corners see 2x2
    windows, 4 edges 2x3 or 3x2, the centre all of it (49 of 81 pairs)."""
    def spans(size, out):
        for p in range(out):
            lo, hi = max(0, p * stride - 1), min(size, p * stride + 2)  # the input rows (columns) it sees
            yield slice(lo, hi), slice(lo - p * stride + 1, hi - p * stride + 1)
    ho, wo = (h - 1) // stride + 1, (w - 1) // stride + 1
    groups: dict[int, list] = {}
    for i, (rows, taps_r) in enumerate(spans(h, ho)):
        for j, (cols, taps_c) in enumerate(spans(w, wo)):
            area = (rows.stop - rows.start) * (cols.stop - cols.start)
            groups.setdefault(area, []).append((rows, cols, taps_r, taps_c, i * wo + j))
    positions = torch.tensor([pos for group in groups.values() for *_, pos in group])
    return _WindowPlan([[spec[:4] for spec in group] for group in groups.values()], (ho, wo), positions)


class _WindowConv(torch.autograd.Function):
    """`F.conv2d(x, weight, bias, stride, padding=1)` of a 3x3 kernel on a 3x3 map as one product per
    output position, of its window of the input (batch x window's taps x c) with the kernel's taps that
    meet it; positions whose windows have one size are one batched product (`_window_plan`). oneDNN
    computes all nine taps at every position, over the padding too: on a 3x3 map 49 of 81 (tap,
    position) pairs meet the input at stride 1, 16 of 36 at stride 2. Profiled at batch 256 in bf16 on
    2 cores (an Intel Xeon with AMX), layer4's first convolution at 36 px took ~6 ms forward and ~7 ms
    backward in oneDNN (~21 ms forward in fp32, in validation). Inputs and weights are read in the
    channels-last order, (row, column, channel); the output is handed on in the input's layout.
    Differentiable once."""

    @staticmethod
    @torch.amp.custom_fwd(device_type="cpu")  # backward runs under the forward's autocast (bf16 training)
    def forward(ctx, x, weight, bias, stride):
        dtype = _compute_dtype(x)  # what autocast's conv2d computes in
        (n, c, h, w), o = x.shape, weight.shape[0]
        xn, wn = x.to(dtype).permute(0, 2, 3, 1), weight.to(dtype).permute(0, 2, 3, 1)  # (n|o, rows, columns, c)
        plan = _window_plan(h, w, stride)
        saved, outs = [], []
        for group in plan.groups:
            windows = torch.stack([xn[:, rows, cols].reshape(n, -1) for rows, cols, _, _ in group])
            taps = torch.stack([wn[:, tr, tc].reshape(o, -1) for _, _, tr, tc in group])
            outs.append(torch.bmm(windows, taps.transpose(1, 2)))              # (positions, n, o)
            saved += [windows, taps]
        out = torch.cat(outs)[plan.positions.argsort()].transpose(0, 1)      # (n, positions in row-major order, o)
        if bias is not None:
            out = out + bias.to(dtype)
        out = out.contiguous().view(n, *plan.out_hw, o).permute(0, 3, 1, 2)  # channels-last (n, o, ho, wo)
        ctx.save_for_backward(*saved)
        ctx.plan, ctx.shapes = plan, (n, c, h, w, o)
        ctx.dtypes, ctx.has_bias = (x.dtype, weight.dtype), bias is not None
        return out if _channels_last(x) else out.contiguous()

    @staticmethod
    @torch.amp.custom_bwd(device_type="cpu")
    @once_differentiable
    def backward(ctx, g):
        saved, plan = ctx.saved_tensors, ctx.plan
        (n, c, h, w, o), (x_dtype, w_dtype) = ctx.shapes, ctx.dtypes
        # (positions, n, o) in the groups' order
        g_all = g.to(saved[0].dtype).permute(2, 3, 0, 1).reshape(-1, n, o)[plan.positions]
        gx = torch.zeros(n, h, w, c, dtype=x_dtype, device=g.device) if ctx.needs_input_grad[0] else None
        gw = torch.zeros(o, 3, 3, c, dtype=w_dtype, device=g.device) if ctx.needs_input_grad[1] else None
        start = 0
        for k, group in enumerate(plan.groups):
            windows, taps = saved[2 * k], saved[2 * k + 1]
            gk = g_all[start:start + len(group)]
            start += len(group)
            if gx is not None:
                for part, (rows, cols, _, _) in zip(torch.bmm(gk, taps), group):
                    gx[:, rows, cols] += part.view(n, rows.stop - rows.start, cols.stop - cols.start, c)
            if gw is not None:
                for part, (_, _, tr, tc) in zip(torch.bmm(gk.transpose(1, 2), windows), group):
                    gw[:, tr, tc] += part.view(o, tr.stop - tr.start, tc.stop - tc.start, c)
        gb = g.sum((0, 2, 3)) if ctx.has_bias and ctx.needs_input_grad[2] else None
        # channels-last gradients: the layouts the input and the weight come in, in training
        return (None if gx is None else gx.permute(0, 3, 1, 2), None if gw is None else gw.permute(0, 3, 1, 2),
                gb, None)


class _MatmulGradConv(torch.autograd.Function):
    """`F.conv2d(x, weight, bias, stride, padding)` (oneDNN's, forward and the input's gradient) whose
    weight gradient is `_weight_grad`'s one matrix product. Differentiable once."""

    @staticmethod
    @torch.amp.custom_fwd(device_type="cpu")  # backward runs under the forward's autocast (bf16 training)
    def forward(ctx, x, weight, bias, stride, padding):
        dtype = _compute_dtype(x)  # what autocast's conv2d computes in: both in its dtype
        x, weight = x.to(dtype), weight.to(dtype)
        bias = None if bias is None else bias.to(dtype)
        ctx.save_for_backward(x, weight)
        ctx.stride, ctx.padding, ctx.has_bias = stride, padding, bias is not None
        return F.conv2d(x, weight, bias, stride, padding)

    @staticmethod
    @torch.amp.custom_bwd(device_type="cpu")
    @once_differentiable
    def backward(ctx, g):
        x, weight = ctx.saved_tensors
        g = g.to(x.dtype)
        gx = gw = gb = None
        if ctx.needs_input_grad[0]:
            gx = torch.ops.aten.convolution_backward(g, x, weight, None, ctx.stride, ctx.padding, (1, 1), False,
                                                     (0, 0), 1, (True, False, False))[0]
        if ctx.needs_input_grad[1]:
            gw = _weight_grad(g, x, weight.shape[2:], ctx.stride, ctx.padding)
        if ctx.has_bias and ctx.needs_input_grad[2]:
            gb = g.sum((0, 2, 3))
        return gx, gw, gb, None, None


def _weight_grad(g: torch.Tensor, x: torch.Tensor, kernel, stride, padding) -> torch.Tensor:
    """The weight gradient of a convolution (groups 1, dilation 1, zero padding) as one product:
    (out channels x positions) @ (positions x (kh, kw, in channels)), the input's windows gathered
    by a strided view of the padded channels-last input (F.unfold, channels-first, took 5-20x
    longer). Comes back laid out as a channels-last weight is, (o, kh, kw, c) in memory."""
    n, c = x.shape[:2]
    o, ho, wo = g.shape[1:]
    (kh, kw), (sh, sw), (ph, pw) = kernel, stride, padding
    xn = x.permute(0, 2, 3, 1)  # (n, h, w, c): a view of a channels-last input
    xn = (F.pad(xn, (0, 0, pw, pw, ph, ph)) if ph or pw else xn).contiguous()
    s = xn.stride()
    cols = xn.as_strided((n, ho, wo, kh, kw, c), (s[0], s[1] * sh, s[2] * sw, s[1], s[2], s[3]))
    go = g.permute(0, 2, 3, 1).reshape(n * ho * wo, o)
    return (go.t() @ cols.reshape(n * ho * wo, kh * kw * c)).view(o, kh, kw, c).permute(0, 3, 1, 2)


# (shape of the input, of the weight, stride, padding, dtype) -> whether `_weight_grad` is taken there
_MATMUL_CHOICE: dict[tuple, bool] = {}
# The product must be this much faster than oneDNN's kernel to be taken: a close call is not worth a
# path whose rounding differs, and two timings of one kernel differ by a few percent.
MATMUL_MIN_SPEEDUP = 1.2
# Nor is it tried where its im2col matrix (kh x kw times the input's size) would pass this many bytes:
# large maps (photos at 128-224 px) are where oneDNN's kernel does well, and the matrix is transient
# memory of every step (MNIST at batch 256 in bf16: 4.7 MB for layer2's 3x3 convolutions, 14.5 MB for layer1's).
MATMUL_MAX_BYTES = 32 * 2**20


def _compute_dtype(x: torch.Tensor) -> torch.dtype:
    """The dtype a convolution of `x` computes in: CPU autocast's for floating-point inputs other than
    float64 (which autocast leaves alone), else `x`'s own."""
    autocast = torch.is_autocast_enabled("cpu") and x.is_floating_point() and x.dtype != torch.float64
    return torch.get_autocast_dtype("cpu") if autocast else x.dtype


def _matmul_pays_off(conv: nn.Conv2d, x: torch.Tensor) -> bool:
    """Whether `_weight_grad` is at least MATMUL_MIN_SPEEDUP times faster than oneDNN's backward-weights
    kernel for this convolution and input, timed here the first time (the fastest of 3 each, after one
    untimed each, in turns), on the live input and weight in the dtype the step computes in and an
    output-shaped stand-in for the gradient. No random numbers are drawn, so the run's own are left as
    they were; but like `--precision auto` (train/precision.py) it is a timed choice, and the two round
    differently, so two runs of one seed may differ in the last digits. Each verdict is logged (DEBUG).
    On a run of several processes oneDNN's stays, untimed: ranks timing at once on shared cores would
    choose by noise, and a verdict sent from rank 0 would be a collective inside a forward pass, which
    the passes rank 0 makes alone (lr_find, the precision timing) would leave unanswered."""
    dtype = _compute_dtype(x)
    key = (tuple(x.shape), tuple(conv.weight.shape), conv.stride, conv.padding, dtype)
    if key not in _MATMUL_CHOICE and (distributed.world_size() > 1
                                      or _im2col_bytes(conv, x, dtype) > MATMUL_MAX_BYTES):
        _MATMUL_CHOICE[key] = False
    if key not in _MATMUL_CHOICE:
        with torch.no_grad():
            xc, w = x.detach().to(dtype), conv.weight.detach().to(dtype)
            g = F.conv2d(xc, w, None, conv.stride, conv.padding)
            args = (None, conv.stride, conv.padding, (1, 1), False, (0, 0), 1, (False, True, False))
            best = fastest_seconds({
                "onednn": lambda: torch.ops.aten.convolution_backward(g, xc, w, *args),
                "matmul": lambda: _weight_grad(g, xc, w.shape[2:], conv.stride, conv.padding)}, repeats=3)
        _MATMUL_CHOICE[key] = best["onednn"] >= MATMUL_MIN_SPEEDUP * best["matmul"]
        log.debug("conv weight gradient, input %s, weight %s, stride %s, %s: oneDNN %.2f ms, product %.2f ms; "
                 "taking %s", "x".join(map(str, x.shape)), "x".join(map(str, conv.weight.shape)), conv.stride,
                 str(dtype).removeprefix("torch."), 1000 * best["onednn"], 1000 * best["matmul"],
                 "the product" if _MATMUL_CHOICE[key] else "oneDNN's")
    return _MATMUL_CHOICE[key]


def _im2col_bytes(conv: nn.Conv2d, x: torch.Tensor, dtype: torch.dtype) -> int:
    (kh, kw), (sh, sw), (ph, pw) = conv.kernel_size, conv.stride, conv.padding
    n, c, h, w = x.shape
    ho, wo = (h + 2 * ph - kh) // sh + 1, (w + 2 * pw - kw) // sw + 1
    return n * ho * wo * kh * kw * c * dtype.itemsize


def _channels_last(x: torch.Tensor) -> bool:
    return x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous()


def _tap_major(weight: nn.Parameter) -> None:
    """Lay out a weight that only the corner products read (never oneDNN) tap by tap, (kh, kw, out, in)
    in memory, in place, before its first gradient and optimiser state: each tap's (out x in) matrix is
    then one contiguous block, which the forward pass casts and the backward pass writes whole. Laid out
    plainly (out, in, kh, kw), the centre tap is every ninth number: gathering it, casting it to bf16
    and scattering its gradient back took ~8 ms of a ~108 ms bf16 step at batch 256 on 2 cores (an
    Intel Xeon with AMX) for layer4's four such kernels. The optimiser state follows the weight's
    layout (`train.learner.LayoutSafeAdamW`, which also steps such weights as flat memory), also when
    `small_map_convs` has put the weight back between two fits. Not on a run of several processes,
    whose DDP fixed each gradient's layout when it wrapped the model."""
    if weight.stride() != _tap_major_strides(weight.shape) and distributed.world_size() == 1:
        weight.data = weight.data.permute(2, 3, 0, 1).contiguous().permute(2, 3, 0, 1)


def _tap_major_strides(shape) -> tuple[int, ...]:
    o, c, kh, kw = shape
    return (c, 1, kw * o * c, o * c)


def _eligible(m: nn.Module) -> bool:
    return (type(m) is nn.Conv2d and not isinstance(m.padding, str) and m.dilation == (1, 1)
            and m.groups == 1 and m.padding_mode == "zeros")


def _pool_forward(self: nn.Module, x: torch.Tensor) -> torch.Tensor:
    # Pooling a 1x1 map to 1x1 (the head's AdaptiveConcatPool2d, after layer4 at 28-32 px) is the
    # identity, gradient included: adaptive_max_pool2d took ~1.5 ms of a bf16 step at batch 256
    # (its backward and the average's ~0.5 ms more) to copy 512 numbers per image.
    return x if x.shape[-2:] == (1, 1) else type(self).forward(self, x)


def _is_global_pool(m: nn.Module) -> bool:
    return (type(m) in (nn.AdaptiveAvgPool2d, nn.AdaptiveMaxPool2d) and m.output_size in (1, (1, 1))
            and not getattr(m, "return_indices", False))  # indices would make the output a pair


@contextlib.contextmanager
def small_map_convs(model: nn.Module, enabled: bool = True):
    """Within the block, the model's 3x3 convolutions take the shortcuts when their input is 1x1,
    2x2 or 3x3 (at stride 1 on 3x3, without gradients only), and any of its convolutions elsewhere takes its weight gradient as a matrix product
    where that was timed faster (else the normal convolution runs); its global poolings pass a
    1x1 map through. Weights laid out tap by tap in the block are put back in the layout they had
    when it began: outside it they meet oneDNN, which reorders such a weight on every call (a
    resnet18 forward pass at 28 px took 3x as long), and the exported model is saved as it is."""
    patched = [m for m in model.modules() if _eligible(m) or _is_global_pool(m)] if enabled else []
    layouts = [(m.weight, m.weight.stride()) for m in patched if isinstance(m, nn.Conv2d)]
    for m in patched:
        m.forward = types.MethodType(_forward if isinstance(m, nn.Conv2d) else _pool_forward, m)
    try:
        yield model
    finally:
        for m in patched:
            m.__dict__.pop("forward", None)
        for weight, stride in layouts:
            if weight.stride() != stride and weight.stride() == _tap_major_strides(weight.shape):
                weight.data = torch.empty_strided(weight.shape, stride, dtype=weight.dtype,
                                                  device=weight.device).copy_(weight.data)
