"""The training shortcuts for 3x3 convolutions on 1x1, 2x2 and 3x3 maps: exact, taken where they
apply, and gone after the block."""
from __future__ import annotations

import copy

import pytest
import torch
from fastai.vision.learner import create_vision_model
from torch import nn
from torchvision.models import resnet18

from train import smallmaps
from train.smallmaps import small_map_convs


REAL_PAYS_OFF = smallmaps._matmul_pays_off


@pytest.fixture(autouse=True)
def fixed_weight_grads(monkeypatch):
    """Each test starts with no timed verdicts and oneDNN's weight gradients, unless it asks for the
    product (`matmul_grads`) or the timing itself: which path runs is then the test's choice, never
    the machine's load, and no verdict of a test reaches another (test_train's fits time their own)."""
    monkeypatch.setattr(smallmaps, "_MATMUL_CHOICE", {})
    monkeypatch.setattr(smallmaps, "_matmul_pays_off", lambda conv, x: False)


def _count_products(monkeypatch) -> list:
    """A list that grows by one each time the product's backward runs."""
    calls = []
    backward = smallmaps._MatmulGradConv.backward
    monkeypatch.setattr(smallmaps._MatmulGradConv, "backward", staticmethod(lambda *a: calls.append(1) or backward(*a)))
    return calls


def _bf16_output_and_grads(conv, x, shortcuts=True):
    """`conv`'s output and its input's and weight's gradients, as training computes them (bf16 autocast)."""
    with small_map_convs(conv, enabled=shortcuts), torch.autocast("cpu", dtype=torch.bfloat16):
        out = conv(x)
    return (out, *torch.autograd.grad(out.float().square().sum(), [x, conv.weight]))


def _assert_bf16_close(got, want):
    for g, w in zip(got, want):
        assert g.dtype == w.dtype and g.shape == w.shape
        torch.testing.assert_close(g.float(), w.float(), rtol=2e-2, atol=2e-2)


@pytest.fixture
def matmul_grads(monkeypatch):
    """Every eligible convolution takes its weight gradient as the product, whatever a timing would say."""
    monkeypatch.setattr(smallmaps, "_matmul_pays_off", lambda conv, x: True)


def _outputs_and_grads(model, x, y):
    model.zero_grad()
    out = model(x)
    nn.functional.cross_entropy(out, y).backward()
    return out.detach(), [p.grad.clone() for p in model.parameters()]


# 28 px: layer3 on 2x2 maps (stride 1), layer4's first conv 2x2 -> 1x1 (stride 2), then 1x1 maps.
# 20 px: layer3's first conv 3x3 -> 2x2 (windows, stride 2), then the same shortcuts. 64 px: layer4 on
# 2x2. 36 and 48 px: layer3 on 3x3 maps (normal path with gradients), layer4's first conv 3x3 -> 2x2
# (windows), then 2x2. 96 px: no map below 3x3, all normal.
@pytest.mark.parametrize("weight_grads", ["onednn", "matmul"])
@pytest.mark.parametrize("layout", [torch.contiguous_format, torch.channels_last])
@pytest.mark.parametrize("size", [28, 20, 64, 36, 48, 96])
def test_resnet18_outputs_and_gradients_are_unchanged(size, layout, weight_grads, monkeypatch):
    monkeypatch.setattr(smallmaps, "_matmul_pays_off", lambda conv, x: weight_grads == "matmul")
    torch.manual_seed(0)
    plain = create_vision_model(resnet18, 10, pretrained=False).double().train().to(memory_format=layout)
    fast = copy.deepcopy(plain)
    x = torch.randn(8, 3, size, size, dtype=torch.float64).contiguous(memory_format=layout)
    y = torch.randint(0, 10, (8,))
    torch.manual_seed(1)  # the same dropout masks in the head
    ref_out, ref_grads = _outputs_and_grads(plain, x, y)
    products = _count_products(monkeypatch)
    with small_map_convs(fast):
        torch.manual_seed(1)
        out, grads = _outputs_and_grads(fast, x, y)
    assert bool(products) == (weight_grads == "matmul")
    torch.testing.assert_close(out, ref_out, rtol=1e-10, atol=1e-12)
    for g, r in zip(grads, ref_grads):
        torch.testing.assert_close(g, r, rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("hw,stride", [((1, 1), 1), ((2, 2), 1), ((2, 2), 2), ((1, 2), 1), ((3, 3), 1), ((3, 3), 2)])
def test_a_conv_with_bias_matches(hw, stride):
    torch.manual_seed(0)
    conv = nn.Conv2d(5, 7, 3, stride=stride, padding=1, bias=True).double()
    x = torch.randn(4, 5, *hw, dtype=torch.float64, requires_grad=True)
    ref = conv(x)
    ref_grads = torch.autograd.grad(ref.square().sum(), [x, conv.weight, conv.bias])
    with small_map_convs(conv):
        out = conv(x)
        grads = torch.autograd.grad(out.square().sum(), [x, conv.weight, conv.bias])
    torch.testing.assert_close(out, ref)
    for g, r in zip(grads, ref_grads):
        torch.testing.assert_close(g, r)


@pytest.mark.parametrize("kernel,stride,padding,hw", [
    (3, 1, 1, (5, 6)), (3, 2, 1, (7, 7)), (1, 2, 0, (4, 4)), (1, 2, 0, (2, 2)), (7, 2, 3, (28, 28)),
    (5, 3, 2, (9, 11)), (1, 1, 0, (3, 3)), ((3, 1), (2, 1), (1, 0), (6, 5))])
def test_the_weight_gradients_product_matches_the_convolution(kernel, stride, padding, hw, matmul_grads, monkeypatch):
    """Any kernel, stride and zero padding, with a bias, on maps that none of the small-map shortcuts
    takes: the same output and gradients (input, weight, bias) in float64."""
    torch.manual_seed(0)
    conv = nn.Conv2d(5, 7, kernel, stride=stride, padding=padding, bias=True).double()
    x = torch.randn(4, 5, *hw, dtype=torch.float64, requires_grad=True)
    ref = conv(x)
    ref_grads = torch.autograd.grad(ref.square().sum(), [x, conv.weight, conv.bias])
    calls = _count_products(monkeypatch)
    with small_map_convs(conv):
        out = conv(x)
        grads = torch.autograd.grad(out.square().sum(), [x, conv.weight, conv.bias])
    assert calls, "the product's backward did not run: the test would prove nothing"
    torch.testing.assert_close(out, ref, rtol=1e-12, atol=1e-12)
    for g, r in zip(grads, ref_grads):
        torch.testing.assert_close(g, r, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("kernel,stride,padding,hw", [(3, 1, 1, (4, 4)), (3, 2, 1, (4, 4)), (1, 2, 0, (2, 2))])
def test_the_weight_gradients_product_under_bf16_autocast(kernel, stride, padding, hw, monkeypatch):
    """As training computes it: bf16 autocast, channels-last weights. The product's gradients match
    oneDNN's to bf16's precision, in the same dtypes, and the weight's comes in the weight's layout
    (autograd would copy it otherwise), read through `autograd.grad`, which hands it back as made."""
    torch.manual_seed(0)
    conv = nn.Conv2d(32, 16, kernel, stride=stride, padding=padding, bias=False).to(memory_format=torch.channels_last)
    x = torch.randn(8, 32, *hw).contiguous(memory_format=torch.channels_last).requires_grad_()
    monkeypatch.setattr(smallmaps, "_matmul_pays_off", lambda conv, x: False)
    want = _bf16_output_and_grads(conv, x)
    monkeypatch.setattr(smallmaps, "_matmul_pays_off", lambda conv, x: True)
    got = _bf16_output_and_grads(conv, x)
    _assert_bf16_close(got, want)
    assert got[2].stride() == conv.weight.stride()


def _count_windows(monkeypatch) -> list:
    """A list that grows by one each time `_WindowConv` runs forward."""
    calls = []
    apply = smallmaps._WindowConv.apply
    monkeypatch.setattr(smallmaps._WindowConv, "apply", lambda *a: calls.append(a[3]) or apply(*a))
    return calls


@pytest.mark.parametrize("layout", [torch.contiguous_format, torch.channels_last])
@pytest.mark.parametrize("bias", [True, False])
def test_3x3_maps_by_windows_match_the_convolution(layout, bias, monkeypatch):
    """On a 3x3 map each output position's window products: at stride 2 always, at stride 1 without
    gradients only (validation; training keeps oneDNN's there, faster with its backward). Equal in
    float64, with an output and gradients in the layouts the convolution gives."""
    torch.manual_seed(0)
    windows = _count_windows(monkeypatch)
    for stride in (1, 2):
        conv = nn.Conv2d(5, 7, 3, stride=stride, padding=1, bias=bias).double().to(memory_format=layout)
        x = torch.randn(4, 5, 3, 3, dtype=torch.float64).contiguous(memory_format=layout).requires_grad_()
        params = [x, conv.weight] + ([conv.bias] if bias else [])
        ref = conv(x)
        ref_grads = torch.autograd.grad(ref.square().sum(), params)
        with small_map_convs(conv):
            with torch.no_grad():
                torch.testing.assert_close(conv(x), ref, rtol=1e-12, atol=1e-12)
                assert windows.pop() == stride
            out = conv(x)
            assert windows == ([2] if stride == 2 else [])
            grads = torch.autograd.grad(out.square().sum(), params)
        windows.clear()
        assert out.stride() == ref.stride()
        torch.testing.assert_close(out, ref, rtol=1e-12, atol=1e-12)
        for g, r in zip(grads, ref_grads):
            torch.testing.assert_close(g, r, rtol=1e-10, atol=1e-12)
        if layout == torch.channels_last:  # the weight's gradient in its layout: autograd need not copy it
            assert grads[1].stride() == conv.weight.stride()


def test_the_choice_is_timed_once_per_shape_and_draws_no_random_numbers(monkeypatch):
    """The first training step that meets a shape times both weight gradients (on its own tensors,
    no random numbers drawn: the run's own are left as they were); later steps reuse the verdict.
    No timing under no_grad (validation), on a frozen weight, where the im2col matrix is too big,
    or on a run of several processes."""
    monkeypatch.setattr(smallmaps, "_matmul_pays_off", REAL_PAYS_OFF)
    products = []
    weight_grad = smallmaps._weight_grad
    monkeypatch.setattr(smallmaps, "_weight_grad", lambda *a: products.append(1) or weight_grad(*a))
    conv = nn.Conv2d(8, 8, 3, padding=1)
    x = torch.randn(2, 8, 6, 6)
    rng = torch.get_rng_state()
    with small_map_convs(conv):
        with torch.no_grad():
            conv(x)
        assert not smallmaps._MATMUL_CHOICE and not products
        conv(x)
        assert len(smallmaps._MATMUL_CHOICE) == 1 and len(products) == 4  # one untimed, three timed
        assert torch.equal(torch.get_rng_state(), rng)
        conv(x).sum().backward()
        assert len(smallmaps._MATMUL_CHOICE) == 1 and len(products) in (4, 5)  # 5 if the product won
        conv.weight.requires_grad_(False)
        conv(torch.randn(3, 8, 6, 6))
        assert len(smallmaps._MATMUL_CHOICE) == 1
        conv.weight.requires_grad_(True)
        monkeypatch.setattr(smallmaps, "MATMUL_MAX_BYTES", 2 * 3 * 3 * 9 * 8 * 4 - 1)  # n x out x taps x c x fp32
        conv(torch.randn(2, 8, 3, 3))
        assert list(smallmaps._MATMUL_CHOICE.values())[-1] is False and len(products) in (4, 5)
        import train.distributed
        monkeypatch.setattr(train.distributed, "world_size", lambda: 2)
        conv(torch.randn(2, 8, 5, 5))
        assert len(smallmaps._MATMUL_CHOICE) == 3 and list(smallmaps._MATMUL_CHOICE.values())[-1] is False
        assert len(products) in (4, 5)


def test_float64_and_unbatched_inputs_under_autocast(matmul_grads):
    """Autocast leaves float64 alone, and so does the product's path; an unbatched image (3-d) runs
    the plain convolution, as nn.Conv2d takes it."""
    conv = nn.Conv2d(4, 6, 3, padding=1).double()
    x = torch.randn(2, 4, 5, 5, dtype=torch.float64, requires_grad=True)
    with small_map_convs(conv), torch.autocast("cpu", dtype=torch.bfloat16):
        assert conv(x).dtype == torch.float64
        assert conv(x[0]).shape == (6, 5, 5)


def test_shortcuts_are_taken_at_28px_and_channels_last(monkeypatch):
    """resnet18 has 20 convolutions; at 28 px, 7 of them see 1x1 or 2x2 maps (layer3's three
    stride-1 convs, all four of layer4's 3x3 convs) and must not reach the normal convolution."""
    model = create_vision_model(resnet18, 10, pretrained=False).to(memory_format=torch.channels_last)
    calls = []  # (made after the model: fastai sizes its head with a forward pass of its own)
    normal = nn.Conv2d._conv_forward
    monkeypatch.setattr(nn.Conv2d, "_conv_forward", lambda self, *a: calls.append(self) or normal(self, *a))
    x = torch.randn(4, 3, 28, 28).contiguous(memory_format=torch.channels_last)
    model(x)
    assert len(calls) == 20
    calls.clear()
    with small_map_convs(model):
        model(x)
    assert len(calls) == 13
    # 36 px: layer4's first conv steps 3x3 -> 2x2 by windows, its other three 3x3 convs see 2x2 maps;
    # without gradients (validation) layer3's three stride-1 convs on 3x3 maps go by windows too.
    x = torch.randn(4, 3, 36, 36).contiguous(memory_format=torch.channels_last)
    calls.clear()
    with small_map_convs(model):
        model(x)
        assert len(calls) == 16
        calls.clear()
        with torch.no_grad():
            model(x)
        assert len(calls) == 13


def test_the_heads_pooling_passes_a_1x1_map_through(monkeypatch):
    """fastai's head pools layer4's map, 1x1 at 28 px: neither pooling kernel runs, the rest do."""
    model = create_vision_model(resnet18, 10, pretrained=False)
    calls = []
    for f in ("adaptive_avg_pool2d", "adaptive_max_pool2d"):
        real = getattr(nn.functional, f)
        monkeypatch.setattr(nn.functional, f, lambda *a, real=real, **k: calls.append(a[0].shape) or real(*a, **k))
    with small_map_convs(model):
        model(torch.randn(2, 3, 28, 28))
        assert not calls
        model(torch.randn(2, 3, 64, 64))  # 2x2: pooled as ever
        assert len(calls) == 2


@pytest.mark.parametrize("size,stage", [(28, 6), (36, 7), (36, 6)])
def test_small_maps_stay_channels_last(size, stage):
    """The 2x2 products (layer3 at 28 px, layer4 at 36 px) and the window products (layer4's first conv
    at 36 px; layer3's on 3x3 maps in validation) hand their maps on in the input's layout: every
    BatchNorm of the stage sees channels-last maps, as it does without the shortcuts (a channels-first
    2x2 map made its backward ~5x slower, and one laid out neither way ~8x); a channels-first model
    stays channels-first."""
    for layout in (torch.channels_last, torch.contiguous_format):
        model = create_vision_model(resnet18, 10, pretrained=False).to(memory_format=layout)
        seen = []
        for m in model[0][stage].modules():
            if isinstance(m, nn.BatchNorm2d):
                m.register_forward_pre_hook(lambda m, args: seen.append(args[0].is_contiguous(memory_format=layout)))
        with small_map_convs(model):
            model(torch.randn(4, 3, size, size).contiguous(memory_format=layout))
            with torch.no_grad():
                model(torch.randn(4, 3, size, size).contiguous(memory_format=layout))
        assert len(seen) == 10 and all(seen), (layout, seen)


def test_removed_after_the_block_even_on_error():
    model = resnet18()
    with pytest.raises(KeyboardInterrupt):
        with small_map_convs(model):
            assert "forward" in model.layer4[0].conv1.__dict__
            raise KeyboardInterrupt
    assert not [m for m in model.modules() if "forward" in m.__dict__]
    with small_map_convs(model, enabled=False):
        assert not [m for m in model.modules() if "forward" in m.__dict__]


def test_weight_gradients_come_in_the_weights_layout():
    """The 1x1-map shortcuts (layer4 at 28 px) lay their weights out tap by tap, (kh, kw, out, in) in
    memory, so that each tap is one block (they never reach oneDNN); the 2x2-map ones (layer3) keep channels-last.
    Each weight gradient comes in its weight's layout, so autograd need not copy it: read through
    `torch.autograd.grad`, which hands back the gradients as the backward made them (`.grad` would be
    put in the weight's layout by autograd's accumulation either way)."""
    torch.manual_seed(0)
    model = create_vision_model(resnet18, 10, pretrained=False).to(memory_format=torch.channels_last)
    x = torch.randn(4, 3, 28, 28).contiguous(memory_format=torch.channels_last)
    layer3, layer4 = model[0][6], model[0][7]
    # layer4's first conv steps 2x2 -> 1x1 through the kernel's bottom-right 2x2; the others see 1x1 maps
    corners = ((layer4[0].conv1, (slice(1, 3), slice(1, 3))), (layer4[0].conv2, (1, 1)),
               (layer4[1].conv1, (1, 1)), (layer4[1].conv2, (1, 1)))
    blocks = (layer3[0].conv2, layer3[1].conv1, layer3[1].conv2)  # 2x2 maps, stride 1
    with small_map_convs(model):
        grads = torch.autograd.grad(model(x).sum(), [conv.weight for conv, _ in corners] + [c.weight for c in blocks])
        strides = [conv.weight.stride() for conv, _ in corners]
    for (conv, used), g, stride in zip(corners, grads, strides):
        o, c = conv.weight.shape[:2]
        assert stride == (c, 1, 3 * o * c, o * c)
        assert g.stride() == stride
        assert g[(slice(None), slice(None), *used)].abs().sum() > 0
        unused = g.clone()
        unused[(slice(None), slice(None), *used)] = 0
        assert unused.abs().sum() == 0
    for conv, g in zip(blocks, grads[len(corners):]):
        assert conv.weight.is_contiguous(memory_format=torch.channels_last) and not conv.weight.is_contiguous()
        assert g.stride() == conv.weight.stride() and g.abs().sum() > 0


def test_weights_are_put_back_in_their_layout_after_the_block():
    """Outside the block a tap-major weight would meet oneDNN, which reorders it on every call, and
    the exported model would keep it: each weight leaves in the layout it came in, values unchanged."""
    torch.manual_seed(0)
    for layout in (torch.channels_last, torch.contiguous_format):
        model = create_vision_model(resnet18, 10, pretrained=False).to(memory_format=layout)
        before = {k: (v.stride(), v.detach().clone()) for k, v in model.named_parameters()}
        with small_map_convs(model):
            model(torch.randn(4, 3, 28, 28).contiguous(memory_format=layout)).sum().backward()
            assert model[0][7][1].conv2.weight[:, :, 1, 1].is_contiguous()  # tap by tap inside
        for k, v in model.named_parameters():  # (the BatchNorms' statistics did move: a training pass)
            assert v.stride() == before[k][0] and torch.equal(v, before[k][1]), k


def test_layouts_are_left_alone_on_several_processes(monkeypatch):
    """DDP fixed each gradient's layout when it wrapped the model: a weight changing its own after
    that would have every gradient copied into its bucket."""
    import train.distributed
    monkeypatch.setattr(train.distributed, "world_size", lambda: 2)
    model = create_vision_model(resnet18, 10, pretrained=False).to(memory_format=torch.channels_last)
    with small_map_convs(model):
        model(torch.randn(2, 3, 28, 28))
    assert all(m.weight.is_contiguous(memory_format=torch.channels_last) for m in model.modules()
               if isinstance(m, nn.Conv2d) and m.kernel_size == (3, 3))


@pytest.mark.parametrize("hw,stride", [((1, 1), 1), ((2, 2), 2), ((2, 2), 1), ((3, 3), 2)])
def test_shortcuts_under_bf16_autocast_match_the_convolution(hw, stride):
    torch.manual_seed(0)
    conv = nn.Conv2d(16, 8, 3, stride=stride, padding=1, bias=False).to(memory_format=torch.channels_last)
    x = torch.randn(4, 16, *hw, requires_grad=True)
    _assert_bf16_close(_bf16_output_and_grads(conv, x), _bf16_output_and_grads(conv, x, shortcuts=False))


@pytest.mark.parametrize("stride", [1, 2])
def test_3x3_windows_in_validation_under_bf16_autocast(stride, monkeypatch):
    """How earlier epochs validate in a bf16 run (train/precision.py): no gradients, autocast on."""
    torch.manual_seed(0)
    windows = _count_windows(monkeypatch)
    conv = nn.Conv2d(16, 8, 3, stride=stride, padding=1, bias=True).to(memory_format=torch.channels_last)
    x = torch.randn(4, 16, 3, 3).contiguous(memory_format=torch.channels_last)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        want = conv(x)
        with small_map_convs(conv):
            got = conv(x)
    assert windows == [stride] and got.dtype == want.dtype == torch.bfloat16
    assert got.is_contiguous(memory_format=torch.channels_last)
    torch.testing.assert_close(got.float(), want.float(), rtol=2e-2, atol=2e-2)
