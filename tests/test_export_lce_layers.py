"""LCE export of the layers timm's families are built from: timm's ``BatchNormAct2d`` (folded or
not, with each activation), ``MaxPool2d(ceil_mode=True)``, SE gates (broadcast ``mul``), channel
``cat`` / ``split`` / slices; each tiny network is run by LCE's interpreter under its three kernel
paths and compared with PyTorch, and the refusals name the layer a user finds in ``named_modules()``.

Running a file needs LCE's interpreter (numpy<2 here or ``BNNPRUNE_LCE_PYTHON``); the refusal
tests need only the ``lce`` extra.
"""
import numpy as np
import pytest
import torch
from timm.layers import BatchNormAct2d, Conv2dSame, LayerNorm2d, Linear
from torch import nn

from lightning_bnnprune.layers import BinaryConv2d
from lightning_bnnprune.pruning.export_lce import LceExportError, export_lce, lce_predict
from lightning_bnnprune.pruning.lce_runtime import KERNELS

from helpers import needs_interpreter, needs_lce


def randomise_norms(net):
    """Random batch-norm statistics and affine terms, so that a wrong fold shows in the logits."""
    with torch.no_grad():
        for m in net.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.normal_(0.0, 0.5)
                m.running_var.uniform_(0.5, 2.0)
                m.weight.normal_(1.0, 0.3)
                m.bias.normal_(0.0, 0.3)
    return net


def lce_vs_pytorch(net, tmp_path, size=8, channels=8, n=4, **export):
    """The largest |LCE - PyTorch| of ``net``'s logits over LCE's three kernel paths."""
    net = randomise_norms(net).eval()
    export_lce(net, tmp_path / "m.tflite", input_size=(channels, size, size), **export)
    x = torch.randn(n, channels, size, size, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        ref = net(x).numpy()
    got = lce_predict(tmp_path / "m.tflite", x, kernels=list(KERNELS))
    assert set(got) == set(KERNELS)
    return max(float(np.abs(out - ref).max()) for out in got.values())


class Head(nn.Sequential):
    """Global pool and timm's Linear (traced as a leaf: its forward checks for TorchScript)."""

    def __init__(self, channels, classes=5):
        super().__init__(nn.AdaptiveAvgPool2d(1), nn.Flatten(), Linear(channels, classes))


@needs_interpreter
@pytest.mark.parametrize("act", [nn.Identity, nn.ReLU, nn.SiLU, nn.Hardswish, nn.LeakyReLU, nn.Tanh])
def test_timm_batchnorm_act_folds_into_the_binary_conv_or_stands_alone(tmp_path, act):
    torch.manual_seed(0)
    net = nn.Sequential(
        BinaryConv2d(8, 16, 3, padding=1), BatchNormAct2d(16, act_layer=act),  # folded into the conv
        nn.MaxPool2d(2), BatchNormAct2d(16, act_layer=act),  # after a pool: a float op of its own
        BinaryConv2d(16, 16, 3, padding=1), BatchNormAct2d(16, act_layer=act), Head(16),
    )
    assert lce_vs_pytorch(net, tmp_path) < 1e-4


@needs_interpreter
@pytest.mark.parametrize("kernel, stride, padding, size", [
    (3, 2, 0, 8), (3, 2, 0, 7), (2, 2, 0, 7), (3, 2, 1, 8), (3, 2, 1, 9), (3, 1, 1, 6),
])
def test_max_pool_with_ceil_mode_is_exact(tmp_path, kernel, stride, padding, size):
    torch.manual_seed(0)
    pool = nn.MaxPool2d(kernel, stride, padding, ceil_mode=True)
    net = nn.Sequential(nn.Conv2d(8, 8, 1), pool, nn.Conv2d(8, 8, 1), Head(8))  # the map, not just its mean
    assert lce_vs_pytorch(net, tmp_path, size=size) < 1e-5


class SqueezeExcite(nn.Module):
    """timm's SE shape: mean over the map, two 1x1 convs, a gate, a broadcast product."""

    def __init__(self, channels, gate):
        super().__init__()
        self.fc1 = BinaryConv2d(channels, channels, 1, bias=True)
        self.fc2 = nn.Conv2d(channels, channels, 1)
        self.gate = gate

    def forward(self, x):
        return x * self.gate(self.fc2(torch.relu(self.fc1(x.mean((2, 3), keepdim=True)))))


class Aggregate(nn.Module):
    """DLA's / CSP's / Res2Net's shapes: split, slice and concatenate along channels."""

    def __init__(self):
        super().__init__()
        self.conv = BinaryConv2d(8, 16, 3, padding=1)
        self.bn = BatchNormAct2d(16, act_layer=nn.SiLU)
        self.mix = BinaryConv2d(24, 8, 1)

    def forward(self, x):
        a, b = self.bn(self.conv(x)).split([6, 10], dim=1)
        c, d = torch.chunk(x, 2, dim=1)
        y = torch.cat([b, a, x[:, 2:6], d, c[:, :2]], dim=1)  # 10 + 6 + 4 + 4 + 2 = 26 channels
        return self.mix(y[:, :24]) + 0


@needs_interpreter
@pytest.mark.parametrize("gate", [nn.Sigmoid, nn.Hardsigmoid])
def test_squeeze_excite_gate_is_a_broadcast_mul(tmp_path, gate):
    torch.manual_seed(0)
    net = nn.Sequential(BinaryConv2d(8, 16, 3, padding=1), nn.BatchNorm2d(16), SqueezeExcite(16, gate()), Head(16))
    assert lce_vs_pytorch(net, tmp_path) < 1e-4


@needs_interpreter
def test_channel_split_slice_and_cat_are_exact(tmp_path):
    torch.manual_seed(0)
    net = nn.Sequential(Aggregate(), nn.BatchNorm2d(8), Head(8))
    assert lce_vs_pytorch(net, tmp_path) < 1e-4


@needs_lce
def test_refusals_name_the_layer_not_an_fx_node(tmp_path):
    class Rolled(nn.Module):
        def forward(self, x):
            return torch.roll(x, 1, dims=2)

    net = nn.Sequential(BinaryConv2d(8, 8, 3, padding=1), nn.Sequential(nn.Identity(), Rolled()), Head(8))
    with pytest.raises(LceExportError, match=r"^cannot export '1\.1' \(its 'roll'\) to LCE: function 'roll'"):
        export_lce(net.eval(), tmp_path / "m.tflite", input_size=(8, 8, 8))
    net = nn.Sequential(BinaryConv2d(8, 8, 3, padding=1), LayerNorm2d(8), Head(8))
    with pytest.raises(LceExportError, match=r"^cannot export '1' to LCE: LayerNorm2d \(a normalisation"):
        export_lce(net.eval(), tmp_path / "m.tflite", input_size=(8, 8, 8))
    net = nn.Sequential(BinaryConv2d(8, 8, 3, padding=1), nn.MaxPool2d(3, 1, 1, dilation=2), Head(8))
    with pytest.raises(LceExportError, match=r"^cannot export '1' to LCE: MaxPool2d with dilation"):
        export_lce(net.eval(), tmp_path / "m.tflite", input_size=(8, 8, 8))


@needs_interpreter
@pytest.mark.parametrize("groups, out, same", [(8, 8, False), (8, 16, False), (2, 8, False), (8, 8, True)])
def test_grouped_binary_conv_as_float_on_request(tmp_path, groups, out, same):
    # depthwise, depthwise x2, two groups, timm's SAME padding (stride 2 on an even map)
    torch.manual_seed(0)
    conv = BinaryConv2d(8, out, 3, stride=2 if same else 1, padding=0 if same else 1, groups=groups,
                        same_padding=same)
    net = nn.Sequential(nn.Conv2d(8, 8, 1), conv, nn.BatchNorm2d(out), BinaryConv2d(out, 8, 1), Head(8))
    with pytest.raises(LceExportError, match=r"^cannot export '1' to LCE: grouped binary convolution .*grouped='float'"):
        export_lce(net.eval(), tmp_path / "m.tflite", input_size=(8, 8, 8))
    info = export_lce(net.eval(), tmp_path / "m.tflite", input_size=(8, 8, 8), grouped="float")
    assert (info["binary_layers"], info["float_binary_layers"]) == (1, 1)
    assert lce_vs_pytorch(net, tmp_path, grouped="float") < 1e-4


class AffineScale(nn.Module):
    """Parameters read in forward: HGNetV2's one-element affine, FastViT's ``[C, 1, 1]`` layer
    scale, and a standardised-weight blur (reflect pad, depthwise conv of a computed weight)."""

    def __init__(self, channels):
        super().__init__()
        self.scale = nn.Parameter(torch.tensor([1.5]))
        self.bias = nn.Parameter(torch.tensor([-0.25]))
        self.gamma = nn.Parameter(torch.rand(channels, 1, 1) + 0.5)
        self.blur = nn.Parameter(torch.rand(channels, 1, 3, 3))

    def forward(self, x):
        y = self.scale * x + self.bias
        y = y - self.gamma * x
        w = self.blur / self.blur.sum((2, 3), keepdim=True)
        return nn.functional.conv2d(nn.functional.pad(y, (1, 1, 1, 1), mode="reflect"), w, groups=w.shape[0])


class UpAndPool(nn.Module):
    """HRNet's nearest upsampling, Inception's and GhostNetV2's functional pools."""

    def __init__(self):
        super().__init__()
        self.up = nn.Upsample(scale_factor=2, mode="nearest")

    def forward(self, x):
        y = nn.functional.max_pool2d(x, 3, 2, ceil_mode=True)  # 8 -> 4
        y = self.up(nn.functional.avg_pool2d(y, 2, 2))  # 4 -> 2 -> 4
        y = nn.functional.interpolate(y, size=x.shape[-2:])  # GhostNetV2's: the size from a shape
        return y + nn.functional.avg_pool2d(x, 3, 1, 1)


@needs_interpreter
@pytest.mark.parametrize("block", [AffineScale, UpAndPool])
def test_constants_and_functional_layers_are_exact(tmp_path, block):
    torch.manual_seed(0)
    net = nn.Sequential(Conv2dSame(8, 8, 3, stride=2), nn.Upsample(scale_factor=2),  # TF-padded stem: SAME
                        BinaryConv2d(8, 8, 3, padding=1), nn.BatchNorm2d(8),
                        block(8) if block is AffineScale else block(), BinaryConv2d(8, 8, 3, padding=1), Head(8))
    assert lce_vs_pytorch(net, tmp_path) < 1e-4


@needs_lce
def test_grouped_takes_refuse_or_float(tmp_path):
    with pytest.raises(ValueError, match=r"grouped must be one of 'refuse', 'float', got 'bits'"):
        export_lce(nn.Sequential(nn.Conv2d(3, 3, 1)), tmp_path / "m.tflite", input_size=(3, 4, 4), grouped="bits")
